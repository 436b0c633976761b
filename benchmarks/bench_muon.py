"""Muon's share of a MoE training step: Newton-Schulz schedules and dtypes, and how close each lands to U V^T.

Why: on the head-to-head's Engram + MoE arm (``configs/sotu_engram_moe.toml``: 13 routed + 1 shared
experts of 256 x 256 in 3 MoE layers) every expert is a matrix that Muon orthogonalises with ~15
matmuls per step, about as many FLOPs as the forward and backward of a 4k-token batch (issue 18 item 5:
the optimizer's share of the step should be at most 15%). This times whole training steps
(``Trainer.train_step`` on the same real SOTU batches, hashed outside the timer) with Muon variants
swapped into the same trainer:

* ``v2 fp32 (before)``: numerics version 2 verbatim (same-shape matrices stacked by ``cat`` each step,
  per-parameter momentum ops): the baseline for the element-wise and copy overhead;
* ``quintic 5 fp32``: the default (Jordan's coefficients, 5 steps), views instead of stacked copies,
  foreach momentum / weight decay, the last product written in place;
* ``quintic 5 bf16`` and ``polar_express N fp32|bf16`` for each ``--pe-steps`` N: the options
  (``optim.muon_ns_dtype``, ``optim.muon_ns_schedule``, ``optim.muon_ns_steps``).

Every variant steps Muon on the same gradients of the same step, in rotating order (so the comparison
is paired and the machine's drift cancels); the rest of the step (gather, forward, backward, clip,
AdamW, sparse table Adam) is timed once per step and shared. Reported per variant: step time (rest +
that Muon), optimizer time (Muon + AdamW + sparse Adam) and its share of the step, training tokens/s,
and the fraction of the machine's measured fp32 GEMM rate the step reaches (FLOPs: 6 P_act per token,
attention's sequence term left out, plus that variant's Newton-Schulz). The parameters take several
updates per step: the timing loop times, it does not train.

Quality (``--quality-steps``, on by default): a separate, real training run with the default recipe
records Muon's inputs (Nesterov momentum of real gradients) at those steps; every variant's output is
compared with the exact polar factor U V^T of each matrix (float64 SVD): the relative Frobenius
distance ||O - U V^T|| / ||U V^T|| (median and max over matrices) and the spread of O's singular values
(``polar_express 5 fp32``, at the default's cost, is scored too).
Distributed work sharing divides the Newton-Schulz part by the number of data-parallel ranks; it is
tested in tests/test_muon.py, not timed here (2 shared cores).

Run from the repository root: ``python -m benchmarks.bench_muon`` (after
``engramlm data prepare --source sotu --out runs/data/sotu``).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import engramlm.train.muon as muon_mod
from benchmarks._common import gemm_rate, paired_ratios, stats, write_result
from engramlm.models.accounting import count_parameters
from engramlm.train import Trainer, load_train_config
from engramlm.train.muon import MUON_NUMERICS_VERSION, NS_COEFFS, NS_DTYPES, Muon, ns_coefficients, orthogonalize

CONFIG = "configs/sotu_engram_moe.toml"
BEFORE = "v2 fp32 (before)"
# The default's step as of numerics version 3 (same numerics): every stage over all parameters in turn (foreach
# momentum, a model-sized Nesterov input and fp32 result) with 256 KiB chunks in every dtype, the before of the
# one-process chunked step (Muon._step_chunked, the default's own row).
V3_BEFORE = "default, v3 stage by stage (before)"
V3_CHUNK_BYTES = {torch.float32: 256 << 10, torch.bfloat16: 256 << 10}


def _orthogonalize_many_v2(mats: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Numerics version 2's one-process path (stack every same-shape matrix, chunk, cat back), verbatim."""
    a, b, c = NS_COEFFS
    out: list[torch.Tensor] = [torch.empty(0)] * len(mats)
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault((m.shape[-2], m.shape[-1]), []).append(i)
    for (rows, cols), idx in buckets.items():
        stack = torch.cat([mats[i].reshape(-1, rows, cols) for i in idx]) if len(idx) > 1 else mats[idx[0]]
        stack = stack.reshape(-1, rows, cols)
        v2_bytes = muon_mod.CPU_CHUNK_BYTES[torch.float32]  # version 2's one chunk size (fp32 only)
        per = max(1, v2_bytes // (rows * cols * 4)) if stack.device.type == "cpu" else 1 << 62
        res = []
        for chunk in stack.split(per):
            x = chunk.float()
            t = x.shape[-2] > x.shape[-1]
            x = x.mT if t else x
            x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
            for _ in range(steps):
                xx = torch.bmm(x, x.mT)
                poly = torch.baddbmm(xx, xx, xx, beta=b, alpha=c)
                x = torch.baddbmm(x, poly, x, beta=a)
            res.append((x.mT if t else x).float())
        result = torch.cat(res) if len(res) > 1 else res[0]
        offset = 0
        for i in idx:
            n = mats[i].numel() // (rows * cols)
            out[i] = result[offset : offset + n].reshape(mats[i].shape)
            offset += n
    return out


@torch.no_grad()
def _step_v2(opt: Muon) -> None:
    """Muon.step as of numerics version 2 (fp32, quintic, 5 steps)."""
    for group in opt.param_groups:
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mom).add_(p.grad)
            params.append(p)
            grads.append(p.grad.add(buf, alpha=mom))
        for p, update in zip(params, _orthogonalize_many_v2(grads, 5), strict=True):
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1])))


