"""The head-to-head's arms (dense, MoE, Engram + MoE at equal activated parameters) through lm-evaluation-harness.

Why: the head-to-head reports engramlm's own held-out bits per byte; this scores the same trained arms with
lm-eval 0.4.13 on the offline tasks of :mod:`engramlm.hf.evaltasks` (held-out bits per byte with the harness's
rolling windows, a last-word cloze, code-body bits per byte), through the ``engramlm`` harness model, so the
comparison is also available in the harness's terms and next to any other lm-eval model.

The arms are :func:`benchmarks.bench_head_to_head.arms`, trained by :func:`benchmarks._arms.run_arm` into the
head-to-head's own run directories (``runs/h2h/head_to_head[_SIZE]/CORPUS/ARM/seedS``): arms the head-to-head
already trained are reused, not retrained. Windows are the arms' training length.

    python -m benchmarks.bench_lm_eval --size quick --corpus sotu      # minutes
    python -m benchmarks.bench_lm_eval --size medium                    # after bench_head_to_head --size medium
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._arms import resolve_corpus, run_arm, spread
from benchmarks._common import REPO_ROOT, write_result
from benchmarks.bench_head_to_head import SIZES, arms
from engramlm.data import TokenDataset
from engramlm.hf.evaltasks import TASKS, build_tasks
from engramlm.hf.harness import evaluate_tasks

# (task, metric key in lm-eval's results, lower is better)
METRICS = (
    ("engram_bpb", "bits_per_byte,none", True),
    ("engram_cloze", "acc,none", False),
    ("engram_cloze", "perplexity,none", True),
    ("engram_code", "bits_per_byte,none", True),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", action="append", help="sotu, stdlib, or a prepared dir (repeatable; default sotu)")
    p.add_argument("--size", choices=sorted(SIZES), default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-examples", type=int, default=500, help="cloze and code examples per task")
    p.add_argument("--limit", type=int, default=None, help="lm-eval --limit: examples (documents) per task")
    p.add_argument("--data-root", default=str(REPO_ROOT / "runs" / "data"))
    p.add_argument("--runs-root", default=str(REPO_ROOT / "runs" / "h2h"))
    args = p.parse_args()
    size = dict(SIZES[args.size])
    h2h_name = "head_to_head" if args.size == "full" else f"head_to_head_{args.size}"
    torch.set_num_threads(args.threads)
    corpora: dict[str, Any] = {}
    for spec in args.corpus or ["sotu"]:
        name, data = resolve_corpus(spec, Path(args.data_root))
        vocab = TokenDataset(data, "train", verify=False).vocab_size
        task_dir = Path(args.runs_root) / "lm_eval_tasks" / name
        counts = build_tasks(data, task_dir, max_examples=args.max_examples)
        entry: dict[str, Any] = {"data_dir": str(data), "examples": counts, "arms": {}}
        for arm, model in arms(size, vocab).items():
            per_seed = []
            for seed in args.seeds:
                run = Path(args.runs_root) / h2h_name / name / arm / f"seed{seed}"
                trained = run_arm(model, size, data, seed, run, args.threads)
                t0 = time.perf_counter()
                doc = evaluate_tasks(run, list(TASKS), task_dir, data=data, limit=args.limit, batch_size=32,
                                     max_length=size["seq"], threads=args.threads)  # fmt: skip
                res = doc["results"]
                scores = {f"{t}:{m}": float(res[t][m]) for t, m, _ in METRICS}
                per_seed.append({"seed": seed, "run": str(run), "scores": scores, "eval_s": time.perf_counter() - t0,
                                 "engramlm_heldout_bpb": trained["heldout"]["bpb"]})  # fmt: skip
                print(f"{name} {arm} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
            entry["arms"][arm] = {
                "scores": {k: spread([r["scores"][k] for r in per_seed]) for k in per_seed[0]["scores"]},
                "runs": per_seed,
            }
        a = entry["arms"]
        entry["paired_diff"] = {}
        for x, y in (("engram_moe", "moe"), ("engram_moe", "dense")):
            pairs = list(zip(a[x]["runs"], a[y]["runs"], strict=True))
            entry["paired_diff"][f"{x}_minus_{y}"] = {
                k: spread([rx["scores"][k] - ry["scores"][k] for rx, ry in pairs]) for k in pairs[0][0]["scores"]
            }
        corpora[name] = entry
    payload = {
        "size": args.size,
        "settings": {
            **size,
            "seeds": args.seeds,
            "threads": args.threads,
            "max_examples": args.max_examples,
            "limit": args.limit,
            "lm_eval": __import__("lm_eval").__version__,
        },
        "metrics": [{"task": t, "metric": m, "lower_is_better": low} for t, m, low in METRICS],
        "corpora": corpora,
    }
    path = write_result(f"lm_eval_h2h_{args.size}", {"kind": "lm_eval_h2h", **payload})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
