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
away before deletion, so a half-deleted one never looks valid. Finding checkpoints (listing, a run's
latest) and reading the model and trainer state are :mod:`engramlm.models.locate`'s; this module adds
the training state (optimizer, loader, RNG) on both sides.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.errors import CorruptModelFileError
from engramlm.models.locate import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MODEL_SUBDIR,
    TRAINER_STATE,
    checkpoint_step,
    checkpoints_dir,
    list_checkpoints,
    read_trainer_state,
    resolve_checkpoint,
    verify_checkpoint_files,
)
from engramlm.utils.io import atomic_write_bytes, atomic_write_json, fsync_path, make_temp_dir, sha256_file

OPTIM_NAME = "optimizer.safetensors"


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
        return self.path / MODEL_SUBDIR


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model,
    optim_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
    extra_json: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write ``step_{step:08d}`` atomically and prune to the newest ``keep`` checkpoints.

    ``extra_json(tmp_dir)`` -> {file name: JSON document} written into the checkpoint (hashed like every file):
    the SSD tables' manifests, which make the checkpoint without copying the tables."""
    from safetensors.torch import save

    from engramlm.models.io import recorded_checksums, save_pretrained

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = make_temp_dir(root, f".tmp-step_{step:08d}-")  # 0777 less the umask, as a plain mkdir
    try:
        save_pretrained(model, tmp / MODEL_SUBDIR)
        rng_doc, torch_rng = rng_state()
        tensors = {**optim_tensors, "rng/torch": torch_rng.clone()}
        atomic_write_bytes(tmp / OPTIM_NAME, save(tensors, metadata={"format": CHECKPOINT_FORMAT}))
        for name, doc in (extra_json(tmp) if extra_json is not None else {}).items():
            atomic_write_json(tmp / name, doc)
        # the model files were hashed once by save_pretrained (checksums.json): reuse, do not hash twice
        known = {f"{MODEL_SUBDIR}/{k}": v for k, v in recorded_checksums(tmp / MODEL_SUBDIR).items()}
        files = {
            rel: known.get(rel) or sha256_file(f)
            for f in sorted(tmp.rglob("*"))
            if f.is_file() and (rel := str(f.relative_to(tmp)))
        }
        doc = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "rng": rng_doc,
            "files": files,
            **state,
        }
        atomic_write_json(tmp / TRAINER_STATE, doc)
        fsync_path(tmp / MODEL_SUBDIR)
        fsync_path(tmp)
        if final.exists():  # a re-run of the same step (e.g. resumed and re-saved): replace it
            _remove(final, root)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, step, keep, tmp)
    return final


def prune_checkpoints(run_dir: str | os.PathLike[str], step: int, keep: int, tmp: Path) -> None:
    """Keep the newest ``keep`` checkpoints at or below ``step``; remove stale temp directories but ``tmp``."""
    root = checkpoints_dir(run_dir)
    # prune among this run's checkpoints only: one numbered above ``step`` cannot be this run's (the run
    # directory refuses to mix runs, see train.rundir) and must never win over the one just written
    ours = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) <= step]
    for old in ours[:-keep]:
        _remove(old, root)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)


def _remove(path: Path, root: Path) -> None:
    trash = root / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    fsync_path(root)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike[str], verify: bool = True, merge_shards: bool = True) -> Checkpoint:
    """Read a training checkpoint (or a run's latest), every file checked against its sha256 when ``verify``;
    anything corrupt raises :class:`CorruptModelFileError` naming the file.

    A checkpoint of a row-sharded run (``engramlm.train.shard_checkpoint``) has its tables' optimiser state
    in one file per rank: ``merge_shards`` gathers it into ``optim_tensors`` as one process saves it (a
    sharded job reads only its own rows instead and passes False).
    """
    from safetensors.torch import load

    ckpt = resolve_checkpoint(path)
    state = read_trainer_state(ckpt)
    if verify:
        verify_checkpoint_files(ckpt, state)
    try:
        tensors = load((ckpt / OPTIM_NAME).read_bytes())
    except Exception as exc:
        raise CorruptModelFileError(f"{ckpt / OPTIM_NAME}: not a readable safetensors file ({exc})") from exc
    if merge_shards and state.get("shards"):
        from engramlm.train.shard_checkpoint import merged_sparse_state

        try:
            tensors.update(merged_sparse_state(ckpt, state))
        except (OSError, ValueError, KeyError) as exc:
            raise CorruptModelFileError(f"{ckpt}: unreadable row-optimiser shard files ({exc})") from exc
    return Checkpoint(ckpt, state, tensors)


def restore_rng(ckpt: Checkpoint) -> None:
    with contextlib.suppress(KeyError):
        set_rng_state(ckpt.state["rng"], ckpt.optim_tensors["rng/torch"])
