"""Muon's share of a MoE training step: per-parameter Newton-Schulz (before) vs batched same-shape chains (after).

Why: on the head-to-head's Engram + MoE arm (``configs/sotu_engram_moe.toml``: 13 routed + 1 shared
experts of 256 x 256 in 3 MoE layers) every expert is a matrix that Muon orthogonalises with ~15
matmuls, about as many FLOPs as the forward and backward of a 4k-token batch. This times whole
training steps (``Trainer.train_step`` on the same real SOTU batches, hashed outside the timer,
interleaved) with three Muon implementations swapped into the same trainer:

* ``v1 per-parameter``: the previous code (one Newton-Schulz chain per parameter, experts batched
  within a parameter, separate element-wise ops), kept here as the "before";
* ``v2 fp32``: :func:`engramlm.train.muon.orthogonalize_many`: every same-shape matrix of the model
  in one chain, two fused ``baddbmm`` + one ``bmm`` per iteration (the default);
* ``v2 bf16``: the same chain iterated in bf16 (as the Muon reference does on accelerators; an option,
  ``Muon(ns_dtype="bf16")``, not the default).

Every variant steps Muon on the same gradients of the same step, in rotating order (so the
comparison is paired and the machine's drift cancels), inside the trainer's own ``train_step``; the
rest of the step (gather, forward, backward, clip, AdamW, sparse table Adam) is timed once per step
and shared. Reported per contender: step time (rest + that Muon), optimizer time (Muon + AdamW +
sparse Adam) and its share of the step, training tokens/s, and the fraction of the machine's
measured fp32 GEMM rate the step reaches (FLOPs: 6 P_act per token, attention's sequence term left
out, plus Newton-Schulz's). The parameters take several updates per step: this times, it does not
train. Distributed work sharing divides the Newton-Schulz part by the number
of data-parallel ranks; it is tested in tests/test_muon.py, not timed here (2 shared cores).

Run from the repository root: ``python -m benchmarks.bench_muon`` (after
``engramlm data prepare --source sotu --out runs/data/sotu``).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import paired_ratios, stats, write_result
from engramlm.models.accounting import count_parameters
from engramlm.train import Trainer, load_train_config
from engramlm.train.muon import MUON_NUMERICS_VERSION, NS_COEFFS, Muon

CONFIG = "configs/sotu_engram_moe.toml"


def _orthogonalize_v1(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Numerics version 1 (the code before batching), verbatim."""
    a, b, c = NS_COEFFS
    x = g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        xx = x @ x.mT
        x = a * x + (b * xx + c * xx @ xx) @ x
    return x.mT if transposed else x


@torch.no_grad()
def _step_v1(opt: Muon) -> None:
    """Muon.step as of numerics version 1: one chain per parameter."""
    for group in opt.param_groups:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mom).add_(p.grad)
            g = p.grad.add(buf, alpha=mom)
            update = _orthogonalize_v1(g, group["ns_steps"]).to(p.dtype)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1])))


def ns_flops(opt: Muon) -> float:
    """Newton-Schulz FLOPs of one step: per matrix and iteration, X X^T, (XX^T)^2 and poly @ X."""
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            m, n = sorted(p.shape[-2:])
            k = p.numel() // (m * n)
            total += k * group["ns_steps"] * (2 * m * m * n + 2 * m**3 + 2 * m * m * n)
    return total


