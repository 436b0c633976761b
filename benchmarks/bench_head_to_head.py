"""Head-to-head at equal activated parameters: dense vs MoE (rho = 1) vs Engram + MoE (same P_tot as MoE).

Why: the paper's claim is that, at equal activated parameters (equal FLOPs per token) and equal
total parameters, moving part of the sparse budget from routed experts into Engram tables
(rho ~ 0.75-0.8) lowers held-out loss. This trains the three arms on the same prepared corpus,
token budget, batches and seeds, and reports held-out loss and bits per byte (mean, std, min,
max over seeds, plus per-seed paired differences), with the exact parameter counts of each arm.
The expected order (Engram < MoE < dense) is a hypothesis under test, not a target.

Arms (``arms()``): a MoE base (shared + top-2 of 16 routed experts, first layer dense), the dense
arm with the FFN width that gives it the MoE's P_act exactly, and
``iso_parameter_variant(moe, rho=0.8, match_p_act=True)`` (fewer routed experts, an Engram table at
layer 1 taking their parameters, and experts narrowed from 256 to 237 so that Engram's own dense
parameters, its projections, gate norms and conv, do not add to P_act: all three arms have the same P_act,
the two sparse arms the same P_tot to 0.06%). ``--unmatched-p-act`` gives the first version of the
Engram arm (16 -> 13 experts of width 256, P_act +3.8%).

Run from the repository root (do not run the default size on a busy machine: ~10-20 min per arm
and seed on 2 free cores, 18 runs)::

    python -m benchmarks.bench_head_to_head                       # SOTU + stdlib code, 3 seeds
    python -m benchmarks.bench_head_to_head --quick               # a few minutes, tiny models
    python -m benchmarks.bench_head_to_head --corpus my_texts/    # any directory of .txt files

A run on other corpora than the default pair writes ``head_to_head[_SIZE]_<corpora>.json``, never over the
committed results; every result, whatever its ``--out`` name, renders under the README's head-to-head marker
(``make_tables``). The console prints the per-arm table, the held-out tokens actually scored and a warning
when the held-out split holds too few documents for a mean over it to say much.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from benchmarks._arms import resolve_corpus, run_arm, spread
from benchmarks._common import REPO_ROOT, RESULTS_DIR, save_png, write_result
from engramlm.data import TokenDataset
from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec
from engramlm.models.accounting import count_parameters, iso_parameter_variant
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig

RHO = 0.8
ARMS = ("dense", "moe", "engram_moe")
DEFAULT_CORPORA = ("sotu", "stdlib")
# Fewer held-out documents than this and the held-out mean is a property of those few texts.
MIN_HELDOUT_DOCUMENTS = 20
SIZES: dict[str, dict[str, Any]] = {
    # 224 steps of 16 x 256 = 917,504 tokens per arm (about half the SOTU train split); measured
    # 3.9-5 s/step for each arm on 2 lightly loaded cores, i.e. ~15-19 min per arm and seed.
    "full": {"d": 256, "layers": 4, "heads": 4, "experts": 16, "expert_hidden": 256, "head_dim": 32,
             "batch": 16, "seq": 256, "tokens": 224 * 4096, "warmup": 30, "eval_tokens": 262_144},
    # The full models on a quarter of the budget: 64 steps, ~4-5 min per arm and seed on one core.
    "medium": {"d": 256, "layers": 4, "heads": 4, "experts": 16, "expert_hidden": 256, "head_dim": 32,
               "batch": 16, "seq": 256, "tokens": 64 * 4096, "warmup": 8, "eval_tokens": 131_072},
    # Two larger budgets for the prose trend (issue 19): 2x and 4x the full tokens, same models.
    "long": {"d": 256, "layers": 4, "heads": 4, "experts": 16, "expert_hidden": 256, "head_dim": 32,
             "batch": 16, "seq": 256, "tokens": 448 * 4096, "warmup": 30, "eval_tokens": 262_144},
    # (checkpoints every 64 steps: an arm that takes hours here is resumed, exactly, across sessions)
    "longer": {"d": 256, "layers": 4, "heads": 4, "experts": 16, "expert_hidden": 256, "head_dim": 32,
               "batch": 16, "seq": 256, "tokens": 896 * 4096, "warmup": 30, "eval_tokens": 262_144,
               "checkpoint_every": 64},
    "quick": {"d": 64, "layers": 3, "heads": 2, "experts": 16, "expert_hidden": 32, "head_dim": 16,
              "batch": 4, "seq": 64, "tokens": 40 * 256, "warmup": 5, "eval_tokens": 4 * 4 * 64},
}  # fmt: skip


def dense_width_for(moe: ModelConfig) -> int:
    """FFN width giving a dense model the MoE's P_act (closest; exact when divisible)."""
    target = count_parameters(moe).p_act
    lo = moe.replace(moe=None, mlp_hidden=1)
    per_unit = count_parameters(lo.replace(mlp_hidden=2)).p_act - count_parameters(lo).p_act
    return 1 + round((target - count_parameters(lo).p_act) / per_unit)


