"""Training checkpoints: written atomically as a directory, verified on load, last K kept.

Layout of ``RUN_DIR/checkpoints/step_00000120/``::

    model/                   models.io.save_pretrained (config.json, engram_hash.safetensors,
                             model.safetensors) -- loadable alone with load_pretrained
    optimizer.safetensors    Muon momentum, AdamW moments/steps, sparse table state (row ids,
                             moments, per-row counts), torch RNG state
    trainer_state.json       step, train config, loader position, NumPy/Python RNG states,
                             optimizer metadata, sha256 of every file above

The directory is built under a temp name, every file and directory fsynced, then renamed into
place and the parent fsynced: a kill at any moment leaves the previous checkpoints intact and
at most a ``.tmp-*`` directory, which is ignored and cleaned up. Old checkpoints are renamed
away before deletion, so a half-deleted one never looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.errors import ConfigError, CorruptFileError, HashSpecMismatch
from engramlm.utils.io import atomic_write_bytes, atomic_write_json, fsync_path, sha256_file

CKPT_FORMAT = "engramlm.train_checkpoint"
CKPT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d{8})$")
STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"


def checkpoint_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    p = Path(path)
    if (p / STATE_NAME).is_file():
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CorruptFileError(f"{p}: neither a checkpoint (no {STATE_NAME}) nor a run directory with checkpoints")
    return ckpts[-1]


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """A save_pretrained directory from a model dir, a training checkpoint or a run directory (latest)."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    try:
        ckpt = resolve_checkpoint(p)
    except CorruptFileError:
        raise CorruptFileError(
            f"{p}: not a saved model (no config.json + model.safetensors), a training checkpoint or a run "
            "directory with checkpoints"
        ) from None
    if not (ckpt / "model" / "config.json").is_file():
        raise CorruptFileError(f"{ckpt}: training checkpoint without a model/ directory")
    return ckpt / "model"


def rng_state() -> tuple[dict[str, Any], torch.Tensor]:
    """(JSON-able Python/NumPy RNG states, torch CPU RNG state tensor)."""
    np_state = np.random.get_state()  # noqa: NPY002 - saving the legacy global RNG is the point
    py = random.getstate()
    doc = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return doc, torch.get_rng_state()


def set_rng_state(doc: dict[str, Any], torch_state: torch.Tensor) -> None:
    py = doc["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = doc["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4]))
    )
    torch.set_rng_state(torch_state)


@dataclass
class Checkpoint:
    """A loaded checkpoint (model weights are loaded separately via ``model/``)."""

    path: Path
    state: dict[str, Any]
    optim_tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def model_dir(self) -> Path:
        return self.path / "model"


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model,
    optim_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step_{step:08d}`` atomically and prune to the newest ``keep`` checkpoints."""
    from safetensors.torch import save

    from engramlm.models.io import save_pretrained

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root))
    try:
        save_pretrained(model, tmp / "model")
        rng_doc, torch_rng = rng_state()
        tensors = {**optim_tensors, "rng/torch": torch_rng.clone()}
        atomic_write_bytes(tmp / OPTIM_NAME, save(tensors, metadata={"format": CKPT_FORMAT}))
        files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        doc = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step, "rng": rng_doc, "files": files, **state}
        atomic_write_json(tmp / STATE_NAME, doc)
        fsync_path(tmp / "model")
        fsync_path(tmp)
        if final.exists():  # a re-run of the same step (e.g. resumed and re-saved): replace it
            _remove(final, root)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # prune among this run's checkpoints only: one numbered above ``step`` cannot be this run's (the run
    # directory refuses to mix runs, see train.rundir) and must never win over the one just written
    ours = [c for c in list_checkpoints(run_dir) if int(STEP_RE.match(c.name).group(1)) <= step]
    for old in ours[:-keep]:
        _remove(old, root)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _remove(path: Path, root: Path) -> None:
    trash = root / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    fsync_path(root)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> Checkpoint:
    """Read and verify a checkpoint (sha256 of every file); clear errors for anything corrupt."""
    from safetensors.torch import load

    ckpt = resolve_checkpoint(path)
    state_path = ckpt / STATE_NAME
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{state_path}: not a readable JSON file ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or state.get("version") != CKPT_VERSION:
        raise CorruptFileError(f"{state_path}: not an engramlm training checkpoint v{CKPT_VERSION}")
    for rel, digest in state.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            raise CorruptFileError(f"{ckpt}: missing file {rel}")
        if verify and sha256_file(f) != digest:
            raise CorruptFileError(f"{f}: sha256 does not match {STATE_NAME}; the checkpoint is corrupt")
    try:
        tensors = load((ckpt / OPTIM_NAME).read_bytes())
    except Exception as exc:
        raise CorruptFileError(f"{ckpt / OPTIM_NAME}: not a readable safetensors file ({exc})") from exc
    return Checkpoint(ckpt, state, tensors)


def restore_rng(ckpt: Checkpoint) -> None:
    with contextlib.suppress(KeyError):
        set_rng_state(ckpt.state["rng"], ckpt.optim_tensors["rng/torch"])


TOKENIZER_FILE = "tokenizer.json"


def _tokenizers_near(model_dir: Path, given: Path) -> list[Path]:
    """tokenizer.json files that may belong to a saved model, nearest first: next to the model, the
    checkpoint or run directory, then the training data named by the checkpoint's trainer state."""
    out = [d / TOKENIZER_FILE for d in (model_dir, model_dir.parent, given, *given.parents[:3])]
    state = model_dir.parent / "trainer_state.json"
    if state.is_file():
        try:
            out.append(Path(json.loads(state.read_text(encoding="utf-8"))["config"]["data"]["dir"]) / TOKENIZER_FILE)
        except (ValueError, KeyError, TypeError):
            pass
    return list(dict.fromkeys(out))


