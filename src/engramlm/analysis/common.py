"""Shared plumbing for the analysis instruments: token texts, evaluation passes, output files.

Every instrument reads a trained model and either a text or a prepared split, and writes JSON plus a
picture. The model and the tokenizer it was hashed under come from :mod:`engramlm.models.locate`
(``load_trained_model``, ``find_tokenizer``: a different tokenizer would silently send every n-gram to
other rows, so it is refused). What the instruments share lives here so each instrument module is
only its own measurement: one vectorised evaluation pass that returns per-target arrays (NLL per
mode, bytes, ids) which the instruments then bucket with ``np.bincount`` instead of looping over tokens.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engramlm.errors import ConfigError
from engramlm.models.model import EngramLM
from engramlm.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

# A mode maps (model, batch, row_ids) to keyword arguments of ``model.engram_inputs`` (row_ids, skip_engram).
ModeFn = Callable[[EngramLM, dict[str, Any], torch.Tensor | None], dict[str, Any]]


def token_texts(tok, vocab_size: int | None = None) -> list[str]:
    """Each id decoded alone (specials kept); ids beyond the tokenizer decode to ''."""
    n = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    return texts + [""] * max(0, (vocab_size or n) - n)


def encode_text(tok, text: str, *, bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` [1, T] and ``doc_start`` [1, T] for one document, BOS-prefixed like the prepared data."""
    from engramlm.data.tokenizer import BOS_ID

    ids = tok.encode(text, add_special_tokens=False).ids
    if bos:
        ids = [BOS_ID, *ids]
    if not ids:
        raise ConfigError("text: encodes to no tokens")
    x = torch.tensor([ids], dtype=torch.long)
    doc = torch.zeros_like(x, dtype=torch.bool)
    doc[0, 0] = bos
    return x, doc


def check_length(model: EngramLM, input_ids: torch.Tensor) -> None:
    """Refuse a text longer than the model's context instead of failing deep inside attention."""
    if input_ids.shape[1] > model.config.max_seq_len:
        raise ConfigError(
            f"text: {input_ids.shape[1]} tokens exceed the model's max_seq_len ({model.config.max_seq_len}); shorten it"
        )


# ---------------------------------------------------------------------------------------- eval pass


def mode_baseline(model: EngramLM, batch: dict[str, Any], row_ids: torch.Tensor | None) -> dict[str, Any]:
    return {"row_ids": row_ids} if row_ids is not None else {}


def mode_no_engram(model: EngramLM, batch: dict[str, Any], row_ids: torch.Tensor | None) -> dict[str, Any]:
    return {"skip_engram": True} if model.layout is not None else {}


def mode_capacity1(model: EngramLM, batch: dict[str, Any], row_ids: torch.Tensor | None) -> dict[str, Any]:
    """Every n-gram of every head mapped to row 0 of its layer's table (a one-row memory)."""
    return {"row_ids": torch.zeros_like(row_ids)} if row_ids is not None else {}


def mode_skip_layers(layers: set[int]) -> ModeFn:
    def fn(model: EngramLM, batch: dict[str, Any], row_ids: torch.Tensor | None) -> dict[str, Any]:
        return {"skip_engram": set(layers), "row_ids": row_ids} if model.layout is not None else {}

    return fn


@dataclass
class EvalArrays:
    """Per scored target (``loss_mask``), in split order: input position, ids, bytes, NLL per mode."""

    positions: np.ndarray  # int64 absolute position of the *input* token in the split
    inputs: np.ndarray  # int64 input id (the token before the target)
    targets: np.ndarray  # int64 target id
    target_bytes: np.ndarray  # int64 UTF-8 bytes the target stands for
    nll: dict[str, np.ndarray]  # mode -> float64 NLL in nats
    total_bytes: int  # bytes of the whole split (bits-per-byte denominator of a full sweep)
    complete: bool  # True when the whole split was scored

    @property
    def n(self) -> int:
        return int(self.targets.shape[0])


def eval_pass(
    model: EngramLM,
    dataset,
    modes: Mapping[str, ModeFn],
    *,
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = None,
    progress: bool = False,
) -> EvalArrays:
    """Score a prepared split under several forward modes in one ordered sweep (``EvalLoader``)."""
    from engramlm.data.loader import EvalLoader

    loader = EvalLoader(dataset, batch_size, min(seq_len, model.config.max_seq_len))
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("pos", "inp", "tgt", "bytes")}
    nll: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    first = 0
    it = iter(loader)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="batch")
    with torch.inference_mode():
        for _ in range(total):
            batch = next(it)
            b, t = batch["input_ids"].shape
            ks = np.arange(first, first + b, dtype=np.int64)
            first += b
            pos = ks[:, None] * loader.seq_len + np.arange(t, dtype=np.int64)
            mask = batch["loss_mask"].numpy()
            row_ids = model.hash(batch["input_ids"], batch["doc_start"]) if model.layout is not None else None
            for name, fn in modes.items():
                engram = model.engram_inputs(batch["input_ids"], batch["doc_start"], **fn(model, batch, row_ids))
                logits = model(batch["input_ids"], engram=engram).logits
                per = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), reduction="none")
                nll[name].append(per.view(b, t).double().numpy()[mask])
            cols["pos"].append(pos[mask])
            cols["inp"].append(batch["input_ids"].numpy()[mask])
            cols["tgt"].append(batch["targets"].numpy()[mask])
            cols["bytes"].append(batch["target_bytes"].numpy()[mask])
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return EvalArrays(
        positions=cat(cols["pos"], np.int64),
        inputs=cat(cols["inp"], np.int64),
        targets=cat(cols["tgt"], np.int64),
        target_bytes=cat(cols["bytes"], np.int64),
        nll={m: cat(v, np.float64) for m, v in nll.items()},
        total_bytes=int(loader.total_bytes),
        complete=total == len(loader),
    )


def loss_and_bpb(nll: np.ndarray, nbytes: np.ndarray) -> dict[str, float | int | None]:
    """Mean NLL (nats/token) and bits per byte of a set of targets (None when empty)."""
    n, b = int(nll.shape[0]), int(nbytes.sum())
    return {
        "tokens": n,
        "bytes": b,
        "loss": float(nll.mean()) if n else None,
        "bpb": float(nll.sum() / (np.log(2) * b)) if b else None,
    }


# ---------------------------------------------------------------------------------------- output


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_outputs(
    out_dir: str | os.PathLike[str],
    name: str,
    payload: Mapping[str, Any],
    fig=None,
    html: str | None = None,
) -> dict[str, str]:
    """``<name>.json`` (+ ``.png`` and ``.html``) under ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / f"{name}.json")}
    if fig is not None:
        files["png"] = str(save_figure(fig, out / f"{name}.png"))
    if html is not None:
        atomic_write_text(out / f"{name}.html", html)
        files["html"] = str(out / f"{name}.html")
    atomic_write_json(out / f"{name}.json", {**payload, "files": files})
    return files
