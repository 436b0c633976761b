"""Training on several processes under ``torchrun``: data-parallel backbone, row-sharded Engram tables.

Why this split: the backbone is small and dense, so every rank keeps a replica and averages gradients
(``DistributedDataParallel``); the Engram tables are large and a step touches few rows, so each rank owns
a contiguous row range of every table (:class:`~engramlm.dist.RowShard`) and the step's rows travel by
all-to-all (:class:`~engramlm.dist.ShardedEngramRows`). The tables are frozen for autograd and never
DDP parameters: the model keeps an empty ``[0, d]`` placeholder per table, the owner's rows live in
:class:`ShardedTables`, and the sparse row optimiser (``SparseRowAdam``) steps each owner's rows only.

DDP rather than FSDP2 ``fully_shard``: the replicated part is the small one (the tiny preset's backbone
is a few MB, the paper's 27B model keeps most parameters in the tables), so sharding it would add two
collectives per layer per step to save little memory; DDP overlaps its one bucketed all-reduce with the
backward. FSDP2 fits a backbone that itself outgrows a device, which is not the case this serves.

Exactness against one process: each rank reads a contiguous slice of every global batch (the batch is a
function of (seed, step), as in one process), the loss is the sum of the slice's token losses over the
*global* token count (all-reduced), and gradients are summed over ranks (DDP with :func:`sum_hook` for the
dense ones, the exchange for the rows); the gradient
norm adds the row grads' squares held by the owners (all-reduced) to the (identical) dense ones; MoE
expert counts are all-reduced before the bias update. Results differ from one process only by the order
of float sums.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engramlm.data.loader import EvalLoader
from engramlm.dist import RowShard, ShardedEngramRows
from engramlm.errors import ConfigError, EngramError
from engramlm.models.evaluate import eval_scope
from engramlm.models.model import EngramLM

T = TypeVar("T")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class PeerError(EngramError):
    """A collective step failed on another rank (its message is carried here)."""


@dataclass
class DistEnv:
    """This process's place in the job: rank, world, and the groups it talks on.

    ``exchange_group`` carries the row exchange, a group of its own so its all-to-alls never interleave
    with DDP's gradient all-reduces, which run from autograd hooks on the default group.
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    exchange_group: Any = None
    owns_init: bool = False  # we called init_process_group, so we tear it down

    @property
    def dp_group(self) -> Any:
        """The data-parallel group (every rank): DDP's all-reduce and Muon's shared Newton-Schulz."""
        return dist.group.WORLD

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> DistEnv | None:
        """The job torchrun started (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, world > 1), else None."""
        if not all(k in os.environ for k in LAUNCH_ENV) or int(os.environ["WORLD_SIZE"]) <= 1:
            return None
        dev = torch.device(device)
        local_rank = int(os.environ["LOCAL_RANK"])
        owns = False
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(local_rank)
                dev = torch.device("cuda", local_rank)
            # gloo on CPU, NCCL with CUDA devices; MASTER_ADDR/PORT come from torchrun (env://)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.new_group(), owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- small collectives -----------------------------------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) on the default group, in place; returns ``t``."""
        dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        return bool(self.sum(torch.tensor([int(flag)], dtype=torch.int64))[0])

    def barrier(self) -> None:
        dist.barrier()

    def gather_rows(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length on all), on every rank: one all-reduce of a [world, n] tensor."""
        t = torch.zeros(self.world, len(values), dtype=torch.float64)
        t[self.rank] = torch.tensor(values, dtype=torch.float64)
        return self.sum(t).tolist()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (JSON-able) to every rank; an error on rank 0
        is raised on every rank (a :class:`PeerError` elsewhere), so no rank waits for a peer that died."""
        box: list[Any] = [None]
        err: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as exc:  # re-raised below, after the peers have been told
                err, box[0] = exc, ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=0)
        if err is not None:
            raise err
        kind, value = box[0]
        if kind == "error":
            raise PeerError(f"rank 0 failed: {value}")
        return value

    def on_all(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it failed on any rank, raise on every rank."""
        err: BaseException | None = None
        result = None
        try:
            result = fn()
        except BaseException as exc:
            err = exc
        msgs: list[Any] = [None] * self.world
        dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if bad:
            raise PeerError(f"rank {bad[0][0]} failed: {bad[0][1]}")
        return result  # type: ignore[return-value]

    def close(self, barrier: bool = True) -> None:
        if self.owns_init and dist.is_initialized():
            if barrier:
                dist.barrier()  # no rank tears down gloo while a peer still talks to it
            dist.destroy_process_group()
            self.owns_init = False


def sum_hook(state, bucket):  # no annotations: DDP checks them, and `from __future__` makes them strings
    """DDP communication hook: sum the ranks' gradients (DDP's default averages them).

    Each rank's loss is already its share of the global-batch mean (its tokens' loss over the global token
    count), and the row gradients, which reach their owners through the exchange, are plain sums too.
    """
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def split_rows(n: int, env: DistEnv) -> tuple[int, int]:
    """This rank's contiguous share ``[lo, hi)`` of ``n`` batch rows (sizes differ by at most one)."""
    base, extra = divmod(n, env.world)
    return env.rank * base + min(env.rank, extra), (env.rank + 1) * base + min(env.rank + 1, extra)