def arms(size: dict[str, Any], vocab: int, match_p_act: bool = True) -> dict[str, ModelConfig]:
    d, e_h = size["d"], size["expert_hidden"]
    moe = ModelConfig(
        name="h2h-moe", vocab_size=vocab, hidden_size=d, num_layers=size["layers"], n_heads=size["heads"],
        mlp_hidden=3 * e_h + 4, hc_mult=1, max_seq_len=max(1024, size["seq"]),
        moe=MoEConfig(n_routed=size["experts"], n_shared=1, top_k=2, expert_hidden=e_h, n_dense_layers=1),
    )  # fmt: skip
    dense = moe.replace(moe=None, name="h2h-dense", mlp_hidden=dense_width_for(moe))
    engram = EngramConfig(
        hash=HashSpec(max_ngram_size=3, n_head_per_ngram=4, engram_vocab_size=(1000, 1000), layer_ids=(1,),
                      boundary_mode="reset"),
        head_dim=size["head_dim"],
    )  # fmt: skip
    try:
        variant = iso_parameter_variant(moe, RHO, engram, match_p_act=match_p_act).config
    except ConfigError as exc:  # the quick size: experts too few and too narrow to pay for Engram's projections
        print(f"P_act not matched ({exc})", flush=True)
        variant = iso_parameter_variant(moe, RHO, engram).config
    variant = variant.replace(name="h2h-engram-moe")
    return {"dense": dense, "moe": moe, "engram_moe": variant}


def arm_dir(arm: str, unmatched_p_act: bool) -> str:
    """Run directory name of an arm: the two versions of the Engram arm train in different directories."""
    return f"{arm}_unmatched" if unmatched_p_act and arm == "engram_moe" else arm


def result_name(size_name: str, corpora: list[str], out: str | None) -> str:
    """``--out`` if given; else ``head_to_head[_SIZE]``, plus the corpus names when they are not the default pair,
    so a run on one's own text never replaces the committed SOTU/stdlib results."""
    if out:
        return out
    name = "head_to_head" if size_name == "full" else f"head_to_head_{size_name}"
    if sorted(corpora) != sorted(DEFAULT_CORPORA):
        name += "_" + "_".join(re.sub(r"[^A-Za-z0-9-]+", "-", c).strip("-") or "corpus" for c in corpora)
    return name


def heldout_scope(runs: list[dict[str, Any]], data: Path, split: str = "val") -> dict[str, Any]:
    """What the held-out numbers rest on: tokens scored (the same for every run) and the split's documents."""
    docs = TokenDataset(data, split, verify=False).n_documents
    return {"split": split, "tokens_scored": int(runs[0]["heldout"]["tokens"]), "documents": docs,
            "few_documents": docs < MIN_HELDOUT_DOCUMENTS}  # fmt: skip


