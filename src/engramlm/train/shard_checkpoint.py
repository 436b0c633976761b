"""Checkpoints of a row-sharded run: every rank writes its own rows, the result is an ordinary checkpoint.

Layout of ``step_N/`` (as :mod:`engramlm.train.checkpoint`, plus ``shards/``)::

    model/model.safetensors          one complete safetensors file: rank 0 writes the header and the dense
                                     tensors, then each rank writes its rows of every table into the
                                     table's byte range (``pwrite`` at ``offset + start * row_bytes``)
    shards/rank00001-of-00002.safetensors
                                     that rank's sparse row-optimiser state per table, keyed by *global*
                                     row id and sorted by it, so any row range is one contiguous slice
    optimizer.safetensors            dense optimiser state and the RNG (rank 0)
    trainer_state.json               as before, plus ``shards``: world and row bounds of each table

Why this shape: ``model/`` stays a saved model that every reader already opens (``load_trained_model``,
``engramlm store build``, a one-process ``--resume``), no rank ever holds a full table, and a job with
M ranks reads the range it owns from the table (``safe_open(...).get_slice``) and from the few shard files
whose rows overlap it: re-sharding is reading, never rewriting. (It assumes the ranks share a filesystem,
as ``torch.distributed.checkpoint`` does for one checkpoint directory.)

Atomic as the one-process save: everything is written into one ``.tmp-step_N-*`` directory that rank 0
creates; after a barrier rank 0 hashes every file into ``trainer_state.json`` and renames the directory.
A job killed at any moment leaves the previous checkpoint intact and a temp directory the next run removes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.models.io import MODEL_FORMAT, MODEL_VERSION, NO_ENGRAM, write_checksums
from engramlm.models.locate import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, MODEL_SUBDIR, TRAINER_STATE
from engramlm.train.distributed import DistEnv, ShardedTables
from engramlm.utils.io import atomic_write_bytes, atomic_write_json, fsync_path, make_temp_dir, sha256_file

SHARDS_SUBDIR = "shards"
STATE_KEYS = ("rows", "exp_avg", "exp_avg_sq", "count")
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def shard_file(rank: int, world: int) -> str:
    return rank_file(rank, world, "safetensors")


def rank_file(rank: int, world: int, suffix: str) -> str:
    return f"{SHARDS_SUBDIR}/rank{rank:05d}-of-{world:05d}.{suffix}"


# ---- writing -------------------------------------------------------------------------------------
def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


TableSpec = tuple[tuple[int, int], torch.dtype]


def write_model_skeleton(
    path: Path, dense: dict[str, torch.Tensor], tables: dict[str, TableSpec], metadata: dict[str, str]
) -> dict[str, int]:
    """Write a safetensors file holding ``dense`` and room for ``tables`` (name -> (shape, dtype)); returns
    each table's absolute byte offset, where its owners write their rows."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    layout: list[tuple[str, torch.Tensor | None, int]] = []
    pos = 0
    for name in sorted([*dense, *tables]):
        if name in dense:
            t = dense[name]
            shape, dtype, size = list(t.shape), t.dtype, t.numel() * t.element_size()
        else:
            (rows, dim), dtype = tables[name]
            shape, size, t = [rows, dim], rows * dim * torch.empty((), dtype=dtype).element_size(), None
        entries[name] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [pos, pos + size]}
        layout.append((name, t, pos))
        pos += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    base = 8 + len(header)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for _name, t, off in layout:
            if t is not None:
                f.seek(base + off)
                f.write(_raw(t))
        f.truncate(base + pos)  # the tables' ranges: holes until their owners fill them
        f.flush()
        os.fsync(f.fileno())
    return {name: base + off for name, t, off in layout if t is None}


