"""Reproduce the Engram paper's three findings at CPU scale (issue 5): train small arms, compare held-out loss.

1. **Sparsity allocation**: at fixed total and activated parameters (``iso_parameter_variant`` of a
   pure-MoE base: only the routed-expert count and the table size change), sweep rho, the share of
   sparse parameters held by routed experts, from 1.0 (pure MoE) down to mostly-Engram. Paper: a U
   shape in held-out loss with the optimum near rho = 0.75-0.8.
2. **Memory scaling**: fixed backbone, Engram table grown over >= 5 sizes spanning > 10x; paper: loss
   falls on a straight line in log(rows). We fit loss = a + b * ln(rows) and report b and R^2.
3. **Ablations** of the Engram reference arm: no gate, no short conv, no tokenizer compression, a
   single residual branch (M = 1 instead of M > 1), a 4-gram order (same total rows), and the layer
   placement sweep (Engram at each block in turn).

Every arm trains with the same data, seed, schedule and token budget and is scored on the same
held-out tokens. The reference arm is also trained with ``noise_seeds``,
so every difference can be read against the seed-to-seed spread of one configuration. The tables
learn at 25x the base LR, not the paper's 5x: at a budget a million times smaller than the paper's,
rows are updated too rarely at 5x (``bench_h2h_why.py``: 25x is 0.033 bpb better on stdlib, 3 seeds),
and laws about memory can only show once the memory is trained. ``--engram-lr-mult 5`` restores
the paper's value. Arms go through ``_arms.run_arm``: they are resumable and reusable, and an arm is identified
by its model config, so identical arms (the memory sweep's reference size, the ablations' reference
and ``layer=1``) train once. ``--jobs 2`` trains two arms at a time, one thread each. Results:
``benchmarks/results/reproductions[_quick].json`` (machine, command, every arm's config, parameter
counts, held-out loss/bpb, training time) and three plots next to it.

The default corpus is the CPython standard library: at this budget Engram helps on code and not yet
on prose (see the head-to-head), and a law about how much memory helps can only show where it helps.
The sparsity arms hold P_act fixed too (``iso_parameter_variant(match_p_act=True)``: experts narrowed
to pay for Engram's projections) where that is feasible. ``--quick`` shrinks everything to minutes:
its numbers only show the pipeline works. The full setting is 23 distinct runs (21 arms + 2 noise
seeds) of 120 steps of 16 x 256 tokens, ~12-15 min each on one core: ~3 h with ``--jobs 2`` on 2 cores.

    python -m benchmarks.bench_reproductions --quick --jobs 2
    python -m benchmarks.bench_reproductions --jobs 2                    # stdlib, full setting
    python -m benchmarks.bench_reproductions --corpus sotu --only rho --jobs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks._arms import arm_status, resolve_corpus, run_arm
from benchmarks._common import REPO_ROOT, RESULTS_DIR, command_line, machine_info, save_png, write_result
from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec
from engramlm.models.accounting import count_parameters, iso_parameter_variant
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig

EXPERIMENTS = ("rho", "memory", "ablations")

SETTINGS: dict[str, dict[str, Any]] = {
    # the CPU head-to-head backbone (configs/sotu_moe.toml): d 256, 4 layers, 16 routed experts, top-2
    "full": {
        "hidden": 256, "layers": 4, "heads": 4, "mlp": 772, "expert": 256, "routed": 16, "head_dim": 32,
        "hc_mult": 4, "batch": 16, "seq": 256, "steps": 120, "eval_batches": 32, "warmup": 15,
        "rhos": (1.0, 0.9, 0.8, 0.7, 0.6, 0.45, 0.3), "bases": (1024, 2048, 4096, 8192, 16384, 32768),
        "ref_base": 8192, "engram_lr_mult": 25.0, "noise_seeds": (1, 2),
    },
    "quick": {
        "hidden": 64, "layers": 3, "heads": 2, "mlp": 172, "expert": 64, "routed": 16, "head_dim": 16,
        "hc_mult": 2, "batch": 4, "seq": 64, "steps": 30, "eval_batches": 4, "warmup": 5,
        "rhos": (1.0, 0.9, 0.8, 0.7, 0.55, 0.4), "bases": (256, 512, 1024, 2048, 4096),
        "ref_base": 1024, "engram_lr_mult": 25.0, "noise_seeds": (1,),
    },
}  # fmt: skip


def moe_base(s: dict[str, Any], vocab: int) -> ModelConfig:
    """The pure-MoE base (rho = 1) every sparsity arm is derived from."""
    return ModelConfig(
        name="repro-moe",
        vocab_size=vocab,
        hidden_size=s["hidden"],
        num_layers=s["layers"],
        n_heads=s["heads"],
        mlp_hidden=s["mlp"],
        hc_mult=1,
        max_seq_len=max(1024, s["seq"]),
        moe=MoEConfig(n_routed=s["routed"], n_shared=1, top_k=2, expert_hidden=s["expert"], n_dense_layers=1),
    )


def engram_template(s: dict[str, Any], base_rows: int, layers: tuple[int, ...] = (1,)) -> EngramConfig:
    spec = HashSpec(
        max_ngram_size=3,
        n_head_per_ngram=4,
        engram_vocab_size=(base_rows, base_rows),
        layer_ids=layers,
        boundary_mode="reset",
    )
    return EngramConfig(hash=spec, head_dim=s["head_dim"])


def rho_arms(s: dict[str, Any], vocab: int) -> dict[str, ModelConfig]:
    base = moe_base(s, vocab)
    arms = {}
    for rho in s["rhos"]:
        try:
            arms[f"rho={rho:g}"] = iso_parameter_variant(base, rho, engram_template(s, 1000), match_p_act=True).config
        except ConfigError as exc:  # too few or too narrow experts left to pay for the projections
            print(f"rho={rho:g}: P_act not matched ({exc})", flush=True)
            arms[f"rho={rho:g}"] = iso_parameter_variant(base, rho, engram_template(s, 1000)).config
    return arms


def reference_arm(s: dict[str, Any], vocab: int) -> ModelConfig:
    """Engram reference for memory scaling and ablations: the MoE base + Engram at block 1, M > 1 branches."""
    return moe_base(s, vocab).replace(
        name="repro-engram", hc_mult=s["hc_mult"], engram=engram_template(s, s["ref_base"])
    )


def memory_arms(s: dict[str, Any], vocab: int) -> dict[str, ModelConfig]:
    ref = reference_arm(s, vocab)
    return {f"base={b}": ref.replace(engram=engram_template(s, b)) for b in s["bases"]}


def ablation_arms(s: dict[str, Any], vocab: int) -> dict[str, ModelConfig]:
    ref = reference_arm(s, vocab)
    e = ref.engram
    h = e.hash
    rows = sum(h.engram_vocab_size)
    four = h.replace(max_ngram_size=4, engram_vocab_size=(max(2, rows // 3),) * 3)
    arms = {
        "reference": ref,
        "no_gate": ref.replace(engram=dataclasses.replace(e, gate=False)),
        "no_short_conv": ref.replace(engram=dataclasses.replace(e, use_short_conv=False)),
        "no_compression": ref.replace(engram=dataclasses.replace(e, hash=h.replace(compression=False))),
        "single_branch": ref.replace(hc_mult=1),
        "with_4gram": ref.replace(engram=dataclasses.replace(e, hash=four)),
    }
    for layer in range(ref.num_layers):
        arms[f"layer={layer}"] = ref.replace(engram=dataclasses.replace(e, hash=h.replace(layer_ids=(layer,))))
    return arms


def arm_dir(cfg: ModelConfig) -> str:
    """A run directory named by the model config, so identical arms of different experiments share it."""
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()[:12]


def arm_record(name: str, cfg: ModelConfig, r: dict[str, Any]) -> dict[str, Any]:
    counts = count_parameters(cfg)
    return {
        "arm": name,
        "eval_loss": r["heldout"]["loss"],
        "eval_bpb": r["heldout"]["bpb"],
        "train_loss": r["final_train_loss"],
        "train_s": r.get("train_s"),
        "tokens_per_s": r["tokens_per_s"],
        "p_tot": counts.p_tot,
        "p_act": counts.p_act,
        "rho": counts.rho,
        "engram_rows": list(counts.engram_rows),
        "model": cfg.to_dict(),
    }


def log_fit(rows: list[float], losses: list[float]) -> dict[str, float]:
    """loss = a + b ln(rows) by least squares, with R^2 and the standard error of b."""
    x, y = np.log(np.asarray(rows, dtype=float)), np.asarray(losses, dtype=float)
    b, a = np.polyfit(x, y, 1)
    ss_res = float(((y - (a + b * x)) ** 2).sum())
    ss = float(((y - y.mean()) ** 2).sum())
    sxx = float(((x - x.mean()) ** 2).sum())
    se = math.sqrt(ss_res / (len(x) - 2) / sxx) if len(x) > 2 and sxx else float("nan")
    r2 = 1.0 - ss_res / ss if ss else float("nan")
    return {"intercept": float(a), "slope_per_ln_rows": float(b), "slope_se": se, "r2": r2}


def findings(exps: dict[str, list[dict[str, Any]]], noise: dict[str, Any] | None) -> dict[str, Any]:
    """Each paper finding, measured, and read against the reference arm's seed spread where it is known.

    - rho: the best arm, how far each end of the sweep (pure MoE, most Engram) lies above it, and the
      vertex of a quadratic fit of loss in rho (None unless it is a minimum inside the sweep); a U shape
      "beyond noise" needs both ends above the best by more than the threshold.
    - memory: the log-linear fit (slope, its standard error, R^2) and the fitted drop over the span.
    - ablations: loss of each arm minus the reference's (positive = the ablation hurts).
    """
    thr = noise["threshold"] if noise else None
    out: dict[str, Any] = {}
    if "rho" in exps:
        arms = exps["rho"]
        rhos = np.array([1.0 if a["rho"] is None else a["rho"] for a in arms])
        loss = np.array([a["eval_loss"] for a in arms])
        i = int(loss.argmin())
        hi, lo = int(rhos.argmax()), int(rhos.argmin())
        c2, c1, _ = np.polyfit(rhos, loss, 2)
        vertex = -c1 / (2 * c2) if c2 > 0 else math.nan  # a minimum only when the parabola opens upwards
        p_tot = [a["p_tot"] for a in arms]
        out["rho"] = {
            "best_rho": float(rhos[i]),
            "best_arm": arms[i]["arm"],
            "p_tot_spread": (max(p_tot) - min(p_tot)) / max(p_tot),
            "u_shape": i not in (hi, lo),  # interior optimum
            "rise_pure_moe": float(loss[hi] - loss[i]),
            "rise_most_engram": float(loss[lo] - loss[i]),
            "most_engram_arm": arms[lo]["arm"],
            "u_shape_beyond_noise": None if thr is None else bool(min(loss[hi], loss[lo]) - loss[i] > thr),
            "quadratic_optimum_rho": float(vertex) if rhos.min() <= vertex <= rhos.max() else None,
            "paper": "U shape, optimum near rho 0.75-0.8",
        }
    if "memory" in exps:
        arms = exps["memory"]
        rows = [sum(a["engram_rows"]) for a in arms]
        fit = log_fit(rows, [a["eval_loss"] for a in arms])
        span = max(rows) / min(rows)
        drop = -fit["slope_per_ln_rows"] * math.log(span)
        out["memory"] = {
            **fit,
            "span": span,
            "fitted_drop": drop,
            "drop_beyond_noise": None if thr is None else bool(drop > thr),
            "paper": "loss linear in log(rows), negative slope",
        }
    if "ablations" in exps:
        ref = next(a for a in exps["ablations"] if a["arm"] == "reference")["eval_loss"]
        out["ablations"] = {a["arm"]: a["eval_loss"] - ref for a in exps["ablations"] if a["arm"] != "reference"}
    return out


def plot(results: dict[str, Any], prefix: str) -> list[str]:
    """One PNG per experiment; error bars are the reference arm's seed std where it was measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    noise, fnd = results.get("noise"), results["findings"]
    std = noise["std"] if noise else None
    written = []
    for exp, arms in results["experiments"].items():
        fig = Figure(figsize=(7, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        loss = np.array([a["eval_loss"] for a in arms])
        if exp == "rho":
            x = np.array([1.0 if a["rho"] is None else a["rho"] for a in arms])
            ax.errorbar(x, loss, yerr=std, marker="o", capsize=3, label="held-out loss")
            c = np.polyfit(x, loss, 2)
            grid = np.linspace(x.min(), x.max(), 100)
            ax.plot(grid, np.polyval(c, grid), ls="--", color="grey", label="quadratic fit")
            ax.set_xlabel("rho (share of sparse parameters in routed experts)")
            ax.invert_xaxis()
        elif exp == "memory":
            x = np.array([sum(a["engram_rows"]) for a in arms], dtype=float)
            ax.errorbar(x, loss, yerr=std, marker="o", capsize=3, label="held-out loss")
            f = fnd["memory"]
            ax.plot(x, f["intercept"] + f["slope_per_ln_rows"] * np.log(x), ls="--", color="grey",
                    label=f"fit: {f['slope_per_ln_rows']:+.4f} per ln(rows), R² {f['r2']:.2f}")  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("Engram table rows (log)")
        else:
            ref = next(a["eval_loss"] for a in arms if a["arm"] == "reference")
            ax.barh([a["arm"] for a in arms], loss - ref, xerr=std, capsize=3)
            if noise:
                ax.axvspan(-noise["threshold"], noise["threshold"], color="grey", alpha=0.2, label="within noise")
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_xlabel("held-out loss minus the reference arm's (nats)")
        if exp != "ablations":
            ax.set_ylabel("held-out loss (nats)")
        if exp != "ablations" or noise:
            ax.legend(fontsize=8)
        ax.set_title(f"{exp} ({results['setting']})" + (f", error bars: seed std {std:.4f}" if std else ""))
        fig.tight_layout()
        path = RESULTS_DIR / f"{prefix}_{exp}.png"
        save_png(fig, path)
        written.append(str(path))
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="stdlib", help="sotu, stdlib, a prepared dir or a text dir")
    ap.add_argument("--quick", action="store_true", help="tiny settings: minutes, pipeline check only")
    ap.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    ap.add_argument("--jobs", type=int, default=1, help="arms trained in parallel processes (one thread each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the setting's step count")
    ap.add_argument("--engram-lr-mult", type=float, default=None, help="table LR / base LR (setting: 25)")
    ap.add_argument(
        "--noise-seeds", type=int, nargs="*", default=None, help="extra seeds of the reference arm (setting: 1 2)"
    )
    ap.add_argument("--status", action="store_true", help="list each run as done / at step N / new, train nothing")
    ap.add_argument("--data-root", default=str(REPO_ROOT / "runs" / "data"))
    ap.add_argument("--runs-root", default=str(REPO_ROOT / "runs" / "repro"))
    args = ap.parse_args()

    from engramlm.data import TokenDataset

    setting = "quick" if args.quick else "full"
    s = dict(SETTINGS[setting])
    for key in ("steps", "engram_lr_mult", "noise_seeds"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["noise_seeds"] = tuple(x for x in s["noise_seeds"] if x != args.seed)
    optim = {"engram_lr_mult": s["engram_lr_mult"]}
    budget = {**s, "eval_tokens": s["eval_batches"] * s["batch"] * s["seq"]}
    corpus, data = resolve_corpus(args.corpus, Path(args.data_root))
    vocab = max(TokenDataset(data, "train", verify=False).vocab_size, 8)
    runs = Path(args.runs_root) / setting / corpus
    builders = {"rho": rho_arms, "memory": memory_arms, "ablations": ablation_arms}
    plan = {exp: builders[exp](s, vocab) for exp in args.only}
    ref = reference_arm(s, vocab)
    jobs = {(arm_dir(cfg), args.seed): cfg for arms in plan.values() for cfg in arms.values()}
    jobs.update({(arm_dir(ref), seed): ref for seed in s["noise_seeds"]})  # last: the spread, not the laws
    print(f"{sum(map(len, plan.values()))} arms, {len(jobs)} distinct runs; runs in {runs}", flush=True)
    if args.status:
        names: dict[str, list[str]] = {}
        for arms in plan.values():
            for name, cfg in arms.items():
                names.setdefault(arm_dir(cfg), []).append(name)
        for (key, seed), cfg in jobs.items():
            state = arm_status(cfg, budget, data, seed, runs / key / f"seed{seed}", optim)
            print(f"  {'/'.join(names[key]):<32} seed {seed}  {key}  {state}")
        return 0
    done: dict[tuple[str, int], dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {
            pool.submit(run_arm, cfg, budget, data, seed, runs / key / f"seed{seed}", 1, optim): (key, seed)
            for (key, seed), cfg in jobs.items()
        }
        for fut in tqdm(as_completed(futures), total=len(futures), desc="arms"):
            done[futures[fut]] = fut.result()
    results: dict[str, Any] = {
        "setting": setting, "corpus": corpus, "data_dir": str(data), "seed": args.seed,
        "parameters": s, "experiments": {},
    }  # fmt: skip
    for exp, arms in plan.items():
        results["experiments"][exp] = [
            arm_record(name, cfg, done[arm_dir(cfg), args.seed]) for name, cfg in arms.items()
        ]
        for rec in results["experiments"][exp]:
            print(f"  {exp:<9} {rec['arm']:<16} loss {rec['eval_loss']:.4f}  bpb {rec['eval_bpb']:.4f}", flush=True)
    exps = results["experiments"]
    seeds = (args.seed, *s["noise_seeds"])
    losses = [done[arm_dir(ref), seed]["heldout"]["loss"] for seed in seeds if (arm_dir(ref), seed) in done]
    if len(losses) > 1:
        std = float(np.std(losses, ddof=1))
        # a difference of two single-seed arms has std ~ sqrt(2) * std; 2 of those is our "beyond noise" line
        results["noise"] = {"arm": "reference", "seeds": list(seeds), "losses": losses, "std": std,
                            "threshold": 2 * math.sqrt(2) * std}  # fmt: skip
    results["findings"] = findings(exps, results.get("noise"))
    prefix = "reproductions" + ("_quick" if args.quick else "") + ("" if corpus == "stdlib" else f"_{corpus}")
    results["plots"] = plot(results, prefix)
    payload = {"machine": machine_info(), "command": command_line(), **results}
    path = write_result(prefix, payload)
    print(f"wrote {path}")
    for k, v in results["findings"].items():
        print(k, v)
    return 0 if all(math.isfinite(a["eval_loss"]) for arms in exps.values() for a in arms) else 1


if __name__ == "__main__":
    raise SystemExit(main())
