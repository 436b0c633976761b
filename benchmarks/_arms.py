"""Train one benchmark arm resumably and score it on held-out data; shared by the training benchmarks.

Why a module: the head-to-head, its "why" sweep and the paper reproductions all train many small
arms that take minutes to hours each. ``run_arm`` makes every arm resumable (exact resume from its
last checkpoint) and reusable (a finished arm's result is stored with the full training config
and returned again only while that config is unchanged), so a suite longer than one sitting can be
run piecewise, and benchmarks that share an arm (same model, data, budget, seed) train it once.
A budget is a dict with ``batch``, ``seq``, ``warmup``, ``eval_tokens`` and ``steps`` or ``tokens``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from engramlm.data import EvalLoader, prepare
from engramlm.data.corpora import SourceSpec
from engramlm.models.config import ModelConfig
from engramlm.models.evaluate import evaluate
from engramlm.models.locate import list_checkpoints
from engramlm.train import TrainConfig, Trainer, read_metrics
from engramlm.train.muon import MUON_NUMERICS_VERSION
from engramlm.utils.io import atomic_open

RESULT_FILE = "arm_result.json"


def resolve_corpus(spec: str, data_root: Path) -> tuple[str, Path]:
    """``sotu`` / ``stdlib`` / a prepared dir / a raw text dir -> (name, prepared dir)."""
    p = Path(spec)
    if spec in ("sotu", "stdlib"):
        out = data_root / spec
        prepare(spec, out, progress=True)
        return spec, out
    if (p / "manifest.json").is_file():
        return p.name, p
    if p.is_dir():
        tag = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
        out = data_root / f"dir_{p.name}_{tag}"
        prepare(SourceSpec(kind="dir", path=str(p)), out, progress=True)
        return p.name, out
    raise SystemExit(f"--corpus {spec!r}: not sotu, stdlib, a prepared directory or a directory of .txt files")


def train_config(
    model: ModelConfig,
    size: dict[str, Any],
    data: Path,
    seed: int,
    out: Path,
    threads: int,
    optim: dict[str, Any] | None = None,
) -> TrainConfig:
    steps = size.get("steps") or math.ceil(size["tokens"] / (size["batch"] * size["seq"]))
    return TrainConfig.from_dict(
        {
            "data": {"dir": str(data), "batch_size": size["batch"], "seq_len": size["seq"],
                     "eval_batch_size": size["batch"], "eval_max_batches": 4},
            "model": {"preset": "tiny", "overrides": model.to_dict()},
            "schedule": {"warmup_steps": size["warmup"]}, "optim": dict(optim or {}),
            "steps": steps, "seed": seed, "out_dir": str(out), "threads": threads, "progress": False,
            "tensorboard": False, "checkpoint_every": size.get("checkpoint_every", max(1, steps // 4)),
            "keep_checkpoints": size.get("keep_checkpoints", 1),
            "eval_every": max(1, steps // 4),
        }
    )  # fmt: skip


def training_seconds(train: list[dict[str, Any]]) -> float:
    """Training time over every process that trained the run: ``elapsed_s`` restarts at a resume."""
    total = prev = 0.0
    for r in train:
        if r["elapsed_s"] < prev:
            total += prev
        prev = r["elapsed_s"]
    return total + prev


def _result_key(cfg: TrainConfig, size: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides an arm's result (not where or how fast it ran), as plain JSON."""
    key = {"train_config": cfg.to_dict(), "eval_tokens": size["eval_tokens"]}
    if cfg.optim.use_muon:  # Muon's numerics changed in version 2 (fused, batched Newton-Schulz)
        key["muon_numerics"] = MUON_NUMERICS_VERSION
    for drop in ("threads", "checkpoint_every", "keep_checkpoints", "progress", "out_dir"):
        key["train_config"].pop(drop, None)
    return json.loads(json.dumps(key))


def _cached_result(out: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    cached = out / RESULT_FILE
    if cached.is_file():
        doc = json.loads(cached.read_text())
        if doc.get("key") == key:
            return doc["result"]
    return None


def arm_status(
    model: ModelConfig,
    size: dict[str, Any],
    data: Path,
    seed: int,
    out: Path,
    optim: dict[str, Any] | None = None,
) -> str:
    """``done`` (a result for exactly this config is stored), ``at step N`` (a checkpoint to resume) or ``new``."""
    cfg = train_config(model, size, data, seed, out, 1, optim)
    if _cached_result(out, _result_key(cfg, size)) is not None:
        return "done"
    ckpts = list_checkpoints(out) if out.is_dir() else []
    return f"at step {int(ckpts[-1].name.removeprefix('step_'))}" if ckpts else "new"


def run_arm(
    model: ModelConfig,
    size: dict[str, Any],
    data: Path,
    seed: int,
    out: Path,
    threads: int,
    optim: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one arm (resuming an interrupted run exactly) and score it; a finished arm is reused.

    The result is stored in ``out/arm_result.json`` with the full training config, so a later
    invocation (another corpus, more seeds) reuses finished arms only when nothing that decides
    the result changed: long sizes can be run piecewise across sessions.
    """
    cfg = train_config(model, size, data, seed, out, threads, optim)
    key = _result_key(cfg, size)
    cached = _cached_result(out, key)
    if cached is not None:
        return {**cached, "reused": True}
    t0 = time.perf_counter()
    resume = bool(list_checkpoints(out))
    tr = Trainer(cfg, resume=resume, overwrite=not resume)  # an arm killed before its first checkpoint starts over
    tr.fit()
    wall = time.perf_counter() - t0
    ev_batches = max(1, size["eval_tokens"] // (size["batch"] * size["seq"]))
    loader = EvalLoader(tr.eval_set, size["batch"], size["seq"], row_ids_fn=tr.model.hasher)
    final = evaluate(tr.model, loader, ev_batches, threads)
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    train_s = training_seconds(train)
    result = {
        "seed": seed,
        "heldout": final,
        "final_train_loss": train[-1]["loss"],
        "wall_s": wall,
        "train_s": train_s,
        "resumed_from_step": tr.resumed_from,
        "tokens_per_s": train[-1]["tokens"] / train_s,
        "curve": [[r["tokens"], r["loss"]] for r in train],
    }
    with atomic_open(out / RESULT_FILE, "w") as f:
        json.dump({"key": key, "result": result}, f, indent=1)
    return result


def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}  # fmt: skip
