"""Training with the Engram tables on SSD (``engram.table_tier=ssd``): the glue between the trainer, the sparse
optimizer and :class:`engramlm.store.trainable.TrainableTable`.

* :class:`SsdRowState` is the SSD :class:`~engramlm.train.sparse_adam.RowStateBackend`: the optimizer reads a
  step's records (row + m + v + count) and writes the updated ones back; the Adam math stays in
  :class:`~engramlm.train.sparse_adam.SparseRowAdam`, so RAM and SSD training are bit-identical.
* :class:`SsdTables` owns every layer's table of a run (``OUT_DIR/engram_tables/layer_NNN/``): creation with
  the model's exact init (streamed, :func:`engramlm.nn.engram.stream_table_init`), opening from a checkpoint,
  deterministic prefetch and checkpoint manifests.

**Prefetch.** Batches are a function of (seed, step), so while step t computes, a background thread builds
batch t+1 (hashing its row ids) and brings its rows into the cache, minus the rows step t will rewrite (those
are taken from the cache after step t's write-back, never from a stale disk copy). The next gather waits for
it; the wait is reported per step (``ssd_wait_ms``). Correctness does not depend on timing: a row missing
from the cache is read synchronously.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engramlm.errors import ConfigError
from engramlm.models.model import EngramLM
from engramlm.nn.engram import external_tables, stream_table_init
from engramlm.store.trainable import (
    TABLES_FILE,
    TrainableTable,
    checkpoint_table_parts,
    collect_garbage,
    copy_records,
    link_table_files,
    manifest_files,
    read_tables_doc,
    tables_doc,
)
from engramlm.train.config import EngramTableConfig
from engramlm.train.sparse_adam import RowBatch

TABLES_DIR = "engram_tables"


class SsdRowState:
    """A :class:`RowStateBackend` over one :class:`TrainableTable`; ``tick`` (the step) orders evictions."""

    def __init__(self, table: TrainableTable) -> None:
        self.table = table
        self.tick = 0

    def read(self, unique: torch.Tensor) -> RowBatch:
        return RowBatch(*self.table.layout.unpack(self.table.read(unique.numpy(), self.tick)))

    def write(self, unique: torch.Tensor, batch: RowBatch) -> None:
        rec = self.table.layout.pack(batch.rows, batch.exp_avg, batch.exp_avg_sq, batch.count)
        self.table.write(unique.numpy(), rec, self.tick)


def _shares(num_rows: dict[int, int], cache_bytes: int) -> dict[int, int]:
    total = sum(num_rows.values()) or 1
    return {lid: max(1, cache_bytes * n // total) for lid, n in num_rows.items()}


class SsdTables:
    """Every Engram layer's SSD table of one run, with prefetch and checkpoint manifests."""

    def __init__(self, run_dir: Path, cfg: EngramTableConfig, tables: dict[int, TrainableTable]) -> None:
        self.run_dir, self.cfg, self.tables = Path(run_dir), cfg, tables
        self.backends = {lid: SsdRowState(t) for lid, t in tables.items()}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-ssd-prefetch")  # one long-lived worker
        self._future: Future | None = None
        self._next: tuple[int, dict[str, Any]] | None = None
        self.last_wait_s = 0.0

    # ---- building ------------------------------------------------------------------------------
    @staticmethod
    def table_dir(run_dir: Path, lid: int, sub: str = "") -> Path:
        """``OUT_DIR/engram_tables/[sub/]layer_NNN``; ``sub`` is a rank's own directory under torchrun."""
        return Path(run_dir) / TABLES_DIR / sub / f"layer_{lid:03d}"

    @classmethod
    def from_shards(
        cls, run_dir: Path, cfg: EngramTableConfig, local: dict[int, torch.Tensor], fingerprint: str, sub: str
    ) -> SsdTables:
        """A rank's tables under torchrun: one :class:`TrainableTable` per layer over only this rank's row range
        (``local``: its rows, cut from the seeded init; ids in the table are local, global id - shard start)."""
        shares = _shares({lid: int(t.shape[0]) for lid, t in local.items()}, int(cfg.cache_mb * 2**20))
        tables: dict[int, TrainableTable] = {}
        try:
            for lid, rows in sorted(local.items()):

                def init(write, rows: torch.Tensor = rows) -> None:
                    for first in range(0, rows.shape[0], 8192):  # a few MiB a block, as new_model's init
                        write(first, rows[first : first + 8192])

                tables[lid] = TrainableTable.create(
                    cls.table_dir(run_dir, lid, sub), int(rows.shape[0]), int(rows.shape[1]), fingerprint, init,
                    cache_bytes=shares[lid], direct=cfg.direct_io,
                )  # fmt: skip
        except BaseException:
            for t in tables.values():
                t.close()
            raise
        return cls(run_dir, cfg, tables)

    @classmethod
    def new_model(cls, run_dir: Path, cfg: EngramTableConfig, model_cfg, layout) -> tuple[EngramLM, SsdTables]:
        """The model as ``EngramLM(model_cfg, layout)`` would build it, its tables written to SSD instead of RAM
        (same RNG draws, so the same initial rows and the same init of every other parameter)."""
        lids = sorted(layout.layer_ids)
        rows = {lid: layout.rows_of(lid) for lid in lids}
        shares = _shares(rows, int(cfg.cache_mb * 2**20))
        tables: dict[int, TrainableTable] = {}
        made = iter(lids)

        def sink(num_rows: int, dim: int, std: float) -> None:
            lid = next(made)
            tables[lid] = TrainableTable.create(
                cls.table_dir(run_dir, lid),
                num_rows,
                dim,
                layout.fingerprint,
                # 8192 rows a chunk: the init's buffers stay a few MiB whatever the table's size
                lambda write: stream_table_init(num_rows, dim, std, write, chunk_rows=8192),
                cache_bytes=shares[lid],
                direct=cfg.direct_io,
            )

        try:
            with external_tables(sink):
                model = EngramLM(model_cfg, layout)
        except BaseException:
            for t in tables.values():
                t.close()
            raise
        return model, cls(run_dir, cfg, tables)

    @classmethod
    def from_checkpoint(
        cls,
        run_dir: Path,
        cfg: EngramTableConfig,
        ckpt_dir: Path,
        fingerprint: str,
        doc: str = TABLES_FILE,
        sub: str = "",
    ) -> SsdTables:
        """Open the tables at the state a checkpoint's ``engram_tables.json`` records (checked, see the store);
        ``doc``: that file's path in the checkpoint (a rank's own under torchrun), ``sub``: this rank's table
        directory. A checkpoint of another run directory has its table files hard-linked (or copied) into this
        run's ``engram_tables/`` first: a session writes its logs, compactions and garbage collection only in its
        own run, and the other run can move or be overwritten without breaking this one."""
        entries = read_tables_doc(Path(ckpt_dir) / doc)
        own = (Path(run_dir) / TABLES_DIR).resolve()
        for lid, (d, man) in list(entries.items()):
            if not d.is_relative_to(own):
                here = cls.table_dir(run_dir, lid, sub)
                link_table_files(d, here, manifest_files(man))
                entries[lid] = (here, man)
        shares = _shares({lid: int(m["num_rows"]) for lid, (_, m) in entries.items()}, int(cfg.cache_mb * 2**20))
        tables: dict[int, TrainableTable] = {}
        try:
            for lid, (d, man) in sorted(entries.items()):
                tables[lid] = TrainableTable.open(d, man, fingerprint, cache_bytes=shares[lid], direct=cfg.direct_io)
        except BaseException:
            for t in tables.values():
                t.close()
            raise
        return cls(run_dir, cfg, tables)

    @classmethod
    def resharded(
        cls,
        run_dir: Path,
        cfg: EngramTableConfig,
        ckpt_dir: Path,
        fingerprint: str,
        ranges: dict[int, tuple[int, int]],
        sub: str = "",
    ) -> SsdTables:
        """New tables over global rows ``ranges[lid] = [start, stop)`` (this rank's shard, or the whole table for
        one process) from a checkpoint written by another world size: each table's records (rows with their Adam
        state) are streamed block by block from the saved tables whose ranges overlap (one rank's table, or
        several) into a fresh base in this run's ``engram_tables/[sub/]layer_NNN/``; no table is ever whole in
        RAM. The saved tables are only read, so the checkpoint stays valid for any world size."""
        parts = checkpoint_table_parts(ckpt_dir)
        if sorted(parts) != sorted(ranges):
            raise ConfigError(
                f"checkpoint {ckpt_dir} holds SSD tables for Engram layers {sorted(parts)}, this model has "
                f"{sorted(ranges)}",
                "engram.table_tier",
            )
        for lid, (_, stop) in ranges.items():
            total = parts[lid][-1].stop
            if stop > total:
                raise ConfigError(f"checkpoint {ckpt_dir}: layer {lid} saved {total} rows, this model has more",
                                  "engram.table_tier")  # fmt: skip
        shares = _shares({lid: b - a for lid, (a, b) in ranges.items()}, int(cfg.cache_mb * 2**20))
        tables: dict[int, TrainableTable] = {}
        try:
            for lid, (start, stop) in sorted(ranges.items()):
                dim = int(parts[lid][0].manifest["dim"])
                blocks = copy_records(parts[lid], start, stop, fingerprint)
                tables[lid] = TrainableTable.from_records(
                    cls.table_dir(run_dir, lid, sub), stop - start, dim, fingerprint, blocks,
                    cache_bytes=shares[lid], direct=cfg.direct_io,
                )  # fmt: skip
        except BaseException:
            for t in tables.values():
                t.close()
            raise
        return cls(run_dir, cfg, tables)

    # ---- per step ------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        for b in self.backends.values():
            b.tick = step

    def take_batch(self, step: int) -> dict[str, Any] | None:
        """Wait for the prefetch; the batch it built if it was for ``step``. Sets ``last_wait_s``."""
        t0 = time.perf_counter()
        self.wait()
        self.last_wait_s = time.perf_counter() - t0
        nxt, self._next = self._next, None
        return nxt[1] if nxt is not None and nxt[0] == step else None

    def start_prefetch(
        self,
        step: int,
        make_batch,
        layer_ids: tuple[int, ...],
        current: dict[int, torch.Tensor],
        shards: dict[int, tuple[int, int]] | None = None,
    ):
        """In the background: batch ``step`` = ``make_batch(step)``, then its rows minus ``current`` (layer ->
        the running step's unique ids) into the cache. ``shards`` (torchrun): layer -> this rank's global row
        range ``[start, stop)``; ``make_batch`` then gives the global batch, whose rows in the range (shifted to
        local ids) are the ones this rank will serve."""
        if not self.cfg.prefetch:
            return
        skip = {lid: u.numpy() for lid, u in current.items()}

        def run() -> None:
            batch = make_batch(step)
            ids = batch["row_ids"]
            for li, lid in enumerate(layer_ids):
                want = np.unique(ids[li].numpy().astype(np.int64, copy=False))
                if shards is not None:
                    lo, hi = shards[lid]
                    want = want[(want >= lo) & (want < hi)] - lo
                self.tables[lid].prefetch(want, skip.get(lid), tick=step)
            self._next = (step, batch)

        self._future = self._pool.submit(run)

    def wait(self) -> None:
        """Block until the prefetch in flight (if any) is done; its error, if any, is raised here."""
        fut, self._future = self._future, None
        if fut is not None:
            fut.result()

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint_doc(self, ckpt_tmp: Path) -> dict[str, Any]:
        """Flush every table and return the JSON the checkpoint stores; ``ckpt_tmp`` is where it will sit (paths
        are relative to the final directory, a sibling of the temp one).

        Compaction: a table whose logs outgrew ``compact_ratio`` x its base starts a background compaction after
        this flush (``compact_background``; the manifest just taken still names the old files, which the thread
        only reads); the first checkpoint after it completed switches to its base before flushing. Without
        ``compact_background`` the compaction runs here."""
        self.wait()  # no prefetch in flight: a switch renumbers the tables' files
        manifests = {}
        for lid, t in self.tables.items():
            t.finish_compaction()
            man = t.flush()
            if t.log_bytes > self.cfg.compact_ratio * t.base_bytes:
                if self.cfg.compact_background:
                    t.start_compaction()  # no-op while one is in flight
                else:
                    man = t.compact()
            manifests[lid] = man
        dirs = {lid: t.directory for lid, t in self.tables.items()}
        return tables_doc(manifests, dirs, ckpt_tmp)

    def collect_garbage(self, checkpoints: list[Path], doc: str = TABLES_FILE) -> None:
        """Delete table files that neither a retained checkpoint (its ``doc``) nor the open tables use."""
        keep: dict[int, set[str]] = {lid: set(t.files()) for lid, t in self.tables.items()}
        for c in checkpoints:
            f = c / doc
            if f.is_file():
                for lid, (_, man) in read_tables_doc(f).items():
                    keep.setdefault(lid, set()).update(manifest_files(man))
        own = (self.run_dir / TABLES_DIR).resolve()
        for lid, t in self.tables.items():
            if t.directory.resolve().is_relative_to(own):  # only this run's files (from_checkpoint links others in)
                collect_garbage(t.directory, keep[lid])

    def collect_table_dirs(self, checkpoints: list[Path]) -> list[Path]:
        """Delete whole table directories of this run that no retained checkpoint names and no open table uses:
        those of an earlier world size once every checkpoint it wrote was pruned (a re-sharded resume writes new
        per-rank tables beside the old). Called by one process (rank 0) after a save: the tables every rank has
        open are named by the checkpoint just saved."""
        import shutil

        from engramlm.errors import CorruptFileError
        from engramlm.store.trainable import checkpoint_table_docs

        root = (self.run_dir / TABLES_DIR).resolve()
        if not root.is_dir():
            return []
        named = {t.directory.resolve() for t in self.tables.values()}
        for c in checkpoints:
            for doc in checkpoint_table_docs(c):
                try:
                    named.update(d for d, _ in read_tables_doc(doc).values())
                except CorruptFileError:
                    return []  # an unreadable checkpoint: delete nothing it might name
        found = [*root.glob("layer_*"), *root.glob("rank*-of-*/layer_*")]
        removed = [d for d in found if d.is_dir() and d.resolve() not in named]
        for d in removed:
            shutil.rmtree(d)
        for sub in root.glob("rank*-of-*"):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        return removed

    def io_stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tables.values():
            for k, v in t.io.items():
                out[k] = out.get(k, 0) + v
            out["cache_hits"] = out.get("cache_hits", 0) + t.stats.hits
            out["cache_misses"] = out.get("cache_misses", 0) + t.stats.misses
        return out

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
            for t in self.tables.values():
                t.close()
