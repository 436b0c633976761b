"""Sharded Engram tables on top of :func:`~engramlm.dist.rows.exchange_rows`.

* :class:`ShardedRowTable` is a :class:`~engramlm.store.base.RowTable` over the whole table whose
  rows live on their owners: this rank's rows are any tier (memory, mmap, ...), so tiers and
  analysis work per shard unchanged, and ``gather`` becomes a collective (every rank calls it).
* :class:`ShardedEngramRows` serves training: for each Engram layer, ``gather`` turns the batch's
  row ids into ``engram_rows`` for the forward, reading the owner's rows through a caller-given
  differentiable ``local_rows`` (e.g. a per-layer ``SparseRowAdam.gather`` over the shard), so after
  ``backward`` each owner holds the summed gradient of its requested rows and steps them itself.
  This layer sits below ``train``: it never imports the optimizer, the trainer passes it in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from engramlm.dist.rows import ExchangeStats, RowShard, exchange_rows
from engramlm.store.base import RowTable, TableHeader


class ShardedRowTable(RowTable):
    """The whole [num_rows, dim] table, read through this rank's shard ``local`` and its peers'."""

    def __init__(
        self,
        header: TableHeader,
        shard: RowShard,
        local: RowTable,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(header)
        if shard.num_rows != header.num_rows:
            raise ValueError(f"shard bounds describe {shard.num_rows} rows, the table header {header.num_rows}")
        if local.num_rows != shard.size or local.dim != header.dim:
            raise ValueError(
                f"local shard table is [{local.num_rows}, {local.dim}], expected [{shard.size}, {header.dim}] "
                f"(rows [{shard.start}, {shard.stop}) of the table)"
            )
        self.shard, self.local, self.group = shard, local, group
        self.exchange = ExchangeStats()

    @property
    def io_thread_ids(self) -> list[int]:
        return self.local.io_thread_ids

    def set_io_cpus(self, cpus: Iterable[int] | None) -> None:
        super().set_io_cpus(cpus)
        self.local.set_io_cpus(self.io_cpus)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        return self._exchange(ids)

    def _exchange(self, ids: torch.Tensor) -> torch.Tensor:
        def read(local: torch.Tensor) -> torch.Tensor:
            return self.local.gather(local.cpu()) if local.numel() else torch.empty(0, self.dim)

        with torch.no_grad():
            return exchange_rows(ids, self.shard, read, dim=self.dim, group=self.group, stats=self.exchange)

    def gather(self, row_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`RowTable.gather`, but a collective: a rank with no ids still serves its peers."""
        ids = torch.as_tensor(row_ids)
        if ids.numel():
            return super().gather(ids, out)
        rows = self._exchange(ids.reshape(-1).long())
        return rows.reshape(*ids.shape, self.dim) if out is None else out

    def close(self) -> None:
        self.local.close()


class ShardedEngramRows:
    """Training-side lookups of every Engram layer's sharded table.

    ``shards`` maps layer id -> :class:`RowShard` (this rank's range of that layer's table) and
    ``local_rows(layer_id, local_ids [N]) -> rows [N, d]`` reads the owner's rows, differentiably
    when the owner will step them.
    """

    def __init__(
        self,
        shards: Mapping[int, RowShard],
        dims: Mapping[int, int],
        local_rows: Callable[[int, torch.Tensor], torch.Tensor],
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if set(shards) != set(dims):
            raise ValueError(f"shards cover layers {sorted(shards)}, dims cover {sorted(dims)}")
        self.shards, self.dims, self.local_rows, self.group = dict(shards), dict(dims), local_rows, group
        self.stats = {lid: ExchangeStats() for lid in self.shards}

    def gather(self, row_ids: torch.Tensor, layer_ids: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """``engram_rows`` (layer id -> [B, T, H_e, d]) from row ids [L, B, T, H_e], L in ``layer_ids`` order."""
        if row_ids.shape[0] != len(layer_ids):
            raise ValueError(f"row_ids has {row_ids.shape[0]} layers, layer_ids names {len(layer_ids)}")
        out = {}
        for li, lid in enumerate(layer_ids):
            out[lid] = exchange_rows(
                row_ids[li],
                self.shards[lid],
                lambda local, lid=lid: self.local_rows(lid, local),
                dim=self.dims[lid],
                group=self.group,
                stats=self.stats[lid],
            )
        return out

    @property
    def bytes_sent(self) -> int:
        """Forward bytes this rank sent in its last ``gather`` (ids + served rows; backward sends the rows again)."""
        return sum(s.bytes_sent for s in self.stats.values())