def ns_flops(opt: Muon, steps: int) -> float:
    """Newton-Schulz FLOPs of one step: per matrix and iteration, X X^T, (XX^T)^2 and poly @ X."""
    total = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            m, n = sorted(p.shape[-2:])
            k = p.numel() // (m * n)
            total += k * steps * (2 * m * m * n + 2 * m**3 + 2 * m * m * n)
    return total


def variants(
    muon: Muon, pe_steps: list[int], default: tuple[str, str, int]
) -> dict[str, tuple[Callable[[], None], str, str, int]]:
    """name -> (step function, dtype, schedule, steps); each sets the optimizer's options, then steps.
    ``default``: the config's (dtype, schedule, steps), also timed as :data:`V3_BEFORE`."""

    def run(dtype: str, schedule: str, steps: int) -> Callable[[], None]:
        def fn() -> None:
            muon.ns_dtype, muon.ns_schedule = NS_DTYPES[dtype], schedule
            for g in muon.param_groups:
                g["ns_steps"] = steps
            Muon.step(muon)

        return fn

    def stage_by_stage(dtype: str, schedule: str, steps: int) -> Callable[[], None]:
        def fn() -> None:
            saved = dict(muon_mod.CPU_CHUNK_BYTES)
            muon_mod.CPU_CHUNK_BYTES.update(V3_CHUNK_BYTES)
            muon._step_chunked = muon._step_whole  # type: ignore[method-assign]
            try:
                run(dtype, schedule, steps)()
            finally:
                del muon._step_chunked
                muon_mod.CPU_CHUNK_BYTES.update(saved)

        return fn

    out = {BEFORE: (lambda: _step_v2(muon), "fp32", "quintic", 5)}
    d = default
    out[V3_BEFORE] = (stage_by_stage(*d), *d)
    for dtype in ("fp32", "bf16"):
        out[f"quintic 5 {dtype}"] = (run(dtype, "quintic", 5), dtype, "quintic", 5)
        for n in pe_steps:
            out[f"polar_express {n} {dtype}"] = (run(dtype, "polar_express", n), dtype, "polar_express", n)
    return out