@dataclass
class ShardedTables:
    """This rank's rows of every Engram table, cut from the model, which keeps empty placeholders.

    ``keys``: each table's name in the model's state dict; ``shapes``: the full tables' shapes.
    """

    env: DistEnv
    shards: dict[int, RowShard] = field(default_factory=dict)
    local: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)
    shapes: dict[int, tuple[int, int]] = field(default_factory=dict)
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)
    lookups: ShardedEngramRows | None = None
    # layer id -> a reader of local row ids when the rows live outside ``local`` (an SSD table per rank)
    readers: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None

    @classmethod
    def cut(cls, model: EngramLM, env: DistEnv, rows: dict[int, int] | None = None) -> ShardedTables:
        """Keep this rank's even share of each table; replace the model's tables by ``[0, d]`` placeholders.

        The full tables exist once per rank while the model is built (its initialisation draws them
        from the seeded RNG, the same values as one process), and are freed here. ``rows`` (layer -> row
        count): the model was built without tables (``nn.engram.external_tables``; its rows live elsewhere,
        e.g. SSD tables opened from a checkpoint): only the shards are set, ``local`` is empty.
        """
        out = cls(env)
        names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        for lid, blk in model.engram_layers.items():
            full = blk.embed.weight
            n = int(full.shape[0]) if rows is None else int(rows[lid])
            out.keys[lid] = names[id(full)]
            out.shapes[lid], out.dtypes[lid] = (n, int(full.shape[1])), full.dtype
            out.shards[lid] = RowShard.even(n, env.world, env.rank)
            if rows is None:
                out.local[lid] = out.shards[lid].take(full).to(env.device)
            else:
                out.local[lid] = full.new_empty(0, full.shape[1], device=env.device)
            blk.embed.weight = nn.Parameter(full.new_empty(0, full.shape[1]), requires_grad=False)
        return out

    def bind(self, gather_layer: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """Training lookups: the owner reads its rows through ``gather_layer`` (``SparseRowAdam.gather_layer``
        over :attr:`local`), so after backward it holds its rows' summed gradients and steps them."""
        dims = {lid: t.shape[1] for lid, t in self.local.items()}
        self.lookups = ShardedEngramRows(self.shards, dims, gather_layer, self.env.exchange_group)

    def eval_lookups(self) -> ShardedEngramRows:
        dims = {lid: t.shape[1] for lid, t in self.local.items()}
        readers = self.readers
        if readers is not None:
            return ShardedEngramRows(self.shards, dims, lambda lid, ids: readers[lid](ids.cpu()).to(self.env.device),
                                     self.env.exchange_group)  # fmt: skip
        return ShardedEngramRows(
            self.shards, dims, lambda lid, ids: F.embedding(ids.to(self.env.device), self.local[lid]),
            self.env.exchange_group,
        )  # fmt: skip

    def gather(self, row_ids: torch.Tensor, layer_ids: tuple[int, ...]) -> dict[int, torch.Tensor]:
        assert self.lookups is not None, "bind() first"
        return self.lookups.gather(row_ids, layer_ids)

    def step_stats(self) -> dict[str, float]:
        """This rank's exchange of the last step: bytes both ways (forward and backward), seconds, rows served."""
        stats = list(self.lookups.stats.values()) if self.lookups is not None else []
        return {
            "sent": float(sum(s.step_bytes_sent for s in stats)),
            "received": float(sum(s.step_bytes_received for s in stats)),
            "seconds": float(sum(s.forward_s + s.backward_s for s in stats)),
            "served": float(sum(s.rows_served for s in stats)),
        }

    @property
    def rows_per_rank(self) -> dict[str, list[int]]:
        return {str(lid): [s.bounds[r + 1] - s.bounds[r] for r in range(s.world)] for lid, s in self.shards.items()}


def check_world(batch_size: int, env: DistEnv) -> None:
    if batch_size < env.world:
        raise ConfigError(
            f"data.batch_size: {batch_size} rows cannot be split over {env.world} ranks; use at least {env.world}",
            "data.batch_size",
        )


@torch.no_grad()
def evaluate_sharded(
    model: EngramLM,
    loader: EvalLoader,
    tables: ShardedTables | None,
    env: DistEnv,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """:func:`engramlm.models.evaluate.evaluate` over ranks: each scores a contiguous slice of every batch,
    its rows fetched from their owners; NLL, tokens and bytes are summed over ranks (the same figures as
    one process, up to the order of float sums)."""
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    split = str(getattr(loader.dataset, "split", "?"))
    lookups = tables.eval_lookups() if tables is not None else None
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # nll, tokens, bytes
    batches = 0
    try:
        for batch in loader:
            if batches >= total:
                break
            lo, hi = split_rows(batch["input_ids"].shape[0], env)
            ids, doc = batch["input_ids"][lo:hi], batch["doc_start"][lo:hi]
            rows = None
            if lookups is not None:  # a collective: a rank with no rows of this batch still serves its peers
                rows = lookups.gather(batch["row_ids"][:, lo:hi], model.layout.layer_ids)
            if hi > lo:
                engram = model.engram_inputs(ids, doc, rows=rows) if rows is not None else None
                out = model(ids.to(env.device), engram=engram) if engram is not None else model(ids.to(env.device))
                logits = out.logits.float()
                losses = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch["targets"][lo:hi].reshape(-1).to(logits.device),
                    reduction="none",
                )  # fmt: skip
                mask = batch["loss_mask"][lo:hi].reshape(-1).to(logits.device)
                sums[0] += float(losses[mask].double().sum())
                sums[1] += int(mask.sum())
                sums[2] += int(batch["target_bytes"][lo:hi].sum())
            batches += 1
            if batches >= total:
                break
    finally:
        model.train(was_training)
    nll, n_tok, n_bytes = env.sum(sums).tolist()
    return {
        "loss": nll / max(n_tok, 1),
        "bpb": nll / (math.log(2) * max(n_bytes, 1)),
        "tokens": int(n_tok),
        "bytes": int(n_bytes),
        "full_sweep": batches == len(loader),
        "batches": batches,
        "split": split,
        "scope": eval_scope(split, batches, len(loader)),
    }


class Timer:
    """Seconds spent in explicit collectives of a step (the small all-reduces outside the exchange)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def timed(t: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return fn(t)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed
