"""Training-step time and optimiser state with an Engram table of R rows vs 10R rows, same batch.

Why: the paper's recipe trains the tables with Adam, but a step must touch only the rows its batch
used; if anything in the step (a dense ``.grad``, dense Adam moments, a dense clip or weight
decay) scaled with the table, a 10x table would make steps slower and state 10x larger. This
times full training steps (fwd + bwd + clip + Muon/AdamW/sparse-Adam step, batch prefetched and
hashed outside the timer) of two models that differ ONLY in table size, interleaved in the same
run on the same real batches (SOTU), and reports the paired time ratio and the optimiser state
bytes of the tables after the run. Optionally (``--dense-baseline``) a third and fourth contender
train the same tables the naive way (dense grad + dense AdamW), to show what the sparse path avoids.

Run from the repository root: ``python -m benchmarks.bench_sparse_update`` (after
``engramlm data prepare --source sotu --out runs/data/sotu``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import interleaved_timings, paired_ratios, stats, write_result
from engramlm.train import Trainer, load_train_config


def make_trainer(data: str, base_rows: int, args: argparse.Namespace, out: Path, dense: bool = False) -> Trainer:
    ov = [
        f"data.dir={data}", "steps=1000000", "progress=false", "tensorboard=false", f"threads={args.threads}",
        f"data.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}", f"out_dir={out}",
        "model.overrides.hidden_size=128", "model.overrides.num_layers=2", "model.overrides.n_heads=2",
        "model.overrides.mlp_hidden=344", "model.overrides.hc_mult=1", "schedule.warmup_steps=1",
        f"model.overrides.engram.hash.engram_vocab_size=[{base_rows},{base_rows}]",
    ]  # fmt: skip
    tr = Trainer(load_train_config(None, ov))
    if dense:  # the naive path: the table gets a dense .grad and dense AdamW moments
        table = tr.model.layers[1].engram.embed.weight
        table.requires_grad_(True)
        tr.optim.sparse = None
        tr.optim.dense_params.append(table)
        tr.optim.adamw.add_param_group({"params": [table], "weight_decay": 0.0})
    return tr


def table_state_bytes(tr: Trainer, dense: bool, used: bool = False) -> int:
    """Allocated bytes of the tables' optimiser state (``used``: without the growable tensors' spare capacity)."""
    if not dense:
        return sum(s.used_bytes for s in tr.optim.sparse.state.values()) if used else tr.optim.sparse_state_bytes
    table = tr.model.layers[1].engram.embed.weight
    st = tr.optim.adamw.state.get(table, {})
    return sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))


def time_arms(arms: dict[str, tuple[Trainer, bool]], repeats: int) -> dict[str, list[float]]:
    """Seconds per training step of each arm: same batches (prefetched, hashed outside the timer),
    interleaved, the order rotating between repeats."""
    loader = next(iter(arms.values()))[0].loader  # same seed and data: every arm sees the same batches
    batches: dict[str, dict[str, Any]] = {}

    def prefetch(k: int) -> None:
        raw = loader.batch_at(k)
        for name, (tr, _) in arms.items():
            batches[name] = {**raw, "row_ids": tr.model.hasher(raw["input_ids"], raw["doc_start"])}

    def contender(name: str):
        tr = arms[name][0]
        return lambda: tr.train_step(batches[name])

    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    prefetch(0)
    for n in names:  # warmup
        contender(n)()
    for r in range(repeats):
        prefetch(r + 1)
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who runs first
        one = interleaved_timings({n: contender(n) for n in order}, 1, warmup=0, progress=False)
        for n, v in one.items():
            times[n] += v
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {v[0] * 1e3:.0f} ms" for n, v in one.items()))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/data/sotu", help="prepared corpus (engramlm data prepare)")
    p.add_argument("--base-rows", type=int, default=40_960, help="R: per-head table base (x 8 heads)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dense-baseline", action="store_true", help="also time dense-grad AdamW on the same tables")
    p.add_argument("--out", default="sparse_update")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sparse_"))
    arms: dict[str, tuple[Trainer, bool]] = {}
    times: dict[str, list[float]] = {}
    # Phase 1 times the sparse pair alone; phase 2 (optional) the dense pair, whose 10R arm moves
    # ~1 GiB per step and would disturb the sparse arms' timings if interleaved with them.
    phases = [{"sparse_R": (args.base_rows, False), "sparse_10R": (10 * args.base_rows, False)}]
    if args.dense_baseline:
        phases.append({"dense_R": (args.base_rows, True), "dense_10R": (10 * args.base_rows, True)})
    for phase in phases:
        built = {n: (make_trainer(args.data, rows, args, tmp / n, dense=d), d) for n, (rows, d) in phase.items()}
        arms.update(built)
        times.update(time_arms(built, args.repeats))
    ratio = stats(paired_ratios(times["sparse_10R"], times["sparse_R"]))
    result: dict[str, Any] = {
        "params": {**vars(args), "tokens_per_step": args.batch_size * args.seq_len},
        "arms": {
            n: {
                "table_rows": int(tr.model.layers[1].engram.num_rows),
                "table_bytes": tr.model.layers[1].engram.embed.weight.numel() * 4,
                "step_s": stats(times[n]),
                "table_optimizer_state_bytes": table_state_bytes(tr, dense),
                "table_optimizer_state_bytes_used": table_state_bytes(tr, dense, used=True),
                "rows_with_state": (sum(s.n for s in tr.optim.sparse.state.values()) if not dense else None),
            }
            for n, (tr, dense) in arms.items()
        },
        "ratio_step_time_10R_over_R": ratio,
        "within_10pct": ratio["median"] <= 1.10,
    }
    if args.dense_baseline:
        result["ratio_dense_10R_over_R"] = stats(paired_ratios(times["dense_10R"], times["dense_R"]))
    path = write_result(args.out, result)
    print(f"10R/R step-time ratio: median {ratio['median']:.3f} (IQR {ratio['q1']:.3f}-{ratio['q3']:.3f})")
    for n, a in result["arms"].items():
        mib = a["table_optimizer_state_bytes"] / 2**20
        used = a["table_optimizer_state_bytes_used"] / 2**20
        print(
            f"{n}: {a['table_rows']} rows, step {a['step_s']['median'] * 1e3:.0f} ms, table optimizer state "
            f"{mib:.1f} MiB allocated, {used:.1f} MiB used, rows with state {a['rows_with_state']}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