def quality(config: str, overrides: list[str], at: list[int], specs: dict[str, tuple[str, str, int]]) -> dict:
    """Train the default recipe for max(at)+1 steps, record Muon's inputs at the steps in ``at``, and score
    every (dtype, schedule, steps) against the exact polar factor of each matrix."""
    tr = Trainer(load_train_config(config, overrides))
    captured: dict[int, list[torch.Tensor]] = {}
    real = muon_mod.orthogonalize_many

    def spy(mats, *args, **kwargs):
        if tr.step in at:
            captured[tr.step] = [m.detach().clone() for m in mats]
        return real(mats, *args, **kwargs)

    muon_mod.orthogonalize_many = spy
    tr.optim.muon._step_chunked = tr.optim.muon._step_whole  # type: ignore[method-assign]  # (bitwise equal) calls it
    try:
        for s in range(max(at) + 1):
            raw = tr.loader.batch_at(s)
            tr.train_step({**raw, "row_ids": tr.model.hasher(raw["input_ids"], raw["doc_start"])})
    finally:
        muon_mod.orthogonalize_many = real
        tr.close()
    result: dict = {"steps": at, "variants": {}}
    exact = {}
    for s, mats in captured.items():
        exact[s] = []
        for m in mats:
            x = m.reshape(-1, *m.shape[-2:]).double()
            u, sv, vh = torch.linalg.svd(x, full_matrices=False)
            exact[s].append((u @ vh, sv / sv.square().sum(-1, keepdim=True).sqrt()))
    result["input_sigma_rel_quantiles"] = {
        str(s): _quantiles(torch.cat([e[1].flatten() for e in exact[s]])) for s in captured
    }
    for name, (dtype, schedule, steps) in specs.items():
        per_step = {}
        for s, mats in captured.items():
            errs, sigmas = [], []
            for m, (polar, _) in zip(mats, exact[s], strict=True):
                o = orthogonalize(m, steps, NS_DTYPES[dtype], schedule).reshape(polar.shape).double()
                errs.append((o - polar).norm(dim=(-2, -1)) / polar.norm(dim=(-2, -1)))
                sigmas.append(torch.linalg.svdvals(o).flatten())
            e = torch.cat(errs)
            per_step[str(s)] = {
                "polar_rel_error": stats(e.tolist()),
                "sigma_quantiles": _quantiles(torch.cat(sigmas)),
            }
        result["variants"][name] = per_step
    return result


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    qs = (0.01, 0.05, 0.5, 0.95, 0.99)
    vals = torch.quantile(x.float()[:: max(1, x.numel() // 1_000_000)], torch.tensor(qs)).tolist()
    return {f"q{round(q * 100):02d}": v for q, v in zip(qs, vals, strict=True)} | {"max": float(x.max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="runs/data/sotu", help="prepared corpus (engramlm data prepare)")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pe-steps", type=int, nargs="*", default=[3, 4], help="polar_express step counts to time")
    p.add_argument("--quality-steps", type=int, nargs="*", default=[1, 4, 10, 20],
                   help="training steps whose Muon inputs score each variant against U V^T (none: skip)")  # fmt: skip
    p.add_argument("--out", default="muon")
    p.add_argument("--label", default=None, help="a note shown in the README table's title")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_muon_"))
    ov = [f"data.dir={args.data}", f"out_dir={tmp / 'run'}", "progress=false", "tensorboard=false",
          f"threads={args.threads}"]  # fmt: skip
    tr = Trainer(load_train_config(args.config, ov))
    muon, optim = tr.optim.muon, tr.optim
    o = tr.config.optim
    table = variants(muon, args.pe_steps, (o.muon_ns_dtype, o.muon_ns_schedule, o.muon_ns_steps))
    names = list(table)
    muon_s: dict[str, list[float]] = {n: [] for n in names}
    rest_s: list[float] = []
    inside: list[float] = []

    def step() -> bool:  # every Muon variant on the same gradients, in rotating order, then AdamW + sparse Adam
        t_in = time.perf_counter()
        r = len(rest_s)
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            table[n][0]()
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
        print(f"repeat {r}/{args.repeats}: compute {compute:.2f} s, Muon "
              + ", ".join(f"{n} {muon_s[n][-1]:.2f} s" for n in names), flush=True)  # fmt: skip
    rate = max(rate, gemm_rate(args.threads))
    load_after = os.getloadavg()
    tokens = tr.config.tokens_per_step
    counts = count_parameters(tr.model_config)
    backbone_flops = 6 * counts.p_act * tokens
    arms = {}
    for n in names:
        _fn, dtype, schedule, steps = table[n]
        nsf = ns_flops(muon, steps)
        opt = [m + o for m, o in zip(muon_s[n], rest_s, strict=True)]
        step_s = [c + o for c, o in zip(compute_s, opt, strict=True)]
        med = stats(step_s)["median"]
        arms[n] = {
            "ns_dtype": dtype,
            "ns_schedule": schedule,
            "ns_steps": steps,
            "newton_schulz_flops_per_step": nsf,
            "step_s": stats(step_s),
            "muon_s": stats(muon_s[n]),
            "optimizer_s": stats(opt),
            "optimizer_share": stats([o / s for o, s in zip(opt, step_s, strict=True)]),
            "tokens_per_s": tokens / med,
            "matmul_rate_fraction": (backbone_flops + nsf) / med / rate,
            "muon_speedup_over_before": stats(paired_ratios(muon_s[BEFORE], muon_s[n])),
            "muon_speedup_over_v3_stage_by_stage": stats(paired_ratios(muon_s[V3_BEFORE], muon_s[n])),
        }
    tr.close()
    qual = None
    if args.quality_steps:
        specs = {n: table[n][1:] for n in names if n not in (BEFORE, V3_BEFORE)}
        specs.setdefault("polar_express 5 fp32", ("fp32", "polar_express", 5))  # same cost as the default: scored only
        qual = quality(args.config, [*ov[:1], f"out_dir={tmp / 'quality'}", *ov[2:]], args.quality_steps, specs)
    result = {
        "label": args.label,
        "params": {
            **vars(args),
            "tokens_per_step": tokens,
            "muon_numerics_version": MUON_NUMERICS_VERSION,
        },
        "load_average_before_after": [list(load_before), list(load_after)],
        "flops": {"backbone_6_p_act_per_step": backbone_flops, "p_act": counts.p_act},
        "gemm_fp32_flops_per_s": rate,
        "compute_s": stats(compute_s),
        "adamw_and_sparse_s": stats(rest_s),
        "coefficients": {f"polar_express {n}": ns_coefficients("polar_express", n) for n in args.pe_steps},
        "arms": arms,
        "quality": qual,
    }
    path = write_result(args.out, result)
    print(f"backbone {backbone_flops / 1e9:.1f} GFLOP/step; fp32 GEMM rate {rate / 1e9:.1f} GFLOP/s; "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    for n, a in arms.items():
        print(f"{n}: Muon {a['muon_s']['median']:.2f} s ({a['muon_speedup_over_before']['median']:.2f}x v2, "
              f"{a['muon_speedup_over_v3_stage_by_stage']['median']:.2f}x v3 stage by stage), "
              f"step {a['step_s']['median']:.2f} s, optimizer {a['optimizer_share']['median']:.0%} of the step, "
              f"{a['tokens_per_s']:,.0f} tokens/s, {a['matmul_rate_fraction']:.0%} of the matmul rate")  # fmt: skip
    if qual:
        for n, per in qual["variants"].items():
            errs = ", ".join(f"step {s} {v['polar_rel_error']['median']:.3f}" for s, v in per.items())
            print(f"{n}: median ||O - UV^T|| / ||UV^T||: {errs}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
