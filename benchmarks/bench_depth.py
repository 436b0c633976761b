"""Does Engram make early layers "deeper"? LogitLens and CKA on the trained head-to-head arms (issue 5).

The paper (§6, spec §9.8) reads two instruments on Engram-27B vs MoE-27B: **LogitLens**, the KL of
each layer's early exit to the model's own final distribution, is lower for Engram in early and
middle layers; **CKA** between the layers of the two models puts Engram's layer j next to a deeper
MoE layer (alignment index a_j > j, e.g. Engram layer 5 ~ MoE layer 12): static lookups no longer
have to be rebuilt by the first layers.

Here the same instruments run on the full-size head-to-head arms (``bench_head_to_head.py``: dense,
MoE and Engram + MoE at equal P_tot and P_act, 3 seeds, stdlib and SOTU), each arm against its own
seed's MoE, so the spread over seeds is measured and Engram − MoE differences are paired by seed.
LogitLens scores the first ``--lens-batches`` held-out batches; CKA uses the spec's minibatch
unbiased estimator on the final tokens of held-out trigrams that recur in the split (the offline
stand-in for the paper's named-entity final tokens), ``--cka-tokens`` of them.

    python -m benchmarks.bench_head_to_head --jobs 2     # trains the arms (hours), once
    python -m benchmarks.bench_depth                     # ~10 min on 1 core
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks._arms import RESULT_FILE
from benchmarks._common import REPO_ROOT, RESULTS_DIR, save_png, write_result
from engramlm.analysis.lens import alignment_index, cka_matrix, collect_states, logit_lens, recurring_ngram_ends
from engramlm.data import TokenDataset
from engramlm.models.locate import load_trained_model

ARMS = ("dense", "moe", "engram_moe")
BATCH, SEQ = 16, 256  # held-out batches for both instruments
CKA_MINIBATCH = 256
NGRAM = 3  # CKA positions: final tokens of held-out NGRAM-grams that recur in the split


def mean_std(rows: list[list[float]]) -> dict[str, list[float]]:
    a = np.asarray(rows, dtype=float)
    return {"mean": a.mean(0).tolist(), "std": (a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])).tolist()}


def run_corpus(corpus: str, runs: Path, data: Path, seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    val = TokenDataset(data, "val")
    where = recurring_ngram_ends(val, NGRAM)
    lens: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    cka: list[np.ndarray] = []
    moe_states: list[list[torch.Tensor]] = []
    for seed in tqdm(seeds, desc=corpus):
        models = {}
        for arm in ARMS:
            run = runs / corpus / arm / f"seed{seed}"
            if not (run / RESULT_FILE).exists():
                raise SystemExit(f"{run}: no finished arm; run python -m benchmarks.bench_head_to_head --jobs 2 first")
            models[arm] = load_trained_model(run).model
            lens[arm].append(logit_lens(models[arm], val, batch_size=BATCH, seq_len=SEQ, max_batches=args.lens_batches))
        states = {
            arm: collect_states(models[arm], val, max_tokens=args.cka_tokens, batch_size=BATCH, seq_len=SEQ,
                                positions=where)
            for arm in ("engram_moe", "moe")
        }  # fmt: skip
        cka.append(cka_matrix(states["engram_moe"], states["moe"], minibatch=CKA_MINIBATCH))
        moe_states.append(states["moe"])
    align = [alignment_index(m, args.top_k) for m in cka]
    # control: the same index between two MoE seeds. The top-k average pulls a_j toward the middle layers
    # (a_0 > 0 and a_last < last even for identical architectures), so "deeper" means above this, not above j.
    pairs = [(moe_states[(i + 1) % len(seeds)], moe_states[i]) for i in range(len(seeds))] if len(seeds) > 1 else []
    control = [alignment_index(cka_matrix(a, b, minibatch=CKA_MINIBATCH), args.top_k) for a, b in pairs]
    kl = {arm: [r["kl_to_final"] for r in lens[arm]] for arm in ARMS}
    paired = [np.subtract(e, m).tolist() for e, m in zip(kl["engram_moe"], kl["moe"], strict=True)]
    return {
        "layers": lens["moe"][0]["layers"],
        "engram_layers": list(models["engram_moe"].config.engram.hash.layer_ids),
        "lens_targets": lens["moe"][0]["targets"],
        "cka_tokens": int(states["moe"][0].shape[0]),
        "recurring_share": float(where.mean()),
        "kl_to_final": {arm: mean_std(kl[arm]) for arm in ARMS},
        "early_exit_loss": {arm: mean_std([r["early_exit_loss"] for r in lens[arm]]) for arm in ARMS},
        "kl_engram_minus_moe": mean_std(paired),
        "cka_engram_vs_moe": {"mean": np.mean(cka, 0).round(6).tolist(),
                              "per_seed": [m.round(6).tolist() for m in cka]},
        "alignment_index": {"top_k": args.top_k, **mean_std(align), "per_seed": align},
        "alignment_control_moe_vs_moe": {**mean_std(control), "per_seed": control} if control else None,
    }  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    corpora = results["corpora"]
    fig = Figure(figsize=(11, 3.8 * len(corpora)), dpi=110)
    FigureCanvasAgg(fig)
    for row, (corpus, r) in enumerate(corpora.items()):
        ax = fig.add_subplot(len(corpora), 2, 2 * row + 1)
        x = np.arange(len(r["layers"]))
        for arm in ARMS:
            ms = r["kl_to_final"][arm]
            ax.errorbar(x, ms["mean"], yerr=ms["std"], marker="o", capsize=3, label=arm)
        ax.set_xticks(x, r["layers"], fontsize=8)
        ax.set_yscale("symlog", linthresh=0.01)  # the embedding's KL dwarfs the later layers'
        ax.set_ylim(bottom=0.0)
        ax.set_ylabel("KL(final ‖ layer) [nats, symlog]")
        ax.set_title(f"{corpus}: LogitLens, mean ± std over seeds")
        ax.legend(fontsize=8)
        ax = fig.add_subplot(len(corpora), 2, 2 * row + 2)
        mat = np.asarray(r["cka_engram_vs_moe"]["mean"])
        im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(x, r["layers"], fontsize=8)
        ax.set_yticks(x, r["layers"], fontsize=8)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("Engram + MoE layer")
        ax.set_title(f"{corpus}: CKA (mean over seeds)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_png(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", nargs="+", default=["stdlib", "sotu"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lens-batches", type=int, default=4, help="held-out batches of 16 x 256 for LogitLens")
    ap.add_argument("--cka-tokens", type=int, default=2048, help="recurring-trigram end tokens for CKA")
    ap.add_argument("--top-k", type=int, default=2, help="layers averaged by the alignment index (paper: 5 of 30)")
    ap.add_argument("--runs", default=str(REPO_ROOT / "runs" / "h2h" / "head_to_head"))
    ap.add_argument("--data-root", default=str(REPO_ROOT / "runs" / "data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "seeds": args.seeds,
        "parameters": {"lens_batches": args.lens_batches, "batch": BATCH, "seq": SEQ, "cka_tokens": args.cka_tokens,
                       "cka_minibatch": CKA_MINIBATCH, "ngram": NGRAM, "top_k": args.top_k},
        "paper": {"logit_lens": "Engram lower KL in early and middle layers (MoE ~7.3-7.5 vs Engram ~6.7-7.0 over "
                                "layers 5-15 of 30)",
                  "cka": "alignment index a_j > j (Engram-27B layer 5 ~ MoE layer 12)"},
        "corpora": {c: run_corpus(c, Path(args.runs), Path(args.data_root) / c, args.seeds, args) for c in args.corpus},
    }  # fmt: skip
    results["plot"] = str(plot(results, RESULTS_DIR / "depth.png"))
    path = write_result("depth", results)
    print(f"wrote {path}")
    for corpus, r in results["corpora"].items():
        d, a = r["kl_engram_minus_moe"], r["alignment_index"]
        print(corpus, "KL Engram - MoE", np.round(d["mean"], 4), "alignment", np.round(a["mean"], 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
