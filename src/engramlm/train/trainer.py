"""The training loop: batch -> sparse row gather -> forward/backward -> clip -> step -> log/eval/checkpoint.

Each step is a pure function of (weights, optimiser state, step): the batch is
``BatchLoader.batch_at(step)``, the LR is ``lr_multiplier(step)`` and nothing draws random
numbers, so a run resumed from any checkpoint reproduces the uninterrupted run's losses bit for
bit on CPU (same thread count). Per step: the loader hashes the batch's row ids in the input
pipeline; :class:`SparseRowAdam` gathers the rows the batch uses into a leaf tensor passed as
``engram_rows``; after backward the global grad norm (dense and row grads) is clipped; Muon,
AdamW and the sparse Adam step; MoE layers nudge their routing bias (aux-loss-free balancing).

Under ``torchrun`` (world > 1) the same loop runs on every rank with the backbone in DDP and the Engram
tables sharded by row (:mod:`engramlm.train.distributed`, :mod:`engramlm.train.shard_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engramlm.data.build import prepare
from engramlm.data.dataset import TokenDataset
from engramlm.data.loader import BatchLoader, EvalLoader
from engramlm.errors import ConfigError, CorruptFileError, EngramError
from engramlm.models.accounting import count_parameters
from engramlm.models.build import build_layout
from engramlm.models.evaluate import evaluate
from engramlm.models.io import load_pretrained
from engramlm.models.model import EngramLM
from engramlm.nn.moe import MoE
from engramlm.train.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint
from engramlm.train.config import EngramTableConfig, TrainConfig, complete_saved_config, config_diff
from engramlm.train.distributed import DistEnv, ShardedTables, Timer, check_world, evaluate_sharded, sum_hook
from engramlm.train.metrics import MetricsLogger
from engramlm.train.optim import OptimizerSet
from engramlm.train.rundir import RunDir
from engramlm.train.schedule import lr_multiplier
from engramlm.train.shard_checkpoint import load_sharded_weights, local_sparse_tensors, save_sharded_checkpoint
from engramlm.train.ssd import SsdTables
from engramlm.utils.io import atomic_write_json

# Config paths that may differ between a checkpoint and the run resuming it: they do not change the
# training trajectory (the data itself is checked by content hash and tokenizer sha256 instead of by path).
RESUME_FREE = (
    "progress", "tensorboard", "threads", "keep_checkpoints", "out_dir", "log_every", "checkpoint_every",
    "skip_nonfinite",  # only acts on a NaN/inf step, which would otherwise stop the run: the remedy on resume
    "eval_every", "data.dir", "data.source", "data.eval_split", "data.eval_batch_size", "data.eval_max_batches",
    # only used to prepare data from ``data.source``; the tokenizer sha256 check below catches a real change
    "data.vocab_size", "data.max_bytes",
    # where the tables' hot rows are cached and how they are read: bit-identical training either way
    "engram.cache_mb", "engram.prefetch", "engram.compact_ratio",
    "engram.compact_background", "engram.direct_io",
)  # fmt: skip


def _at(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def open_dataset(data_dir: Path, split: str) -> TokenDataset:
    if not (data_dir / "manifest.json").is_file():
        raise ConfigError(
            f"data.dir: {data_dir} is not a prepared corpus (no manifest.json); run `engramlm data prepare`"
        )
    return TokenDataset(data_dir, split)


def model_for_data(config_model, data_dir: Path, train_set: TokenDataset) -> tuple[Any, Any]:
    """(model config, hash layout or None) checked against the prepared data's tokenizer."""
    if config_model.vocab_size < train_set.vocab_size:
        raise ConfigError(
            f"model.overrides.vocab_size: {config_model.vocab_size} is smaller than the data's tokenizer "
            f"({train_set.vocab_size} ids); set model.overrides.vocab_size={train_set.vocab_size}"
        )
    layout = None
    if config_model.engram is not None:
        layout = build_layout(config_model, config_model.engram.tokenizer or data_dir / "tokenizer.json")
    return config_model, layout


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)  # stdout carries the JSON summary


class TrainingDiverged(EngramError):
    """The loss or the gradient norm became NaN/inf; nothing of that step was saved."""