def write_rows(path: Path, offset: int, start: int, rows: torch.Tensor) -> None:
    """This rank's rows ``[start, start + len(rows))`` of a table whose row 0 is at byte ``offset``."""
    data = _raw(rows)
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        at = offset + start * (rows.shape[1] * rows.element_size() if rows.dim() == 2 else 0)
        while done < len(data):
            done += os.pwrite(fd, data[done:], at + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def global_sparse_state(local: dict[str, torch.Tensor], starts: dict[int, int]) -> dict[str, torch.Tensor]:
    """``SparseRowAdam.state_tensors`` of local shards -> global row ids, each layer sorted by row id."""
    out = {}
    for lid, start in starts.items():
        rows = local[f"layer{lid}.rows"] + start
        order = torch.argsort(rows)
        out[f"layer{lid}.rows"] = rows[order].contiguous()
        for k in STATE_KEYS[1:]:
            out[f"layer{lid}.{k}"] = local[f"layer{lid}.{k}"][order].contiguous()
    return out


def save_sharded_checkpoint(
    env: DistEnv,
    run_dir: str | os.PathLike[str],
    step: int,
    model,
    tables: ShardedTables | None,
    dense_optim: dict[str, torch.Tensor],
    sparse_local: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int,
    rank_json: tuple[str, Callable[[Path], dict[str, Any]]] | None = None,
) -> Path:
    """Collective: every rank calls it; returns ``step_{step:08d}`` once it is complete and visible.

    ``rank_json``: (suffix, doc) for tables that live outside the model (``engram.table_tier=ssd``): the model
    file then holds ``[0, d]`` placeholders and each rank writes ``doc(shards dir)`` (its tables' manifests)
    to ``shards/rankR-of-N.<suffix>`` before the barrier; rank 0 hashes and records them."""
    from safetensors.torch import save

    from engramlm.hashing.artifact import save_layout
    from engramlm.models.locate import checkpoints_dir
    from engramlm.train.checkpoint import OPTIM_NAME, _remove, prune_checkpoints, rng_state

    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:08d}"

    def make_tmp() -> str:
        root.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(root, f".tmp-step_{step:08d}-")
        (tmp / MODEL_SUBDIR).mkdir()
        (tmp / SHARDS_SUBDIR).mkdir()
        return tmp.name

    tmp = root / env.on_main(make_tmp)
    weights = tmp / MODEL_SUBDIR / "model.safetensors"
    fingerprint = model.layout.fingerprint if model.layout is not None else NO_ENGRAM
    table_keys = set(tables.keys.values()) if tables is not None else set()

    def skeleton() -> dict[str, int]:
        if model.layout is not None:
            save_layout(model.layout, tmp / MODEL_SUBDIR / "engram_hash.safetensors")
        dense = {k: v for k, v in model.state_dict().items() if k not in table_keys}
        if model.config.tie_embeddings:
            dense.pop("lm_head.weight", None)
        shapes = {tables.keys[lid]: (tables.shapes[lid], tables.dtypes[lid]) for lid in tables.keys} if tables else {}
        if rank_json is not None:  # rows on SSD: the saved model keeps the placeholders, as a one-process SSD run
            shapes = {k: ((0, shape[1]), dtype) for k, (shape, dtype) in shapes.items()}
        meta = {"format": MODEL_FORMAT, "version": str(MODEL_VERSION), "hash_fingerprint": fingerprint}
        return write_model_skeleton(weights, dense, shapes, meta)

    try:
        offsets = env.on_main(skeleton)

        def mine() -> None:
            starts = {}
            if tables is not None:
                for lid, key in tables.keys.items():
                    if rank_json is None:
                        write_rows(weights, offsets[key], tables.shards[lid].start, tables.local[lid])
                    starts[lid] = tables.shards[lid].start
            if rank_json is not None:
                atomic_write_json(tmp / rank_file(env.rank, env.world, rank_json[0]), rank_json[1](tmp / SHARDS_SUBDIR))
            st = global_sparse_state(sparse_local, starts) if sparse_local else {}
            atomic_write_bytes(tmp / shard_file(env.rank, env.world),
                               save(st, metadata={"format": CHECKPOINT_FORMAT, "rank": str(env.rank)}))  # fmt: skip

        env.on_all(mine)

        def finish() -> str:
            from engramlm.models.io import recorded_checksums

            atomic_write_json(tmp / MODEL_SUBDIR / "config.json", {
                "format": MODEL_FORMAT, "version": MODEL_VERSION, "hash_fingerprint": fingerprint,
                "model": model.config.to_dict(),
            })  # fmt: skip
            write_checksums(tmp / MODEL_SUBDIR)
            rng_doc, torch_rng = rng_state()
            atomic_write_bytes(tmp / OPTIM_NAME, save({**dense_optim, "rng/torch": torch_rng.clone()},
                                                      metadata={"format": CHECKPOINT_FORMAT}))  # fmt: skip
            known = {f"{MODEL_SUBDIR}/{k}": v for k, v in recorded_checksums(tmp / MODEL_SUBDIR).items()}
            files = {
                rel: known.get(rel) or sha256_file(f)
                for f in sorted(tmp.rglob("*"))
                if f.is_file() and (rel := str(f.relative_to(tmp)))
            }
            shards = {
                "world": env.world,
                "files": [shard_file(r, env.world) for r in range(env.world)],
                "bounds": {str(lid): list(s.bounds) for lid, s in tables.shards.items()} if tables else {},
            }
            if rank_json is not None:  # each rank's tables (manifests of its SSD tables), in rank order
                shards["tables_files"] = [rank_file(r, env.world, rank_json[0]) for r in range(env.world)]
            doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "rng": rng_doc,
                   "files": files, **state, "shards": shards}  # fmt: skip
            atomic_write_json(tmp / TRAINER_STATE, doc)
            for d in (tmp / MODEL_SUBDIR, tmp / SHARDS_SUBDIR, tmp):
                fsync_path(d)
            if final.exists():  # a re-run of the same step (e.g. resumed and re-saved): replace it
                _remove(final, root)
            os.rename(tmp, final)
            fsync_path(root)
            prune_checkpoints(run_dir, step, keep, tmp)
            return str(final)

        return Path(env.on_main(finish))
    except BaseException:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading -------------------------------------------------------------------------------------
def read_table_rows(model_dir: Path, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of table ``key`` in ``model_dir/model.safetensors``, reading only them."""
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        return f.get_slice(key)[start:stop].contiguous()


def sparse_state_range(
    ckpt_path: Path, state: dict[str, Any], optim: dict[str, torch.Tensor], lid: int, start: int, stop: int
) -> dict[str, torch.Tensor]:
    """A layer's sparse optimiser state for global rows ``[start, stop)`` (keys ``rows``, ``exp_avg``, ...;
    ``rows`` global), from a sharded checkpoint's shard files or a one-process checkpoint's ``optim`` tensors."""
    from safetensors import safe_open

    shards = state.get("shards")
    if not shards:  # one-process checkpoint: the whole state is in optimizer.safetensors, in slot order
        rows = optim[f"sparse/layer{lid}.rows"]
        keep = ((rows >= start) & (rows < stop)).nonzero().flatten()
        keep = keep[torch.argsort(rows[keep])]
        return {k: optim[f"sparse/layer{lid}.{k}"][keep].clone() for k in STATE_KEYS}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in STATE_KEYS}
    for rel in shards["files"]:
        with safe_open(str(ckpt_path / rel), framework="pt") as f:
            if f"layer{lid}.rows" not in f.keys():
                continue
            rows = f.get_tensor(f"layer{lid}.rows")
            i, j = (int(x) for x in np.searchsorted(rows.numpy(), [start, stop]))
            for k in STATE_KEYS:  # an empty slice too: it carries the row width
                parts[k].append(f.get_slice(f"layer{lid}.{k}")[i:j])
    if not parts["rows"]:
        return {"rows": torch.zeros(0, dtype=torch.int64), "exp_avg": torch.zeros(0, 0),
                "exp_avg_sq": torch.zeros(0, 0), "count": torch.zeros(0, dtype=torch.int64)}  # fmt: skip
    out = {k: torch.cat(v) for k, v in parts.items()}
    order = torch.argsort(out["rows"])  # shard files cover disjoint, increasing ranges: already sorted
    return {k: v[order] for k, v in out.items()}


def merged_sparse_state(ckpt_path: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All shard files' sparse state as one process's ``sparse/layer{lid}.*`` tensors (global row ids)."""
    from safetensors import safe_open

    lids: set[int] = set()
    for rel in state["shards"]["files"]:
        with safe_open(str(ckpt_path / rel), framework="pt") as f:
            lids.update(int(k[5:].split(".")[0]) for k in f.keys() if k.endswith(".rows"))
    out = {}
    for lid in sorted(lids):
        st = sparse_state_range(ckpt_path, state, {}, lid, 0, 1 << 62)
        for k, v in st.items():
            out[f"sparse/layer{lid}.{k}"] = v
    return out


def local_sparse_tensors(
    ckpt_path: Path, state: dict[str, Any], optim: dict[str, torch.Tensor], tables: ShardedTables, dim: dict[int, int]
) -> dict[str, torch.Tensor]:
    """``sparse/layer{lid}.*`` for this rank's shards, with local (0-based) row ids, for ``OptimizerSet``."""
    out = {}
    for lid, shard in tables.shards.items():
        st = sparse_state_range(ckpt_path, state, optim, lid, shard.start, shard.stop)
        if st["rows"].numel() == 0:
            st["exp_avg"] = st["exp_avg_sq"] = torch.zeros(0, dim[lid], dtype=tables.dtypes[lid])
        out[f"sparse/layer{lid}.rows"] = st["rows"] - shard.start
        for k in STATE_KEYS[1:]:
            out[f"sparse/layer{lid}.{k}"] = st[k]
    return out


def load_sharded_weights(model, model_dir: Path, tables: ShardedTables | None, *, rows: bool = True) -> None:
    """Load a saved model's dense weights into ``model`` and this rank's rows into ``tables.local`` (only
    those rows are read; ``rows=False``: the tables are on SSD and the file holds placeholders, read
    nothing of them); the hash fingerprint of the weights must be the model's."""
    from safetensors import safe_open

    from engramlm.errors import CorruptFileError, HashSpecMismatch

    weights = Path(model_dir) / "model.safetensors"
    table_keys = {v: k for k, v in tables.keys.items()} if tables is not None else {}
    state, found = {}, []
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                if key in table_keys:
                    found.append(key)
                    if not rows:
                        continue
                    shard = tables.shards[table_keys[key]]
                    tables.local[table_keys[key]] = f.get_slice(key)[shard.start : shard.stop].to(tables.env.device)
                else:
                    state[key] = f.get_tensor(key)
    except Exception as exc:
        raise CorruptFileError(f"{weights}: not a readable safetensors file: {exc}") from exc
    fingerprint = model.layout.fingerprint if model.layout is not None else NO_ENGRAM
    if meta.get("hash_fingerprint") != fingerprint:
        raise HashSpecMismatch(f"{weights} was written under hash fingerprint {meta.get('hash_fingerprint')!r}, "
                               f"this model's is {fingerprint!r}")  # fmt: skip
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in table_keys] + sorted(set(table_keys) - set(found))
    if missing or unexpected:
        raise CorruptFileError(f"{weights}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