def console_table(name: str, entry: dict[str, Any]) -> list[str]:
    """The per-arm summary a user reads first: parameters and held-out loss/bpb as mean ± std over seeds."""
    h = entry["heldout"]
    lines = [
        f"{name}: held-out = {h['tokens_scored']:,} tokens of the {h['split']} split ({h['documents']} documents)",
        f"  {'arm':<11} {'P_act':>12} {'P_tot':>12} {'loss':>17} {'bpb':>17}",
    ]
    for arm, a in entry["arms"].items():
        lo, b = a["loss"], a["bpb"]
        lines.append(
            f"  {arm:<11} {a['params']['P_act']:>12,} {a['params']['P_tot']:>12,} "
            f"{lo['mean']:>9.4f} ± {lo['std']:.4f} {b['mean']:>9.4f} ± {b['std']:.4f}"
        )
    if h["few_documents"]:
        lines.append(
            f"  WARNING: the held-out split has only {h['documents']} documents (< {MIN_HELDOUT_DOCUMENTS}): "
            "differences between arms may reflect those texts, not the corpus"
        )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(results)
    fig, axes = plt.subplots(2, len(corpora), figsize=(5.5 * len(corpora), 8), squeeze=False)
    colors = {"dense": "tab:gray", "moe": "tab:blue", "engram_moe": "tab:red"}
    for j, corpus in enumerate(corpora):
        res = results[corpus]["arms"]
        ax = axes[0][j]
        for arm, r in res.items():
            for k, run in enumerate(r["runs"]):
                xs, ys = zip(*run["curve"], strict=True)
                ema, acc = [], 0.0
                for i, y in enumerate(ys):
                    acc = 0.9 * acc + 0.1 * y
                    ema.append(acc / (1 - 0.9 ** (i + 1)))
                ax.plot(xs, ema, color=colors[arm], alpha=0.8, lw=1, label=arm if k == 0 else None)
        ax.set(title=f"{corpus}: train loss (EMA)", xlabel="tokens", ylabel="nats/token")
        ax.legend()
        ax = axes[1][j]
        names = list(res)
        means = [res[a]["bpb"]["mean"] for a in names]
        errs = [res[a]["bpb"]["std"] for a in names]
        ax.bar(names, means, yerr=errs, color=[colors[a] for a in names], capsize=6)
        for i, a in enumerate(names):
            ax.scatter(
                [i] * len(res[a]["runs"]), [r["heldout"]["bpb"] for r in res[a]["runs"]], color="k", s=10, zorder=3
            )
        lo, hi = min(means) - 3 * max([*errs, 1e-3]), max(means) + 3 * max([*errs, 1e-3])
        ax.set_ylim(lo, hi)
        ax.set(title=f"{corpus}: held-out bits per byte (mean, std, seeds)", ylabel="bits/byte")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", action="append", help="sotu, stdlib, a prepared dir or a text dir (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny models and budget (a few minutes in all)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model and budget size (default full)")
    p.add_argument("--jobs", type=int, default=1, help="arms trained in parallel processes (each --threads)")
    p.add_argument("--tokens", type=int, default=None, help="token budget per arm (default by size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on a free 2-core machine)")
    p.add_argument("--data-root", default=str(REPO_ROOT / "runs" / "data"))
    p.add_argument("--runs-root", default=str(REPO_ROOT / "runs" / "h2h"))
    p.add_argument("--out", default=None, help="result name (default head_to_head or head_to_head_quick)")
    p.add_argument("--unmatched-p-act", action="store_true", help="Engram arm without narrower experts (P_act +4%%)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="arms to train (the Engram - MoE gap needs only moe and engram_moe)")  # fmt: skip
    args = p.parse_args()
    size_name = args.size or ("quick" if args.quick else "full")
    size = dict(SIZES[size_name])
    if args.tokens:
        size["tokens"] = args.tokens
    torch.set_num_threads(args.threads)
    corpora = {}
    for spec in args.corpus or list(DEFAULT_CORPORA):
        name, data = resolve_corpus(spec, Path(args.data_root))
        vocab = TokenDataset(data, "train", verify=False).vocab_size
        models = arms(size, vocab, match_p_act=not args.unmatched_p_act)
        corpora[name] = (data, {arm: models[arm] for arm in ARMS if arm in args.arms})
    out_name = result_name(size_name, list(corpora), args.out)
    tasks = {
        (name, arm, seed): (model, size, data, seed,
                            Path(args.runs_root) / out_name / name / arm_dir(arm, args.unmatched_p_act) / f"seed{seed}",
                            args.threads)
        for name, (data, models) in corpora.items() for arm, model in models.items() for seed in args.seeds
    }  # fmt: skip
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_arm, *task): key for key, task in tasks.items()}
        for fut in as_completed(futures):
            (name, arm, seed), r = futures[fut], fut.result()
            done[(name, arm, seed)] = r
            print(
                f"{name} {arm} seed {seed}: held-out loss {r['heldout']['loss']:.4f}, "
                f"bpb {r['heldout']['bpb']:.4f}, {r['wall_s']:.0f} s, {r['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
    results: dict[str, Any] = {}
    for name, (data, models) in corpora.items():
        entry: dict[str, Any] = {"data_dir": str(data), "arms": {}}
        for arm, model in models.items():
            runs = [done[(name, arm, seed)] for seed in args.seeds]
            counts = count_parameters(model)
            entry["arms"][arm] = {
                "params": {"P_tot": counts.p_tot, "P_act": counts.p_act, "P_sparse": counts.p_sparse, "rho": counts.rho,
                           "total_with_embeddings": counts.total, "engram_rows": list(counts.engram_rows),
                           "n_routed": model.moe.n_routed if model.moe else None},
                "model": model.to_dict(),
                "loss": spread([r["heldout"]["loss"] for r in runs]),
                "bpb": spread([r["heldout"]["bpb"] for r in runs]),
                "runs": runs,
            }  # fmt: skip
        a = entry["arms"]
        entry["paired_bpb_diff"] = {
            f"{x}_minus_{y}": spread([rx["heldout"]["bpb"] - ry["heldout"]["bpb"]
                                      for rx, ry in zip(a[x]["runs"], a[y]["runs"], strict=True)])
            for x, y in (("engram_moe", "moe"), ("moe", "dense"), ("engram_moe", "dense")) if x in a and y in a
        }  # fmt: skip
        entry["order_by_mean_bpb"] = sorted(a, key=lambda k: a[k]["bpb"]["mean"])
        entry["heldout"] = heldout_scope(next(iter(a.values()))["runs"], data)
        results[name] = entry
        print("\n".join(console_table(name, entry)), flush=True)
    png = RESULTS_DIR / f"{out_name}.png"
    plot(results, png)
    payload = {
        "kind": "head_to_head",  # whatever the file's name, it renders under the head-to-head README marker
        "size": size_name,
        "settings": {**size, "rho_target": RHO, "seeds": args.seeds, "threads": args.threads},
        "hypothesis": "held-out loss: " + " < ".join(a for a in ("engram_moe", "moe", "dense") if a in args.arms),
        "corpora": results,
        "plot": str(png.relative_to(REPO_ROOT)),
    }
    path = write_result(out_name, payload)
    for name, entry in results.items():
        diffs = ", ".join(f"{k} {v['mean']:+.4f}±{v['std']:.4f}" for k, v in entry["paired_bpb_diff"].items())
        print(f"{name}: order by mean bpb {entry['order_by_mean_bpb']}; {diffs}")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
