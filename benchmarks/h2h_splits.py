"""Where does the head-to-head gap come from? Score its trained arms on the training text and on both held-out splits.

Issue 19: on State of the Union prose the Engram arm trails the MoE on held-out text although its training loss
is lower, and the gap did not close at twice the full budget. This scores the checkpoints a head-to-head run left
(``runs/h2h/<result>/<corpus>/<arm>/seed*``) on the same number of tokens from each split:

- ``train``: the first windows of the training split (at the budgets here most were seen during training: the
  loader samples windows with replacement, ~1 - e^-(tokens / split tokens) of them at least once);
- ``test`` and ``val``: held out. For SOTU the two differ on purpose (``engramlm.data.splits.SOTU_RULE``): ``test``
  is every tenth pre-2000 speech (the training era), ``val`` every speech from 2000 on (a later era).

The paired Engram - MoE difference per split separates what the memory learned that transfers (a held-out gap near
the train gap) from what it memorised (a train gap below zero, held-out gaps above), and the era shift (val vs test).

    python -m benchmarks.h2h_splits --result head_to_head_long_sotu --corpus sotu
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks._arms import spread
from benchmarks._common import REPO_ROOT, write_result
from engramlm.data import EvalLoader, TokenDataset
from engramlm.models.evaluate import evaluate
from engramlm.models.locate import load_trained_model

SPLITS = ("train", "test", "val")
ARMS = ("moe", "engram_moe")


def score_runs(root: Path, data: Path, batches: int, batch: int, seq: int, threads: int) -> dict[str, Any]:
    """{arm: {seed: {split: evaluate(...)}}} for every seed directory both arms have under ``root``."""
    seeds = sorted({p.name for arm in ARMS for p in (root / arm).glob("seed*")})
    seeds = [s for s in seeds if all((root / arm / s).is_dir() for arm in ARMS)]
    if not seeds:
        raise SystemExit(f"h2h_splits: no seed directory holds both {ARMS} under {root}")
    out: dict[str, Any] = {arm: {} for arm in ARMS}
    jobs = [(arm, s, split) for arm in ARMS for s in seeds for split in SPLITS]
    loaded: tuple[tuple[str, str], Any] | None = None  # one model in memory at a time
    for arm, s, split in tqdm(jobs, desc="scoring", unit="split"):
        if loaded is None or loaded[0] != (arm, s):
            loaded = ((arm, s), load_trained_model(root / arm / s).model)
        model = loaded[1]
        torch.manual_seed(0)
        loader = EvalLoader(TokenDataset(data, split, verify=False), batch, seq, row_ids_fn=model.hasher)
        out[arm].setdefault(s, {})[split] = evaluate(model, loader, batches, threads)
    return out


def summarise(scores: dict[str, Any]) -> dict[str, Any]:
    """Per split: each arm's loss/bpb and the paired Engram - MoE differences (nats and bpb) over seeds."""
    seeds = sorted(scores["moe"])
    rows = {}
    for split in SPLITS:

        def diff(key: str, split: str = split) -> list[float]:
            return [scores["engram_moe"][s][split][key] - scores["moe"][s][split][key] for s in seeds]

        rows[split] = {
            "tokens": int(scores["moe"][seeds[0]][split]["tokens"]),
            **{f"{arm}_{key}": spread([scores[arm][s][split][key] for s in seeds]) for arm in ARMS
               for key in ("loss", "bpb")},
            "gap_loss": spread(diff("loss")), "gap_bpb": spread(diff("bpb")),
        }  # fmt: skip
    # the memory's excess generalisation gap: how much more the Engram arm loses from train to held-out than the MoE
    for split in ("test", "val"):
        rows[split]["excess_vs_train_loss"] = rows[split]["gap_loss"]["mean"] - rows["train"]["gap_loss"]["mean"]
    return {"seeds": seeds, "splits": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--result", required=True, help="a head-to-head result name (its runs under --runs-root)")
    ap.add_argument("--corpus", default="sotu")
    ap.add_argument("--runs-root", default=str(REPO_ROOT / "runs" / "h2h"))
    ap.add_argument("--data-root", default=str(REPO_ROOT / "runs" / "data"))
    ap.add_argument("--batches", type=int, default=64, help="batches of 16 x 256 tokens per split (or the split)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    root, data = Path(args.runs_root) / args.result / args.corpus, Path(args.data_root) / args.corpus
    scores = score_runs(root, data, args.batches, 16, 256, args.threads)
    doc = {"kind": "h2h_splits", "result": args.result, "corpus": args.corpus, **summarise(scores), "scores": scores}
    path = write_result(f"h2h_splits_{args.result}", doc)
    for split, r in doc["splits"].items():
        print(f"{split:<5} {r['tokens']:>8,} tokens  moe {r['moe_loss']['mean']:.4f}  "
              f"engram {r['engram_moe_loss']['mean']:.4f}  gap {r['gap_loss']['mean']:+.4f} nats "
              f"({r['gap_bpb']['mean']:+.4f} bpb)")  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
