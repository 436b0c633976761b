"""Short training runs of the bench MoE model with one Muon schedule: per-step losses and the val loss, as JSON.

Why: issue 18 item 5 asks whether fewer Newton-Schulz steps give "the same result"; beyond the distance to
U V^T (``bench_muon``'s quality table) the test that matters is the loss of a short run against the default
recipe, same steps and batches, compared with the seed-to-seed spread. 40 steps of 4,096 tokens with a
5-step warmup (the config's 50 would leave the LR near 0), fp32 iterations unless ``--dtype bf16``, one
thread.

Usage (from the repository root; one JSON line per run)::

    for spec in "quintic 5 0" "polar_express 3 0" "quintic 5 1" "polar_express 4 0"; do
      python -m benchmarks.muon_loss_runs $spec 40 >> muon_loss.jsonl; done

Arguments: schedule, ns steps, seed, training steps, [data dir (default runs/data/sotu)], [--dtype fp32|bf16].
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from engramlm.train import Trainer, load_train_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("schedule", choices=("quintic", "polar_express"))
    ap.add_argument("ns_steps", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("steps", type=int, help="training steps")
    ap.add_argument("data", nargs="?", default="runs/data/sotu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="Newton-Schulz iteration dtype")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    ov = [f"data.dir={args.data}", f"out_dir={tmp}/run", "progress=false", "tensorboard=false", "threads=1",
          f"seed={args.seed}", f"optim.muon_ns_schedule={args.schedule}", f"optim.muon_ns_steps={args.ns_steps}",
          f"optim.muon_ns_dtype={args.dtype}",
          "schedule.warmup_steps=5", f"tokens={args.steps * 4096}"]  # fmt: skip
    tr = Trainer(load_train_config("configs/sotu_engram_moe.toml", ov))
    losses = []
    for s in range(args.steps):
        raw = tr.loader.batch_at(s)
        out = tr.train_step({**raw, "row_ids": tr.model.hasher(raw["input_ids"], raw["doc_start"])})
        losses.append(float(out["loss"]))
    ev = tr.evaluate()
    print(json.dumps({"schedule": args.schedule, "steps": args.ns_steps, "dtype": args.dtype, "seed": args.seed,
                      "losses": losses, "eval": ev}, default=str))  # fmt: skip
    tr.close()


if __name__ == "__main__":
    main()
