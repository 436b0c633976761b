"""Training tokens/s and step time for 1 vs N processes (gloo, one thread each), and the row exchange's bytes.

Why: issue 13's row-owner design trades memory (no rank holds a whole table) for communication (ids
and rows by all-to-all each step). This measures what that costs on the same EngramLM and the same
global batches of real SOTU tokens:

* ``1 process``: today's one-process path (``SparseRowAdam`` over the whole tables, Muon + AdamW);
* ``N processes``: real processes (``torch.multiprocessing``, gloo on 127.0.0.1), each reading a
  disjoint slice of every global batch; the tables sharded by row (``ShardedEngramRows`` +
  ``exchange_rows``), each owner stepping its own rows with ``SparseRowAdam``; the dense gradients
  all-reduced (``sum_gradients``); Muon sharing its Newton-Schulz work over the group.

Each step is timed in phases: hashing, forward exchange (ids out, rows back), backbone forward +
backward, backward exchange (row gradients to their owners: the backbone's backward stops at the
exchanged rows, whose gradients are then sent on, as DeepSeek-V4.1 returns embedding gradients after
the backbone's backward), the dense all-reduce and the optimizer. Communication share = forward +
backward exchange + all-reduce over the step (waiting for the slower rank included). Gradient
clipping is off in both runs (a global norm over sharded rows is the trainer's business).

The exchange bytes measured by ``ExchangeStats`` (forward: ids + served rows; backward: a row
gradient per unique requested row) are compared with ``engramlm analyze plan``'s distributed view
under three unique-row models: ``measured`` (the unique fraction of each rank's local batch, counted
by hashing the batches in the parent, without any exchange), ``zipf`` (calibrated on the
one-process global batch, predicting the half-size local batches) and ``uniform`` (worst case).

Run from the repository root: ``python -m benchmarks.bench_distributed`` (after
``engramlm data prepare --source sotu --out runs/data/sotu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks._common import stats, write_result
from engramlm.analysis.planner import DistRequest, fit_zipf_s, plan_distributed
from engramlm.data.loader import BatchLoader
from engramlm.dist import RowShard, ShardedEngramRows, shard_ranges, sum_gradients
from engramlm.models.accounting import engram_table_rows
from engramlm.models.config import ModelConfig
from engramlm.models.model import EngramLM
from engramlm.models.presets import get_preset
from engramlm.train.muon import Muon
from engramlm.train.optim import split_parameters
from engramlm.train.sparse_adam import SparseRowAdam
from engramlm.train.trainer import model_for_data, open_dataset

LR, ENGRAM_LR_MULT = 3e-3, 5.0
PHASES = ("hash", "fwd_exchange", "compute", "bwd_exchange", "allreduce", "optimizer")
COMM = ("fwd_exchange", "bwd_exchange", "allreduce")
ZIPF_TYPES = 10**7


def model_config(args: argparse.Namespace) -> ModelConfig:
    base = get_preset("tiny")
    e = base.engram
    h = e.hash.replace(engram_vocab_size=(args.base_rows, args.base_rows), layer_ids=(0, 1))
    return base.replace(hidden_size=128, num_layers=2, n_heads=2, mlp_hidden=344, hc_mult=1,
                        engram=dataclasses.replace(e, hash=h))  # fmt: skip


def build(args: argparse.Namespace) -> tuple[EngramLM, BatchLoader]:
    data = Path(args.data)
    train_set = open_dataset(data, "train")
    cfg, layout = model_for_data(model_config(args), data, train_set)
    torch.manual_seed(0)
    model = EngramLM(cfg, layout)
    return model, BatchLoader(train_set, args.batch_size, args.seq_len, seed=0)


def _batch(loader: BatchLoader, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    b = loader.batch_at(step)
    per = loader.batch_size // world
    out = {k: v[rank * per : (rank + 1) * per] for k, v in b.items()}
    out["targets"] = out["targets"].masked_fill(~out["loss_mask"], -100)
    out["global_tokens"] = b["loss_mask"].sum()
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    distributed = world > 1
    if distributed:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, loader = build(args)
        muon_p, adamw_p, tables = split_parameters(model)
        group = dist.group.WORLD if distributed else None
        muon = Muon(list(muon_p.values()), lr=LR, weight_decay=0.1, process_group=group)
        decay = [p for p in adamw_p.values() if p.dim() >= 2]
        no_decay = [p for p in adamw_p.values() if p.dim() < 2]
        adamw = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95), foreach=False)  # fmt: skip
        dense = list(muon_p.values()) + list(adamw_p.values())
        layer_ids = model.layout.layer_ids
        if distributed:
            shards, opts = {}, {}
            for lid, full in tables.items():
                shards[lid] = RowShard.even(full.shape[0], world, rank)
                opts[lid] = SparseRowAdam({lid: shards[lid].take(full)}, lr=LR * ENGRAM_LR_MULT)
                model.engram_layers[lid].embed.weight = torch.nn.Parameter(torch.empty(0, full.shape[1]), False)
            del full, tables  # no rank keeps a whole table
            dims = {lid: opt.tables[lid].shape[1] for lid, opt in opts.items()}
            lookups = ShardedEngramRows(shards, dims, lambda lid, local: opts[lid].gather(local[None], (lid,))[lid])
            sparse_steps = list(opts.values())
            table_rows_here = sum(s.size for s in shards.values())
        else:
            for t in tables.values():
                t.requires_grad_(False)
            sparse = SparseRowAdam(tables, lr=LR * ENGRAM_LR_MULT)
            sparse_steps = [sparse]
            table_rows_here = sum(t.shape[0] for t in tables.values())
        rec: dict[str, Any] = {"phases": {p: [] for p in PHASES}, "step_s": [], "losses": [], "exchange": []}
        for step in range(args.warmup + args.steps):
            b = _batch(loader, step, rank, world)
            if distributed:
                dist.barrier()  # every rank starts the step together: step times are comparable
            t = [time.perf_counter()]
            row_ids = model.hasher(b["input_ids"], b["doc_start"])
            t.append(time.perf_counter())
            if distributed:
                rows = lookups.gather(row_ids, layer_ids)
            else:
                rows = sparse.gather(row_ids, layer_ids)
            t.append(time.perf_counter())
            cut = {lid: r.detach().requires_grad_(True) for lid, r in rows.items()}  # the backbone's backward ends here
            engram = model.engram_inputs(b["input_ids"], b["doc_start"], rows=cut)
            out = model(b["input_ids"], b["targets"], engram=engram)
            loss = out.loss * (b["loss_mask"].sum() / b["global_tokens"])  # this rank's share of the global mean
            loss.backward()
            t.append(time.perf_counter())
            torch.autograd.backward([rows[lid] for lid in layer_ids], [cut[lid].grad for lid in layer_ids])
            t.append(time.perf_counter())
            if distributed:
                sum_gradients(dense)
            t.append(time.perf_counter())
            muon.step()
            adamw.step()
            for opt in sparse_steps:
                opt.step()
            for p in dense:
                p.grad = None
            t.append(time.perf_counter())
            total = loss.detach().clone()
            if distributed:
                dist.all_reduce(total)
            if step >= args.warmup:
                for name, a, z in zip(PHASES, t[:-1], t[1:], strict=True):
                    rec["phases"][name].append(z - a)
                rec["step_s"].append(t[-1] - t[0])
                rec["losses"].append(float(total))
                if distributed:
                    rec["exchange"].append(
                        {str(lid): {"forward_bytes": s.bytes_sent, "unique_requested": s.unique_requested,
                                    "rows_served": s.rows_served, "ids_requested": s.ids_requested,
                                    "backward_bytes": s.unique_requested * dims[lid] * 4}
                         for lid, s in lookups.stats.items()}
                    )  # fmt: skip
        rec["table_rows_here"] = table_rows_here
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rec))
        if distributed:
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = tempfile.mkdtemp(prefix=f"bench_dist{world}_")
    mp.spawn(_worker, args=(world, _free_port(), out, args), nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def unique_fractions(args: argparse.Namespace, world: int) -> list[float]:
    """Per timed step: unique rows / row reads of the local batches, summed over layers and ranks (hashing only)."""
    model, loader = build(args)
    out = []
    for step in range(args.warmup, args.warmup + args.steps):
        uniq = reads = 0
        for rank in range(world):
            b = _batch(loader, step, rank, world)
            ids = model.hasher(b["input_ids"], b["doc_start"])
            for li in range(ids.shape[0]):
                uniq += int(torch.unique(ids[li]).numel())
                reads += ids[li].numel()
        out.append(uniq / reads)
    return out


def summarise(ranks: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    step = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
    r0 = ranks[0]
    comm = [sum(r0["phases"][p][i] for p in COMM) / r0["step_s"][i] for i in range(len(step))]
    return {
        "processes": len(ranks),
        "step_s": stats(step),
        "tokens_per_s": tokens / stats(step)["median"],
        "phases_s": {p: stats(r0["phases"][p]) for p in PHASES},
        "communication_share": stats(comm),
        "table_rows_per_rank": [r["table_rows_here"] for r in ranks],
        "losses": r0["losses"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/data/sotu", help="prepared corpus (engramlm data prepare)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--base-rows", type=int, default=40_960, help="per-head table base rows (x 4 heads x 2 orders)")
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="distributed")
    args = p.parse_args()
    if args.batch_size % args.processes:
        raise SystemExit(f"--batch-size {args.batch_size} must divide over --processes {args.processes}")
    tokens = args.batch_size * args.seq_len
    one = run(1, args)
    many = run(args.processes, args)
    base, dist_res = summarise(one, tokens), summarise(many, tokens)
    n = args.processes

    # exchange bytes: measured (all ranks, per step) vs the planner's distributed view
    steps = [
        {
            "forward": sum(sum(v["forward_bytes"] for v in r["exchange"][i].values()) for r in many),
            "backward": sum(sum(v["backward_bytes"] for v in r["exchange"][i].values()) for r in many),
            "unique": sum(sum(v["unique_requested"] for v in r["exchange"][i].values()) for r in many),
            "ids": sum(sum(v["ids_requested"] for v in r["exchange"][i].values()) for r in many),
        }
        for i in range(args.steps)
    ]
    measured = {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}
    measured["total"] = measured["forward"] + measured["backward"]
    cfg = model_config(args)
    frac_local = float(np.mean(unique_fractions(args, n)))
    frac_global = float(np.mean(unique_fractions(args, 1)))
    s_fit = fit_zipf_s(cfg, tokens, frac_global, ZIPF_TYPES)
    models = {
        "measured": DistRequest(ranks=n, batch=tokens, unique_model="measured", unique_fraction=frac_local),
        "zipf": DistRequest(ranks=n, batch=tokens, unique_model="zipf", zipf_s=s_fit, zipf_types=ZIPF_TYPES),
        "uniform": DistRequest(ranks=n, batch=tokens, unique_model="uniform"),
    }
    predictions = {}
    for name, req in models.items():
        pl = plan_distributed(cfg, req)
        pr = pl["per_rank_step"]
        pred = {"forward": pr["forward_bytes"] * n, "backward": pr["backward_bytes"] * n,
                "total": pl["all_to_all_bytes_per_step"], "unique": pr["unique_rows"] * n}  # fmt: skip
        predictions[name] = {**pred, "error_total": pred["total"] / measured["total"] - 1,
                             "unique_model": pl["unique_model"]}  # fmt: skip
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(dist_res["losses"], base["losses"], strict=True))
    rows = engram_table_rows(cfg)
    result = {
        "params": {**vars(args), "tokens_per_step": tokens, "threads_per_process": 1, "backend": "gloo",
                   "model": cfg.to_dict(), "table_rows": list(rows),
                   "shard_bounds": [shard_ranges(r, n) for r in rows]},
        "one_process": base,
        "distributed": dist_res,
        "speedup_tokens_per_s": dist_res["tokens_per_s"] / base["tokens_per_s"],
        "loss_max_rel_diff": loss_diff,
        "exchange_bytes_per_step": {"measured": measured, "predicted": predictions,
                                    "unique_fraction_local": frac_local, "unique_fraction_global": frac_global,
                                    "zipf_s_fit_on_global": s_fit, "zipf_types": ZIPF_TYPES},
    }  # fmt: skip
    path = write_result(args.out, result)
    print(f"1 process: {base['tokens_per_s']:,.0f} tokens/s, step {base['step_s']['median'] * 1e3:.0f} ms")
    print(f"{n} processes: {dist_res['tokens_per_s']:,.0f} tokens/s, step {dist_res['step_s']['median'] * 1e3:.0f} ms,"
          f" communication {dist_res['communication_share']['median']:.0%} of the step;"
          f" loss max rel diff {loss_diff:.1e}")  # fmt: skip
    print(f"exchange bytes/step measured {measured['total']:,.0f} (forward {measured['forward']:,.0f})")
    for name, pr in predictions.items():
        print(f"  predicted ({name}): {pr['total']:,.0f} ({pr['error_total']:+.1%})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
