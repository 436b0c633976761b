"""Row-sharded Engram tables: each rank owns a contiguous row range, lookups travel by all-to-all.

Why: an Engram table can outgrow one device's memory, and a step touches few of its rows. Sharding
by contiguous row range makes the owner of an id one ``searchsorted`` over the range starts, and a
lookup moves only the batch's unique rows: no rank holds a full table, a full row gradient or a full
optimizer state.

:func:`exchange_rows` is the one collective: every rank of the group must call it together, with
any number of ids (none included). Forward: deduplicate the ids, send each unique id to its owner
(``all_to_all_single`` of counts, then ids), the owner reads them through ``local_rows`` (its shard,
or a differentiable gather such as the sparse optimizer's), and the rows come back the same way.
Backward is the same path reversed inside an autograd function: the row gradients go to the owners,
and the owner's ``local_rows`` graph (``F.embedding`` over a leaf) sums duplicates from all ranks.
Works with gloo on CPU and NCCL on GPU: counts, ids and rows live on ``device``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

LocalRows = Callable[[torch.Tensor], torch.Tensor]
"""Owner-side read: local row ids [N] (0-based within the shard, repeats allowed) -> rows [N, d]."""


def shard_ranges(num_rows: int, world: int) -> tuple[int, ...]:
    """Boundaries ``b`` (length ``world + 1``) of the default split: rank r owns rows ``[b[r], b[r+1])``.

    Ranges differ by at most one row; the first ``num_rows % world`` ranks get the extra row.
    """
    if isinstance(num_rows, bool) or int(num_rows) != num_rows or num_rows < 0:
        raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
    if isinstance(world, bool) or int(world) != world or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    base, extra = divmod(int(num_rows), int(world))
    bounds = [0]
    for r in range(int(world)):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return tuple(bounds)


@dataclass(frozen=True)
class RowShard:
    """Rank ``rank``'s share of a table of ``bounds[-1]`` rows: ``[bounds[rank], bounds[rank+1])``.

    ``bounds`` (non-decreasing, from 0, one more entry than ranks) may be uneven, an empty range included.
    """

    bounds: tuple[int, ...]
    rank: int

    def __post_init__(self) -> None:
        b = tuple(int(x) for x in self.bounds)
        if len(b) < 2 or b[0] != 0 or any(hi < lo for lo, hi in itertools.pairwise(b)):
            raise ValueError(
                f"bounds must start at 0, be non-decreasing and have world+1 >= 2 entries, got {self.bounds!r}"
            )
        if not 0 <= int(self.rank) < len(b) - 1:
            raise ValueError(f"rank must lie in [0, {len(b) - 1}), got {self.rank!r}")
        object.__setattr__(self, "bounds", b)
        object.__setattr__(self, "rank", int(self.rank))

    @classmethod
    def even(cls, num_rows: int, world: int, rank: int) -> RowShard:
        return cls(shard_ranges(num_rows, world), rank)

    @property
    def world(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_rows(self) -> int:
        """Rows of the whole table."""
        return self.bounds[-1]

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        """Owning rank of each global id (in range)."""
        starts = torch.tensor(self.bounds[1:-1], dtype=torch.int64, device=ids.device)
        return torch.searchsorted(starts, ids, right=True)

    def take(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``table`` [num_rows, d], as a copy (for building shards and tests)."""
        if table.shape[0] != self.num_rows:
            raise ValueError(f"table has {table.shape[0]} rows, the shard bounds describe {self.num_rows}")
        return table.detach()[self.start : self.stop].clone()


