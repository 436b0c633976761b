"""Short training runs of the bench MoE model with one Muon schedule: per-step losses and the val loss, as JSON.

Why: issue 18 item 5 asks whether fewer Newton-Schulz steps give "the same result"; beyond the distance to
U V^T (``bench_muon``'s quality table) the test that matters is the loss of a short run against the default
recipe, same steps and batches, compared with the seed-to-seed spread. 40 steps of 4,096 tokens with a
5-step warmup (the config's 50 would leave the LR near 0), fp32 iterations, one thread.

Usage (from the repository root; one JSON line per run)::

    for spec in "quintic 5 0" "polar_express 3 0" "quintic 5 1" "polar_express 4 0"; do
      python -m benchmarks.muon_loss_runs $spec 40 >> muon_loss.jsonl; done

Arguments: schedule, ns steps, seed, training steps, [data dir (default runs/data/sotu)].
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from engramlm.train import Trainer, load_train_config

torch.set_num_threads(1)
sched, steps, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = sys.argv[5] if len(sys.argv) > 5 else "runs/data/sotu"
tmp = Path(tempfile.mkdtemp())
ov = [f"data.dir={data}", f"out_dir={tmp}/run", "progress=false", "tensorboard=false", "threads=1",
      f"seed={seed}", f"optim.muon_ns_schedule={sched}", f"optim.muon_ns_steps={steps}", "schedule.warmup_steps=5",
      f"tokens={n * 4096}"]  # fmt: skip
tr = Trainer(load_train_config("configs/sotu_engram_moe.toml", ov))
losses = []
for s in range(n):
    raw = tr.loader.batch_at(s)
    out = tr.train_step({**raw, "row_ids": tr.model.hasher(raw["input_ids"], raw["doc_start"])})
    losses.append(float(out["loss"]))
ev = tr.evaluate()
print(json.dumps({"schedule": sched, "steps": steps, "seed": seed, "losses": losses, "eval": ev}, default=str))
tr.close()