def find_tokenizer(
    path: str | os.PathLike[str],
    model: Any,
    *,
    explicit: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
) -> Path:
    """The tokenizer.json that the model saved at ``path`` (model dir, checkpoint or run dir) was trained with.

    Tried in order: ``explicit`` (a path or a known name); the prepared corpus ``data``'s; one next to
    the model (see :func:`_tokenizers_near`); the config's ``engram.tokenizer``. When the model's
    compression map records the sha256 of the tokenizer it was built from, a tokenizer the caller
    named (``explicit`` or ``data``) must match it or :class:`HashSpecMismatch` is raised, and found
    ones that differ are skipped: a different tokenizer would send every n-gram to other rows.
    """
    from engramlm.assets import resolve_tokenizer

    layout = getattr(model, "layout", None)
    want = layout.compression.tokenizer_sha256 if layout is not None else None
    named = [resolve_tokenizer(explicit)] if explicit else []
    if data is not None and (Path(data) / TOKENIZER_FILE).is_file():
        named.append(Path(data) / TOKENIZER_FILE)
    for candidate in named:
        if want is not None and sha256_file(candidate) != want:
            raise HashSpecMismatch(
                f"tokenizer {candidate}: sha256 differs from the tokenizer this checkpoint's compression map was "
                "built from (its n-grams would map to other rows); pass the tokenizer it was trained with"
            )
        return candidate
    engram = model.config.engram
    found = [c for c in _tokenizers_near(resolve_model_dir(path), Path(path)) if c.is_file()]
    if engram is not None and engram.tokenizer:
        found.append(resolve_tokenizer(engram.tokenizer))
    tried = []
    for candidate in found:
        if want is None or sha256_file(candidate) == want:
            return candidate
        tried.append(str(candidate))
    raise ConfigError(
        f"tokenizer: none found for {path} (pass --tokenizer, or --data with a prepared corpus); looked next to the "
        "model, in the training data and at config.engram.tokenizer" + (f"; sha256 mismatch: {tried}" if tried else "")
    )


def load_trained_model(path: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None):
    """(model, checkpoint state or None) from a checkpoint, a run directory or a saved model directory.

    With ``tokenizer`` (the data's tokenizer.json), an Engram model's hash layout is rebuilt from it
    and must match the checkpoint's fingerprint (:class:`HashSpecMismatch` otherwise), so a model is
    never evaluated on data hashed differently from its training data.
    """
    from engramlm.models.build import build_layout
    from engramlm.models.config import ModelConfig
    from engramlm.models.io import load_pretrained

    p = Path(path)
    state = None
    if (p / "model.safetensors").is_file():
        model_dir = p
    else:
        ckpt = load_checkpoint(p)
        model_dir, state = ckpt.model_dir, ckpt.state
    try:
        cfg = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptFileError(f"{model_dir}/config.json: not a readable model config ({exc})") from exc
    layout = None
    if cfg.engram is not None and tokenizer is not None:
        layout = build_layout(cfg, cfg.engram.tokenizer or tokenizer)
    return load_pretrained(model_dir, layout=layout), state