class _AllToAllRows(torch.autograd.Function):
    """Rows [sum(in_splits), d] -> [sum(out_splits), d]; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats=None):  # type: ignore[override]
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        out = x.new_empty(sum(out_splits), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        t0 = time.perf_counter()
        back = grad.new_empty(sum(in_splits), grad.shape[1])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        if ctx.stats is not None:
            ctx.stats.backward_s += time.perf_counter() - t0
        return back, None, None, None, None


@dataclass
class ExchangeStats:
    """Counts of one rank's last exchange (rows sent to owners and served to requesters, and the bytes)."""

    ids_requested: int = 0
    unique_requested: int = 0
    rows_served: int = 0
    bytes_sent: int = 0  # ids out + served rows out, forward only (backward sends the same row bytes back)
    row_bytes: int = 0  # bytes of one row (d * element size)
    world: int = 1
    forward_s: float = 0.0  # wall time in the forward's collectives (counts, ids, rows)
    backward_s: float = 0.0  # wall time in the backward's row-gradient exchange (set by autograd)

    @property
    def bytes_received(self) -> int:
        """Forward: the ids peers asked for, and the rows that came back."""
        return self.rows_served * 8 + self.unique_requested * self.row_bytes

    @property
    def step_bytes_sent(self) -> int:
        """Forward and backward: counts, ids, served rows, then the gradients of the rows received."""
        return 8 * self.world + self.bytes_sent + self.unique_requested * self.row_bytes

    @property
    def step_bytes_received(self) -> int:
        """Forward and backward: counts, asked ids, rows back, then the gradients of the rows served."""
        return 8 * self.world + self.bytes_received + self.rows_served * self.row_bytes


def exchange_rows(
    ids: torch.Tensor,
    shard: RowShard,
    local_rows: torch.Tensor | LocalRows,
    *,
    dim: int | None = None,
    group: dist.ProcessGroup | None = None,
    stats: ExchangeStats | None = None,
) -> torch.Tensor:
    """Rows ``[*ids.shape, d]`` of the sharded table for global row ids (a collective of ``group``).

    ``local_rows`` is this rank's shard [size, d] (read by plain indexing) or a :data:`LocalRows`
    callable (then give ``dim``); its gradient, if any, arrives through the reverse exchange.
    """
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"row ids must be an integer tensor, got {ids.dtype}")
    if isinstance(local_rows, torch.Tensor):
        table = local_rows
        if table.dim() != 2 or table.shape[0] != shard.size:
            raise ValueError(f"local table must be [{shard.size}, d] for rows [{shard.start}, {shard.stop}), "
                             f"got {tuple(table.shape)}")  # fmt: skip
        dim, device = table.shape[1], table.device
        read: LocalRows = lambda local: F.embedding(local, table)  # noqa: E731
    else:
        if dim is None:
            raise ValueError("dim is required when local_rows is a callable")
        read, device = local_rows, ids.device
    world = dist.get_world_size(group)
    if world != shard.world:
        raise ValueError(f"the shard bounds describe {shard.world} ranks, the process group has {world}")
    t0 = time.perf_counter()
    flat = ids.reshape(-1).to(device, torch.int64)
    unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    if unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) >= shard.num_rows):
        raise IndexError(f"row ids must lie in [0, {shard.num_rows}); got min {int(unique[0])}, max {int(unique[-1])}")
    bounds = torch.tensor(shard.bounds, dtype=torch.int64, device=device)
    edges = torch.searchsorted(unique, bounds)  # sorted ids are grouped by owner already
    send_counts = (edges[1:] - edges[:-1]).contiguous()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    asked = unique.new_empty(sum(recv))
    dist.all_to_all_single(asked, unique, recv, send, group=group)
    t_read = time.perf_counter()
    served = read(asked - shard.start)  # [sum(recv), d], owner side
    if served.shape != (asked.numel(), dim):
        raise ValueError(f"local_rows returned {tuple(served.shape)}, expected ({asked.numel()}, {dim})")
    t_rows = time.perf_counter()
    rows = _AllToAllRows.apply(served, send, recv, group, stats)  # [U, d] in unique order
    if stats is not None:
        stats.ids_requested, stats.unique_requested, stats.rows_served = flat.numel(), unique.numel(), asked.numel()
        stats.bytes_sent = unique.numel() * 8 + served.numel() * served.element_size()
        stats.row_bytes, stats.world = int(dim) * served.element_size(), world
        stats.forward_s, stats.backward_s = (t_read - t0) + (time.perf_counter() - t_rows), 0.0
    # F.embedding, not rows[inverse]: deterministic CPU backward (as SparseRowAdam.gather)
    return F.embedding(inverse, rows).reshape(*ids.shape, dim)


def sum_gradients(params: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """All-reduce (sum) the ``.grad`` of replicated dense parameters, flattened into one buffer.

    With each rank's loss scaled by its share of the global token count, the sum is the gradient
    of the global-batch mean loss (what one process computes on the whole batch).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
