"""Why does Engram + MoE lose to MoE on prose? One-factor sweeps around the head-to-head's Engram arm.

Why this exists: at the ``medium`` head-to-head budget (262k tokens per arm) Engram + MoE beats MoE
on code (stdlib) but trails it on prose (SOTU) in every seed. Issue 3 asks to find out why
(learning rates, table size, layer choice, gate). This trains the head-to-head's Engram arm with
one factor changed at a time, on the same data, budget, batches and seeds, next to the MoE arm
itself, and reports each variant's held-out bpb minus the MoE arm's of the same seed:

- ``engram_lr_mult`` 1, 25 and 100 (default 5: the paper's 5x base LR for tables);
- table rows x0.25 and x4 (not iso-parameter: tells whether the table is too big to train on
  this budget or too small to hold the n-grams);
- Engram at layer 0 or 2 instead of 1;
- no gate (the value is added ungated);
- no short conv.

Finished arms are reused (``run_arm`` stores each result with its full config), so the MoE and
base Engram arms are shared with ``bench_head_to_head.py --size medium`` when both use the same
runs directory. Results: ``benchmarks/results/head_to_head_why_<corpus>[_unmatched].json`` and a plot.

    python -m benchmarks.bench_h2h_why --corpus sotu --seeds 0 --jobs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from benchmarks._arms import resolve_corpus, run_arm, spread
from benchmarks._common import REPO_ROOT, RESULTS_DIR, save_png, write_result
from benchmarks.bench_head_to_head import SIZES, arm_dir, arms
from engramlm.data import TokenDataset
from engramlm.models.accounting import count_parameters
from engramlm.models.config import ModelConfig


def variants(engram_arm: ModelConfig) -> dict[str, tuple[ModelConfig, dict[str, Any]]]:
    """name -> (model config, optim overrides): one factor changed from the head-to-head Engram arm."""
    e = engram_arm.engram
    h = e.hash

    def rows(scale: float) -> ModelConfig:
        sizes = tuple(max(2, round(v * scale)) for v in h.engram_vocab_size)
        return engram_arm.replace(engram=dataclasses.replace(e, hash=h.replace(engram_vocab_size=sizes)))

    def layer(i: int) -> ModelConfig:
        return engram_arm.replace(engram=dataclasses.replace(e, hash=h.replace(layer_ids=(i,))))

    return {
        "engram (base)": (engram_arm, {}),
        "table lr x1": (engram_arm, {"engram_lr_mult": 1.0}),
        "table lr x25": (engram_arm, {"engram_lr_mult": 25.0}),
        "table lr x100": (engram_arm, {"engram_lr_mult": 100.0}),
        "rows x0.25": (rows(0.25), {}),
        "rows x4": (rows(4.0), {}),
        "layer 0": (layer(0), {}),
        "layer 2": (layer(2), {}),
        "no gate": (engram_arm.replace(engram=dataclasses.replace(e, gate=False)), {}),
        "no short conv": (engram_arm.replace(engram=dataclasses.replace(e, use_short_conv=False)), {}),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    diffs = [result["variants"][n]["bpb_minus_moe"]["mean"] for n in names]
    errs = [result["variants"][n]["bpb_minus_moe"]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.barh(names, diffs, xerr=errs, color=["tab:green" if d < 0 else "tab:red" for d in diffs], capsize=4)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out bpb minus MoE (same seed); < 0 = Engram variant better")
    ax.set_title(f"{result['corpus']} ({result['size']}, seeds {result['seeds']})")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="sotu", help="sotu, stdlib, a prepared dir or a text dir")
    p.add_argument("--size", choices=sorted(SIZES), default="medium")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+", default=None, help="variant names to run (default all)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=str(REPO_ROOT / "runs" / "data"))
    p.add_argument("--runs-root", default=str(REPO_ROOT / "runs" / "h2h"))
    p.add_argument("--out", default="head_to_head_why")
    p.add_argument("--unmatched-p-act", action="store_true", help="start from the Engram arm with P_act +4%%")
    args = p.parse_args()
    size = dict(SIZES[args.size])
    torch.set_num_threads(args.threads)
    name, data = resolve_corpus(args.corpus, Path(args.data_root))
    base = arms(size, TokenDataset(data, "train", verify=False).vocab_size, match_p_act=not args.unmatched_p_act)
    todo = {"moe": (base["moe"], {})}
    todo.update({k: v for k, v in variants(base["engram_moe"]).items() if args.only is None or k in args.only})
    # The MoE and base Engram arms train in head_to_head_<size>'s directories so both benchmarks share them.
    shared = Path(args.runs_root) / f"head_to_head_{args.size}" / name
    dirs = {"moe": shared / "moe", "engram (base)": shared / arm_dir("engram_moe", args.unmatched_p_act)}
    out_name = f"{args.out}_{name}" + ("_unmatched" if args.unmatched_p_act else "")
    own = Path(args.runs_root) / out_name / name
    tasks = {
        (v, seed): (model, size, data, seed, dirs.get(v, own / v.replace(" ", "_")) / f"seed{seed}", args.threads, opt)
        for v, (model, opt) in todo.items() for seed in args.seeds
    }  # fmt: skip
    done: dict[tuple[str, int], dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_arm, *task): key for key, task in tasks.items()}
        for fut in as_completed(futures):
            key, r = futures[fut], fut.result()
            done[key] = r
            print(f"{key[0]} seed {key[1]}: bpb {r['heldout']['bpb']:.4f} ({r['wall_s']:.0f} s)", flush=True)
    moe_bpb = {seed: done[("moe", seed)]["heldout"]["bpb"] for seed in args.seeds}
    out: dict[str, Any] = {"moe": {"bpb": spread(list(moe_bpb.values()))}, "variants": {}}
    for v, (model, opt) in todo.items():
        if v == "moe":
            continue
        runs = [done[(v, seed)] for seed in args.seeds]
        c = count_parameters(model)
        out["variants"][v] = {
            "optim": opt,
            "params": {"P_tot": c.p_tot, "P_act": c.p_act, "P_sparse": c.p_sparse, "rho": c.rho,
                       "engram_rows": list(c.engram_rows)},
            "bpb": spread([r["heldout"]["bpb"] for r in runs]),
            "bpb_minus_moe": spread([r["heldout"]["bpb"] - moe_bpb[r["seed"]] for r in runs]),
            "runs": [{k: r[k] for k in ("seed", "heldout", "final_train_loss", "wall_s", "curve")} for r in runs],
        }  # fmt: skip
    png = RESULTS_DIR / f"{out_name}.png"
    result = {"corpus": name, "size": args.size, "seeds": args.seeds, "p_act_matched": not args.unmatched_p_act, **out}
    plot(result, png)
    write_result(
        out_name,
        {
            "benchmark": out_name,
            "kind": "head_to_head_why",
            "settings": size,
            **result,
            "plot": str(png.relative_to(REPO_ROOT)),
        },
    )


if __name__ == "__main__":
    main()