class TrainingInterrupted(EngramError):
    """A stop was requested (Ctrl-C in the CLI); ``checkpoint`` holds the state at ``step``."""

    def __init__(self, step: int, checkpoint: Path | None, run_dir: Path) -> None:
        self.step, self.checkpoint, self.run_dir = step, checkpoint, run_dir
        super().__init__(f"interrupted at step {step}; checkpoint {checkpoint}")


class Trainer:
    """Train a model per a :class:`TrainConfig`; ``resume`` = True (latest in out_dir) or a path.

    The run directory is locked from construction to the end of :meth:`fit` (:class:`RunDir`): a
    directory that already holds a run is refused unless resuming, or ``overwrite`` (old run moved
    aside to ``OUT_DIR.old-<time>/``). Use as a context manager, or :meth:`close`, to release early.
    ``allow_changes``: config paths that may differ from the resumed checkpoint's beyond
    :data:`RESUME_FREE` (e.g. ``optim.lr`` after a divergence; the run then no longer reproduces).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool | str | Path = False,
        overwrite: bool = False,
        allow_changes: tuple[str, ...] = (),
    ) -> None:
        # under torchrun (several processes): one rank each, rank 0 owns the run directory and the logs
        self.dist = DistEnv.from_env()
        self.main = self.dist is None or self.dist.is_main
        self.run: RunDir | None = None
        self._stop_requested = False
        self.allow_changes = tuple(allow_changes)
        self.skipped = 0  # non-finite steps skipped so far (config.skip_nonfinite), kept in checkpoints
        self.tables: ShardedTables | None = None
        self.ssd: SsdTables | None = None
        self.ddp: torch.nn.Module | None = None
        try:
            self._on_main(self._lock_run_dir, config.out_dir)  # lock + orphan cleanup before anything reads it
            self._setup(config, resume, overwrite)
        except BaseException:
            self.close(clean=False)
            raise

    def _lock_run_dir(self, out_dir: str) -> None:
        self.run = RunDir(out_dir, log=_log)

    def _on_main(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the process that owns the run directory (rank 0, or the only one); its result
        and any error reach every rank."""
        if self.dist is None:
            return fn(*args)
        return self.dist.on_main(lambda: fn(*args))

    def _close_run(self) -> None:
        if self.run is not None:
            self.run.close()

    def _setup(self, config: TrainConfig, resume: bool | str | Path, overwrite: bool) -> None:
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir = Path(config.out_dir)
        self.data_dir = Path(config.data.dir)
        if config.data.source is not None:

            def prepare_data() -> None:  # one writer; the other ranks wait for it
                prepare(
                    config.data.source,
                    self.data_dir,
                    config.data.vocab_size,
                    max_bytes=config.data.max_bytes,
                    progress=config.progress,
                    log=lambda msg: print(msg, file=sys.stderr),  # stdout carries the JSON summary
                )

            self._on_main(prepare_data)
        self.train_set = open_dataset(self.data_dir, "train")
        self.eval_set = open_dataset(self.data_dir, config.data.eval_split)
        model_cfg, layout = model_for_data(config.model.resolve(), self.data_dir, self.train_set)
        self.model_config = model_cfg
        ckpt: Checkpoint | None = None
        if self.dist is not None:
            check_world(config.data.batch_size, self.dist)
        if resume:
            ckpt = load_checkpoint(self.run_dir if resume is True else Path(resume), merge_shards=self.dist is None)
            self._check_resume(ckpt, layout)
            if config.engram.table_tier == "ssd":
                _check_ssd_tables(ckpt)

        def claim() -> str | None:
            aside = self.run.claim(resume_from=None if ckpt is None else ckpt.path, overwrite=overwrite)
            return None if aside is None else str(aside)

        aside = self._on_main(claim)
        self.aside = None if aside is None else Path(aside)
        where = "" if self.dist is None else f" on {self.dist.world} ranks (tables sharded by row)"
        if ckpt is None:
            self._log(f"starting a new run in {self.run_dir}{where}")
        else:
            self._log(f"resuming from step {ckpt.step} (checkpoint {ckpt.path}){where}")
        torch.manual_seed(config.seed)
        if self.dist is not None:
            if ckpt is not None and config.engram.table_tier == "ssd" and layout is not None:
                # resuming with SSD tables: no rank builds a table in RAM (the rows come from the checkpoint's
                # table files; the RNG is restored from it below, so skipping the init draws changes nothing)
                from engramlm.nn.engram import external_tables

                with external_tables(lambda *_: None):
                    self.model = EngramLM(model_cfg, layout)
                rows = {lid: layout.rows_of(lid) for lid in layout.layer_ids}
                self.tables = ShardedTables.cut(self.model, self.dist, rows)
            else:
                self.model = EngramLM(model_cfg, layout)
                if layout is not None:
                    self.tables = ShardedTables.cut(self.model, self.dist)
            if ckpt is not None:
                load_sharded_weights(self.model, ckpt.model_dir, self.tables, rows=config.engram.table_tier != "ssd")
            if config.engram.table_tier == "ssd" and self.tables is not None:
                self._setup_sharded_ssd(ckpt, layout)
        elif config.engram.table_tier == "ssd":
            self._setup_ssd(ckpt, model_cfg, layout)
        elif ckpt is not None:
            self.model = load_pretrained(ckpt.model_dir, layout=layout, verify=False)  # load_checkpoint checked it
        else:
            self.model = EngramLM(model_cfg, layout)
        self.model.train()
        local = self.tables.local if self.tables is not None else None
        backends = self.ssd.backends if self.ssd is not None else None
        # Muon's Newton-Schulz work is shared over the data-parallel ranks (each orthogonalises a share, all-gather)
        group = self.dist.dp_group if self.dist is not None else None
        self.optim = OptimizerSet(self.model, config.optim, tables=local, process_group=group, table_backends=backends)
        self.optim.skip_nonfinite = config.skip_nonfinite > 0
        if self.tables is not None:
            self.tables.bind(self.optim.sparse.gather_layer)
        if self.dist is not None:
            # the replicated backbone: one bucketed gradient all-reduce overlapping the backward. Buffers are
            # not broadcast: the only changing one (MoE routing bias) moves alike on every rank (counts summed)
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, forward_sync_buffers=False)
            self.ddp.register_comm_hook(None, sum_hook)  # each rank's loss is its share of the global mean
        self.moes = [m for m in self.model.modules() if isinstance(m, MoE)]
        hasher = self.model.hasher
        d = config.data
        part = (0, 1) if self.dist is None else (self.dist.rank, self.dist.world)
        self.loader = BatchLoader(
            self.train_set, d.batch_size, d.seq_len, seed=config.seed, row_ids_fn=hasher, part=part
        )
        if self.ssd is not None and self.dist is not None:  # the prefetch's view: every rank's rows of a step
            self.global_loader = BatchLoader(self.train_set, d.batch_size, d.seq_len, seed=config.seed,
                                             row_ids_fn=hasher)  # fmt: skip
        self.eval_loader = EvalLoader(self.eval_set, d.eval_batch_size, d.seq_len, row_ids_fn=hasher)
        self.step = 0
        self.resumed_from: int | None = None
        if ckpt is not None:
            tensors = ckpt.optim_tensors
            if self.tables is not None and self.ssd is None:  # this rank's rows only, from whichever files hold them
                dims = {lid: t.shape[1] for lid, t in self.tables.local.items()}
                tensors = {k: v for k, v in tensors.items() if not k.startswith("sparse/")}
                tensors.update(local_sparse_tensors(ckpt.path, ckpt.state, ckpt.optim_tensors, self.tables, dims))
            try:
                self.optim.load_state_tensors(tensors, ckpt.state["optimizer"])
            except (KeyError, ValueError) as exc:
                raise CorruptFileError(f"{ckpt.path}: optimizer state does not fit this model ({exc})") from exc
            self.loader.load_state_dict(ckpt.state["loader"])
            self.step = self.resumed_from = ckpt.step
            self.skipped = int(ckpt.state.get("skipped_nonfinite", 0))
            restore_rng(ckpt)

    def _setup_ssd(self, ckpt: Checkpoint | None, model_cfg, layout) -> None:
        """``engram.table_tier=ssd``: the model holds no tables ([0, d_h] placeholders); rows and their Adam
        state live in OUT_DIR/engram_tables/ (created with the model's exact init, or opened at the state the
        checkpoint's engram_tables.json records)."""
        from engramlm.nn.engram import external_tables
        from engramlm.store.trainable import TABLES_FILE

        cfg = self.config.engram
        if ckpt is None:
            self.model, self.ssd = SsdTables.new_model(self.run_dir, cfg, model_cfg, layout)
            _log(f"Engram tables on SSD in {self.run_dir / 'engram_tables'} (cache {cfg.cache_mb} MiB)")
            return
        if (ckpt.path / TABLES_FILE).is_file():
            self.ssd = SsdTables.from_checkpoint(self.run_dir, cfg, ckpt.path, layout.fingerprint)
        else:  # written by torchrun: the ranks' tables streamed into one
            ranges = {lid: (0, layout.rows_of(lid)) for lid in layout.layer_ids}
            _log(f"re-sharding the SSD tables of {ckpt.path} ({_saved_world(ckpt)} ranks) into one process's")
            self.ssd = SsdTables.resharded(self.run_dir, cfg, ckpt.path, layout.fingerprint, ranges)
        try:
            with external_tables(lambda *_: None):  # weights come from the checkpoint: no init draws needed
                self.model = load_pretrained(ckpt.model_dir, layout=layout, verify=False)
        except BaseException:
            self.ssd.close()
            raise

    def _setup_sharded_ssd(self, ckpt: Checkpoint | None, layout) -> None:
        """``engram.table_tier=ssd`` under torchrun: this rank's row range of every table becomes a
        :class:`TrainableTable` in OUT_DIR/engram_tables/rankR-of-N/ (ids local to the shard), the backend of
        its :class:`SparseRowAdam`; the RAM shard is dropped. A fresh run writes the rows cut from the seeded
        init (the full table exists once per rank while the model is built, as with RAM shards); a resumed one
        (whose model was built without tables) opens the state its checkpoint's
        ``shards/rankR-of-N.engram_tables.json`` records, or, written by another world size, streams its row range
        from the saved tables into new ones (:meth:`SsdTables.resharded`). The prefetch hashes the
        next global batch (every rank's slice: the rows this rank serves come from all of them)."""
        from engramlm.store.trainable import TABLES_FILE
        from engramlm.train.shard_checkpoint import rank_file

        env, tables, cfg = self.dist, self.tables, self.config.engram
        sub = f"rank{env.rank:05d}-of-{env.world:05d}"
        doc = rank_file(env.rank, env.world, TABLES_FILE)
        if ckpt is None:
            self.ssd = SsdTables.from_shards(self.run_dir, cfg, tables.local, layout.fingerprint, sub)
        elif _saved_world(ckpt) == env.world and (ckpt.path / doc).is_file():
            self.ssd = SsdTables.from_checkpoint(self.run_dir, cfg, ckpt.path, layout.fingerprint, doc, sub)
        else:  # another world size: this rank's rows streamed from the saved tables that hold them
            ranges = {lid: (s.start, s.stop) for lid, s in tables.shards.items()}
            if env.is_main:
                _log(f"re-sharding the SSD tables of {ckpt.path} ({_saved_world(ckpt)} rank(s)) over {env.world} "
                     "ranks")  # fmt: skip
            self.ssd = SsdTables.resharded(self.run_dir, cfg, ckpt.path, layout.fingerprint, ranges, sub)
        tables.local = {lid: t.new_empty(0, t.shape[1]) for lid, t in tables.local.items()}
        tables.readers = {lid: t.gather for lid, t in self.ssd.tables.items()}
        if env.is_main:
            _log(f"Engram tables on SSD in {self.run_dir / 'engram_tables'}/rank*-of-{env.world:05d} (cache "
                 f"{cfg.cache_mb} MiB per rank)")  # fmt: skip

    def _check_resume(self, ckpt: Checkpoint, layout) -> None:
        saved_cfg = json.loads((ckpt.model_dir / "config.json").read_text(encoding="utf-8"))
        saved_fp = saved_cfg.get("hash_fingerprint", "none")
        if layout is not None:
            layout.check_fingerprint(saved_fp, what=f"checkpoint {ckpt.path}")
        elif saved_fp != "none":
            raise ConfigError(f"model: checkpoint {ckpt.path} has Engram layers, this config has none")
        free = (*RESUME_FREE, *self.allow_changes)
        saved = complete_saved_config(ckpt.state.get("config", {}))
        # a checkpoint from before the engram section trained its tables in the model
        saved.setdefault("engram", {**dataclasses.asdict(EngramTableConfig()), **self.config.to_dict()["engram"],
                                    "table_tier": "model"})  # fmt: skip
        now = self.config.to_dict()
        diff = [p for p in config_diff(saved, now) if p not in free]
        if diff:
            was = ", ".join(f"{p}={_at(saved, p)!r} (now {_at(now, p)!r})" for p in diff)
            raise ConfigError(
                f"resume: the config differs from checkpoint {ckpt.path} at {diff}: it trained with {was}; set "
                "those values to resume it exactly (a default may have changed since), or pass --allow-change KEY"
            )
        if ckpt.state.get("tokenizer_sha256") != self.train_set.manifest.tokenizer.get("sha256"):
            raise ConfigError(f"data.dir: {self.data_dir} has a different tokenizer than checkpoint {ckpt.path}")

    def _log(self, msg: str) -> None:
        if self.main:
            _log(msg)

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """One optimiser step on ``batch`` (default: the loader's batch for the current step; under
        torchrun, this rank's slice of it)."""
        if self.dist is not None:
            return self._train_step_sharded(batch)
        cfg = self.config
        ssd = self.ssd
        if ssd is not None:
            ssd.set_step(self.step)
            prefetched = ssd.take_batch(self.step)  # waits for the prefetch of this step's rows
            if batch is None:
                batch = prefetched
        if batch is None:
            batch = self.loader.batch_at(self.step)
        self.loader.step = self.step + 1
        targets = batch["targets"].masked_fill(~batch["loss_mask"], -100)
        rows = None
        if self.optim.sparse is not None:
            rows = self.optim.sparse.gather(batch["row_ids"], self.model.layout.layer_ids)
        if ssd is not None and self.step + 1 < cfg.total_steps:  # the next batch's rows, while this one computes
            current = self.optim.sparse.step_rows()
            ssd.start_prefetch(self.step + 1, self.loader.batch_at, self.model.layout.layer_ids, current)
        row_ids = batch.get("row_ids") if rows is None else None
        engram = self.model.engram_inputs(batch["input_ids"], batch["doc_start"], row_ids=row_ids, rows=rows)
        out = self.model(batch["input_ids"], targets, engram=engram)
        out.loss.backward()
        gnorm = self.optim.clip(cfg.optim.clip)
        mult = lr_multiplier(self.step, cfg.total_steps, cfg.schedule)
        self.optim.set_lr(mult)
        applied = self.optim.step()
        self.optim.zero_grad()
        for moe in self.moes if applied else ():  # a skipped non-finite step changes nothing, routing bias included
            moe.update_bias()
        self.step += 1
        rec = {
            "step": self.step,
            "kind": "train",
            "loss": float(out.loss.detach()),
            "lr": cfg.optim.lr * mult,
            "grad_norm": gnorm,
        }
        if ssd is not None:
            rec["ssd_wait_ms"] = 1e3 * ssd.last_wait_s
            rec.update({f"ssd_{k}": v for k, v in ssd.io_stats().items()})
        return rec

    def _train_step_sharded(self, batch: dict[str, Any] | None) -> dict[str, Any]:
        """:meth:`train_step` on this rank's slice of the global batch (see :mod:`engramlm.train.distributed`)."""
        cfg, env = self.config, self.dist
        t_start = time.perf_counter()
        timer = Timer()
        reduce = timer(env.sum)
        if batch is None:
            batch = self.loader.batch_at(self.step)
        self.loader.step = self.step + 1
        targets = batch["targets"].masked_fill(~batch["loss_mask"], -100)
        total = reduce(batch["loss_mask"].sum().reshape(1).to(torch.int64))  # the global batch's scored tokens
        rows = None
        ssd = self.ssd
        if ssd is not None:
            ssd.set_step(self.step)  # orders the cache's evictions
            ssd.take_batch(self.step)  # waits for the prefetch of this step's owned rows (its batch is the global one)
        if self.tables is not None:
            self.optim.sparse.reset()
            rows = self.tables.gather(batch["row_ids"], self.model.layout.layer_ids)
        if ssd is not None and self.step + 1 < cfg.total_steps:  # rows this rank will serve next, while this computes
            shards = {lid: (s.start, s.stop) for lid, s in self.tables.shards.items()}
            ssd.start_prefetch(self.step + 1, self.global_loader.batch_at, self.model.layout.layer_ids,
                               self.optim.sparse.step_rows(), shards)  # fmt: skip
        engram = self.model.engram_inputs(batch["input_ids"], batch["doc_start"], rows=rows) if rows else None
        out = self.ddp(batch["input_ids"], engram=engram) if engram is not None else self.ddp(batch["input_ids"])
        logits = out.logits.float()
        nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                              reduction="sum")  # fmt: skip
        # this rank's share of the global mean: DDP sums the dense gradients (sum_hook), the exchange the rows'
        (nll / total.to(nll.dtype)).backward()
        gnorm = self.optim.clip(cfg.optim.clip, reduce_rows=reduce)
        mult = lr_multiplier(self.step, cfg.total_steps, cfg.schedule)
        self.optim.set_lr(mult)
        applied = self.optim.step()
        self.optim.zero_grad()
        if applied and self.moes:  # every rank moves its routing bias by the global expert counts
            counts = reduce(torch.cat([m.expert_counts for m in self.moes]))
            for m, c in zip(self.moes, counts.split([m.expert_counts.numel() for m in self.moes]), strict=True):
                m.expert_counts.copy_(c)
                m.update_bias()
        loss = reduce(nll.detach().double().reshape(1)) / float(total)
        self.step += 1
        ex = self.tables.step_stats() if self.tables is not None else dict.fromkeys(("sent", "received", "seconds",
                                                                                     "served"), 0.0)  # fmt: skip
        comm = ex["seconds"] + timer.seconds
        per_rank = env.gather_rows([ex["sent"], ex["received"], comm, time.perf_counter() - t_start, ex["served"]])
        cols = list(zip(*per_rank, strict=True))
        ssd: dict[str, Any] = {}
        if self.ssd is not None:  # each rank's SSD tables: counters since the start, summed and per rank
            io = self.ssd.io_stats()
            keys = sorted(io)
            by_rank = list(zip(*env.gather_rows([float(io[k]) for k in keys] + [self.ssd.last_wait_s]), strict=True))
            ssd = {f"ssd_{k}": int(sum(v)) for k, v in zip(keys, by_rank, strict=False)}
            ssd["ranks_ssd_cache_misses"] = [int(x) for x in by_rank[keys.index("cache_misses")]]
            ssd["ssd_wait_ms"] = 1e3 * max(by_rank[-1])  # the slowest rank's wait for its prefetch
        return {
            **ssd,
            "step": self.step,
            "kind": "train",
            "loss": float(loss),
            "lr": cfg.optim.lr * mult,
            "grad_norm": gnorm,
            "exchange_bytes_sent": int(sum(cols[0])),  # all ranks, forward and backward, counts and ids included
            "exchange_bytes_received": int(sum(cols[1])),
            "comm_s": max(cols[2]),  # the slowest rank's time in collectives (exchange + small all-reduces)
            "step_s": max(cols[3]),
            "compute_s": max(cols[3]) - max(cols[2]),  # DDP's all-reduce overlaps the backward and counts here
            "ranks": {
                "exchange_bytes_sent": [int(x) for x in cols[0]],
                "exchange_bytes_received": [int(x) for x in cols[1]],
                "comm_s": list(cols[2]),
                "step_s": list(cols[3]),
                "rows_served": [int(x) for x in cols[4]],
            },
        }

    def evaluate(self) -> dict[str, Any]:
        if self.dist is not None:
            if self.config.threads is not None:
                torch.set_num_threads(self.config.threads)
            if self.ssd is not None:
                self.ssd.wait()  # no prefetch in flight while the eval reads the tables
            return evaluate_sharded(
                self.model, self.eval_loader, self.tables, self.dist, self.config.data.eval_max_batches
            )
        tables = None
        if self.ssd is not None:
            self.ssd.wait()  # no prefetch in flight while the eval reads the tables
            tables = self.ssd.tables
        return evaluate(self.model, self.eval_loader, self.config.data.eval_max_batches, self.config.threads,
                        tables=tables)  # fmt: skip

    def save(self) -> Path:
        tensors, meta = self.optim.state_tensors()
        state = {
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "loader": self.loader.state_dict(),
            "optimizer": meta,
            "tokenizer_sha256": self.train_set.manifest.tokenizer.get("sha256"),
            "data_content_hash": self.train_set.manifest.content_hash,
            "skipped_nonfinite": self.skipped,
        }
        if self.dist is not None:
            dense = {k: v for k, v in tensors.items() if not k.startswith("sparse/")}
            sparse = {k[7:]: v for k, v in tensors.items() if k.startswith("sparse/")}
            if self.ssd is None:
                return save_sharded_checkpoint(self.dist, self.run_dir, self.step, self.model, self.tables, dense,
                                               sparse, state, self.config.keep_checkpoints)  # fmt: skip
            from engramlm.store.trainable import TABLES_FILE
            from engramlm.train.shard_checkpoint import rank_file

            ssd = self.ssd
            path = save_sharded_checkpoint(self.dist, self.run_dir, self.step, self.model, self.tables, dense, sparse,
                                           state, self.config.keep_checkpoints,
                                           rank_json=(TABLES_FILE, ssd.checkpoint_doc))  # fmt: skip
            # every rank returns after rank 0 pruned old checkpoints: drop the files none of the kept ones names
            kept = list_checkpoints(self.run_dir)
            ssd.collect_garbage(kept, rank_file(self.dist.rank, self.dist.world, TABLES_FILE))
            if self.dist.is_main:  # another world size's table directories, once no checkpoint names them
                ssd.collect_table_dirs(kept)
            return path
        if self.ssd is None:
            return save_checkpoint(self.run_dir, self.step, self.model, tensors, state, self.config.keep_checkpoints)
        from engramlm.store.trainable import TABLES_FILE

        ssd = self.ssd
        path = save_checkpoint(self.run_dir, self.step, self.model, tensors, state, self.config.keep_checkpoints,
                               extra_json=lambda tmp: {TABLES_FILE: ssd.checkpoint_doc(tmp)})  # fmt: skip
        kept = list_checkpoints(self.run_dir)
        ssd.collect_garbage(kept)
        ssd.collect_table_dirs(kept)
        return path

    # ---- run directory and stopping -------------------------------------------------------------
    def close(self, *, clean: bool = True) -> None:
        """Release the run directory's lock and close SSD tables (idempotent; :meth:`fit` does it when it
        returns) and, under torchrun, leave the process group: after a barrier when ``clean`` (every rank
        closes), at once after an error (a peer may be gone)."""
        self._close_ssd()
        self._close_run()
        if self.dist is not None:
            self.dist.close(barrier=clean)

    def _close_ssd(self) -> None:
        if getattr(self, "ssd", None) is not None:
            self.ssd.close()
            self.ssd = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(clean=exc_type is None)

    def request_stop(self) -> None:
        """Ask :meth:`fit` to stop after the current step: it saves a checkpoint and raises
        :class:`TrainingInterrupted` (the CLI calls this on SIGINT). Safe from a signal handler."""
        self._stop_requested = True

    def _skip_nonfinite(self, rec: dict[str, Any]) -> bool:
        """False for a finite step; True for a NaN/inf one the optimiser skipped (config.skip_nonfinite
        allowing); otherwise :class:`TrainingDiverged`, with the ways to go on."""
        if math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]):
            return False
        limit = self.config.skip_nonfinite
        if self.optim.skip_nonfinite and self.optim.nonfinite and self.skipped < limit:
            self.skipped += 1
            self._log(f"step {rec['step']}: loss {rec['loss']}, grad norm {rec['grad_norm']}: batch skipped, no update "
                 f"({self.skipped} of skip_nonfinite={limit})")  # fmt: skip
            return True
        ckpts = list_checkpoints(self.run_dir)
        cmd = f"engramlm train --resume {self.run_dir}"
        if ckpts:
            how = (
                f"the last good checkpoint is {ckpts[-1]}; to go on from it, skip such batches with `{cmd} "
                f"skip_nonfinite=N` or lower the learning rate with `{cmd} optim.lr=LOWER --allow-change optim.lr`"
            )
        else:
            how = "no checkpoint was saved yet; start again (--overwrite) with a lower optim.lr or skip_nonfinite=N"
        raise TrainingDiverged(
            f"step {rec['step']}: training diverged (loss {rec['loss']}, grad norm {rec['grad_norm']}"
            + (f", {self.skipped} batches skipped already" if self.skipped else "")
            + f"); stopped without saving this step; {how}"
        )

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (from the resume point), evaluating and checkpointing on schedule.

        Raises :class:`TrainingDiverged` on a non-finite loss or gradient norm (that step is neither
        logged nor saved) and :class:`TrainingInterrupted` after :meth:`request_stop`.
        """

        def relock() -> None:  # a second fit() of this trainer
            if self.run is None or not self.run.locked:
                self._lock_run_dir(str(self.run_dir))

        self._on_main(relock)
        try:
            return self._fit()
        finally:
            self._close_ssd()
            self._close_run()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        total = cfg.total_steps
        counts = count_parameters(self.model_config)
        logger: MetricsLogger | _NoLogger = _NoLogger()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            doc = {"train": cfg.to_dict(), "model": self.model_config.to_dict(), "params": counts.to_dict()}
            if self.dist is not None:  # the layout of the job: its ranks and the rows each owns per table
                doc["distributed"] = {"world": self.dist.world, "rows_per_rank": self.tables.rows_per_rank
                                      if self.tables is not None else {}}  # fmt: skip
            atomic_write_json(self.run_dir / "config.json", doc)
            logger = MetricsLogger(self.run_dir, self.resumed_from, cfg.tensorboard)
        bar = tqdm(
            total=total, initial=self.step, disable=not (cfg.progress and self.main), unit="step",
            dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip
        t0, start_step = time.perf_counter(), self.step
        last_eval: dict[str, Any] | None = None
        rec: dict[str, Any] = {}
        last_loss: float | None = None
        saved_at = self.resumed_from
        try:
            while self.step < total:
                stop = self._stop_requested if self.dist is None else self.dist.any(self._stop_requested)
                if stop:
                    mine = [c for c in list_checkpoints(self.run_dir) if c.name == f"step_{self.step:08d}"]
                    raise TrainingInterrupted(self.step, mine[0] if saved_at == self.step and mine else self.save(),
                                              self.run_dir)  # fmt: skip
                rec = self.train_step()
                skipped = self._skip_nonfinite(rec)  # or raises TrainingDiverged: no NaN reaches a log or checkpoint
                elapsed = time.perf_counter() - t0
                tok_s = (self.step - start_step) * cfg.tokens_per_step / max(elapsed, 1e-9)
                rec.update(tokens=self.step * cfg.tokens_per_step, tokens_per_s=tok_s, elapsed_s=elapsed)
                if skipped:
                    logger.log({"step": self.step, "kind": "skipped", "skipped_nonfinite": self.skipped})
                else:
                    last_loss = rec["loss"]
                    if self.step % cfg.log_every == 0 or self.step == total:
                        logger.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                bar.update(1)
                if self.step == total or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    last_eval = {"step": self.step, "kind": "eval", **self.evaluate()}
                    logger.log(last_eval)
                    if cfg.progress and self.main:
                        bar.write(f"step {self.step}: eval loss {last_eval['loss']:.4f}, bpb {last_eval['bpb']:.4f} "
                                  f"({last_eval['scope']})", file=sys.stderr)  # fmt: skip
                if self.step == total or self.step % cfg.checkpoint_every == 0:
                    self.save()
                    saved_at = self.step
        finally:
            bar.close()
            logger.close()
        summary = {
            "steps": self.step,
            "tokens": self.step * cfg.tokens_per_step,
            "train_loss": last_loss,
            "skipped_nonfinite": self.skipped,
            "eval": last_eval,
            # the held-out figures of the last periodic eval, named so they are not taken for ``engramlm eval``'s
            # (which sweeps the whole split): eval_scope says what they cover, e.g. "first 16 of 40 batches of val"
            "eval_loss": None if last_eval is None else last_eval["loss"],
            "eval_bpb": None if last_eval is None else last_eval["bpb"],
            "eval_tokens": None if last_eval is None else last_eval["tokens"],
            "eval_scope": None if last_eval is None else last_eval["scope"],
            "params": counts.to_dict(),
            "sparse_state_bytes": self.optim.sparse_state_bytes,
            "wall_s": time.perf_counter() - t0,
            "run_dir": str(self.run_dir),
        }
        if self.dist is not None:  # the row state of all ranks; each holds only its own rows'
            summary["sparse_state_bytes"] = int(self.dist.sum(torch.tensor([summary["sparse_state_bytes"]]))[0])
            summary["world"] = self.dist.world
        if self.main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def _saved_world(ckpt: Checkpoint) -> int:
    return int((ckpt.state.get("shards") or {}).get("world", 1))


def _check_ssd_tables(ckpt: Checkpoint) -> None:
    """An SSD run resumes from a checkpoint with SSD tables (any world size: other sizes are re-sharded)."""
    from engramlm.store.trainable import checkpoint_table_docs

    docs = checkpoint_table_docs(ckpt.path)
    if not docs or not all(d.is_file() for d in docs):
        raise ConfigError(f"checkpoint {ckpt.path} holds its tables in the model, not on SSD", "engram.table_tier")


class _NoLogger:
    """Ranks other than 0 log nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
