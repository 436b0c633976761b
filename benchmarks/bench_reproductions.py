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

Every arm trains with the same data, seed, schedule and token budget (``engramlm.train.Trainer``) and
is scored on the same held-out batches. Results: ``benchmarks/results/reproductions[_quick].json``
(machine, command, every arm's config, parameter counts, final eval loss/bpb, wall time) and three
plots next to it. ``--quick`` shrinks the model, the batch and the step count so the whole suite runs
in minutes: its numbers only show the pipeline works, they are far too noisy to confirm or refute
the paper. The full setting (default) takes hours on 2 cores.

    python benchmarks/bench_reproductions.py --data runs/data/sotu --quick
    python benchmarks/bench_reproductions.py --data runs/data/sotu --only rho memory
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, command_line, machine_info, write_result
from engramlm.hashing.spec import HashSpec
from engramlm.models.accounting import count_parameters, iso_parameter_variant
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.utils.io import atomic_write_bytes, atomic_write_text

EXPERIMENTS = ("rho", "memory", "ablations")

SETTINGS: dict[str, dict[str, Any]] = {
    # the CPU head-to-head backbone (configs/sotu_moe.toml): d 256, 4 layers, 16 routed experts, top-2
    "full": {
        "hidden": 256, "layers": 4, "heads": 4, "mlp": 772, "expert": 256, "routed": 16, "head_dim": 32,
        "hc_mult": 4, "batch": 16, "seq": 256, "steps": 1500, "eval_batches": 32, "warmup": 50,
        "rhos": (1.0, 0.9, 0.8, 0.7, 0.6, 0.45, 0.3), "bases": (1024, 2048, 4096, 8192, 16384, 32768),
        "ref_base": 8192,
    },
    "quick": {
        "hidden": 64, "layers": 3, "heads": 2, "mlp": 172, "expert": 64, "routed": 16, "head_dim": 16,
        "hc_mult": 2, "batch": 4, "seq": 64, "steps": 30, "eval_batches": 4, "warmup": 5,
        "rhos": (1.0, 0.9, 0.8, 0.7, 0.55, 0.4), "bases": (256, 512, 1024, 2048, 4096),
        "ref_base": 1024,
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


def train_arm(
    name: str, cfg: ModelConfig, s: dict[str, Any], data: Path, runs: Path, seed: int, threads: int | None = None
) -> dict[str, Any]:
    """Train one arm from scratch and return its held-out eval and parameter counts."""
    from engramlm.train import Trainer
    from engramlm.train.config import DataConfig, ModelSection, ScheduleConfig, TrainConfig

    arm_dir = runs / name.replace("=", "_")
    arm_dir.mkdir(parents=True, exist_ok=True)
    model_file = arm_dir / "model.json"
    atomic_write_text(model_file, cfg.to_json())
    tc = TrainConfig(
        data=DataConfig(
            dir=str(data),
            batch_size=s["batch"],
            seq_len=s["seq"],
            eval_batch_size=s["batch"],
            eval_max_batches=s["eval_batches"],
        ),
        model=ModelSection(file=str(model_file)),
        schedule=ScheduleConfig(warmup_steps=s["warmup"]),
        steps=s["steps"],
        seed=seed,
        out_dir=str(arm_dir / "run"),
        checkpoint_every=s["steps"],
        keep_checkpoints=1,
        eval_every=0,
        log_every=max(1, s["steps"] // 20),
        threads=threads,
        tensorboard=False,
        progress=False,
    )
    t0 = time.perf_counter()
    summary = Trainer(tc).fit()
    wall = time.perf_counter() - t0
    counts = count_parameters(cfg)
    ev = summary["eval"] or {}
    rec = {
        "arm": name,
        "eval_loss": ev.get("loss"),
        "eval_bpb": ev.get("bpb"),
        "train_loss": summary.get("train_loss"),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "wall_s": wall,
        "p_tot": counts.p_tot,
        "p_act": counts.p_act,
        "rho": counts.rho,
        "engram_rows": list(counts.engram_rows),
        "model": cfg.to_dict(),
    }
    print(f"  {name:<18} eval loss {rec['eval_loss']:.4f}  bpb {rec['eval_bpb']:.4f}  ({wall:.0f} s)", flush=True)
    return rec


def log_fit(rows: list[float], losses: list[float]) -> dict[str, float]:
    """loss = a + b ln(rows) by least squares, with R^2."""
    x, y = np.log(np.asarray(rows, dtype=float)), np.asarray(losses, dtype=float)
    b, a = np.polyfit(x, y, 1)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - (a + b * x)) ** 2).sum()) / ss if ss else float("nan")
    return {"intercept": float(a), "slope_per_ln_rows": float(b), "r2": r2}


def plot(results: dict[str, Any], prefix: str) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for exp, arms in results["experiments"].items():
        fig = Figure(figsize=(7, 4), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if exp == "rho":
            x = [a["rho"] if a["rho"] is not None else 1.0 for a in arms]
            ax.plot(x, [a["eval_loss"] for a in arms], marker="o")
            ax.set_xlabel("rho (share of sparse parameters in routed experts)")
            ax.invert_xaxis()
        elif exp == "memory":
            x = [sum(a["engram_rows"]) for a in arms]
            ax.semilogx(x, [a["eval_loss"] for a in arms], marker="o")
            ax.set_xlabel("Engram table rows (log)")
        else:
            ax.barh([a["arm"] for a in arms], [a["eval_loss"] for a in arms])
            ax.set_xlim(min(a["eval_loss"] for a in arms) - 0.05, max(a["eval_loss"] for a in arms) + 0.05)
            ax.set_xlabel("held-out loss")
        if exp != "ablations":
            ax.set_ylabel("held-out loss (nats)")
        ax.set_title(f"{exp} ({results['setting']})")
        fig.tight_layout()
        path = RESULTS_DIR / f"{prefix}_{exp}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(path, buf.getvalue())
        written.append(str(path))
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a prepared corpus (engramlm data prepare)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: minutes, pipeline check only")
    ap.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    ap.add_argument("--runs-dir", default=None, help="where arms train (default runs/repro[_quick])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the setting's step count")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per arm (default: torch's)")
    args = ap.parse_args()

    from engramlm.data import TokenDataset

    setting = "quick" if args.quick else "full"
    s = dict(SETTINGS[setting])
    if args.steps is not None:
        s["steps"] = args.steps
    data = Path(args.data)
    vocab = max(TokenDataset(data, "train", verify=False).vocab_size, 8)
    runs = Path(args.runs_dir or f"runs/repro{'_quick' if args.quick else ''}")
    builders = {"rho": rho_arms, "memory": memory_arms, "ablations": ablation_arms}
    results: dict[str, Any] = {"setting": setting, "parameters": s, "experiments": {}, "findings": {}}
    for exp in args.only:
        arms = builders[exp](s, vocab)
        print(f"{exp}: {len(arms)} arms", flush=True)
        results["experiments"][exp] = [
            train_arm(name, cfg, s, data, runs / exp, args.seed, args.threads) for name, cfg in arms.items()
        ]
    exps = results["experiments"]
    if "rho" in exps:
        best = min(exps["rho"], key=lambda a: a["eval_loss"])
        p_tot = [a["p_tot"] for a in exps["rho"]]
        results["findings"]["rho"] = {
            "best_rho": best["rho"],
            "best_arm": best["arm"],
            "p_tot_spread": (max(p_tot) - min(p_tot)) / max(p_tot),
            "u_shape": bool(
                best["arm"] != exps["rho"][0]["arm"] and best["arm"] != exps["rho"][-1]["arm"]
            ),  # interior optimum
            "paper": "U shape, optimum near rho 0.75-0.8",
        }
    if "memory" in exps:
        arms = exps["memory"]
        results["findings"]["memory"] = {
            **log_fit([sum(a["engram_rows"]) for a in arms], [a["eval_loss"] for a in arms]),
            "span": max(sum(a["engram_rows"]) for a in arms) / min(sum(a["engram_rows"]) for a in arms),
            "paper": "loss linear in log(rows), negative slope",
        }
    if "ablations" in exps:
        ref = next(a for a in exps["ablations"] if a["arm"] == "reference")["eval_loss"]
        results["findings"]["ablations"] = {
            a["arm"]: a["eval_loss"] - ref for a in exps["ablations"] if a["arm"] != "reference"
        }
    prefix = "reproductions_quick" if args.quick else "reproductions"
    results["plots"] = plot(results, prefix)
    payload = {"machine": machine_info(), "command": command_line(), **results}
    path = write_result(prefix, payload)
    print(f"wrote {path}")
    for k, v in results["findings"].items():
        print(k, v)
    return 0 if all(math.isfinite(a["eval_loss"]) for arms in exps.values() for a in arms) else 1


if __name__ == "__main__":
    raise SystemExit(main())