def gemm_rate(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 FLOP/s of one square matmul at this thread count (the machine's matmul rate)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/data/sotu", help="prepared corpus (engramlm data prepare)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="muon")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_muon_"))
    ov = [f"data.dir={args.data}", f"out_dir={tmp / 'run'}", "progress=false", "tensorboard=false",
          f"threads={args.threads}"]  # fmt: skip
    tr = Trainer(load_train_config(args.config, ov))
    muon, optim = tr.optim.muon, tr.optim
    variants = {
        "v1 per-parameter": (lambda: _step_v1(muon), torch.float32),
        "v2 fp32": (lambda: Muon.step(muon), torch.float32),
        "v2 bf16": (lambda: Muon.step(muon), torch.bfloat16),
    }
    names = list(variants)
    muon_s: dict[str, list[float]] = {n: [] for n in names}
    rest_s: list[float] = []
    inside: list[float] = []

    def step() -> bool:  # every Muon variant on the same gradients, in rotating order, then AdamW + sparse Adam
        t_in = time.perf_counter()
        r = len(rest_s)
        for n in names[r % len(names) :] + names[: r % len(names)]:
            fn, muon.ns_dtype = variants[n]
            t0 = time.perf_counter()
            fn()
            muon_s[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        optim.adamw.step()
        if optim.sparse is not None:
            optim.sparse.step()
        rest_s.append(time.perf_counter() - t0)
        inside.append(time.perf_counter() - t_in)
        return True

    optim.step = step
    batches = []
    for k in range(args.repeats + 1):
        raw = tr.loader.batch_at(k)
        batches.append({**raw, "row_ids": tr.model.hasher(raw["input_ids"], raw["doc_start"])})
    rate = gemm_rate(args.threads)
    compute_s: list[float] = []
    for r, batch in enumerate(batches):  # batch 0 is the warmup
        t0 = time.perf_counter()
        tr.train_step(batch)
        compute = time.perf_counter() - t0 - inside[-1]  # gather, forward, backward, clip, zero_grad, routing bias
        if r == 0:
            for v in (*muon_s.values(), rest_s, inside):
                v.clear()
            continue
        compute_s.append(compute)
        print(
            f"repeat {r}/{args.repeats}: compute {compute:.2f} s, Muon "
            + ", ".join(f"{n} {muon_s[n][-1]:.2f} s" for n in names)
        )
    rate = max(rate, gemm_rate(args.threads))
    tokens = tr.config.tokens_per_step
    counts = count_parameters(tr.model_config)
    backbone_flops = 6 * counts.p_act * tokens
    nsf = ns_flops(muon)
    arms = {}
    for n in names:
        opt = [m + o for m, o in zip(muon_s[n], rest_s, strict=True)]
        step_s = [c + o for c, o in zip(compute_s, opt, strict=True)]
        med = stats(step_s)["median"]
        arms[n] = {
            "step_s": stats(step_s),
            "muon_s": stats(muon_s[n]),
            "optimizer_s": stats(opt),
            "optimizer_share": stats([o / s for o, s in zip(opt, step_s, strict=True)]),
            "tokens_per_s": tokens / med,
            "matmul_rate_fraction": (backbone_flops + nsf) / med / rate,
        }
    result = {
        "params": {**vars(args), "tokens_per_step": tokens, "muon_numerics_version": MUON_NUMERICS_VERSION},
        "flops": {"backbone_6_p_act_per_step": backbone_flops, "newton_schulz_per_step": nsf, "p_act": counts.p_act},
        "gemm_fp32_flops_per_s": rate,
        "compute_s": stats(compute_s),
        "adamw_and_sparse_s": stats(rest_s),
        "arms": arms,
        "speedup_muon_v2_fp32_over_v1": stats(paired_ratios(muon_s["v1 per-parameter"], muon_s["v2 fp32"])),
        "speedup_muon_v2_bf16_over_v1": stats(paired_ratios(muon_s["v1 per-parameter"], muon_s["v2 bf16"])),
    }
    path = write_result(args.out, result)
    tr.close()
    print(f"Newton-Schulz {nsf / 1e9:.1f} GFLOP/step vs backbone {backbone_flops / 1e9:.1f} GFLOP/step;"
          f" fp32 GEMM rate {rate / 1e9:.1f} GFLOP/s")  # fmt: skip
    for n, a in arms.items():
        print(f"{n}: step {a['step_s']['median']:.2f} s, optimizer {a['optimizer_s']['median']:.2f} s "
              f"({a['optimizer_share']['median']:.0%} of the step), {a['tokens_per_s']:,.0f} tokens/s, "
              f"{a['matmul_rate_fraction']:.0%} of the matmul rate")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
