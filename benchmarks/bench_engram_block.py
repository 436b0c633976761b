"""Forward time of the fused EngramBlock vs the reference-structure ReferenceEngram, and its
fraction of the machine's measured fp32 matmul peak.

Why: the block's cost is dominated by one projection [B*T, d_mem] x [d_mem, (M+1)*d]; the fused
block does it as ONE matmul (``wkv``) and vectorises the M branches, while the reference
(:class:`engramlm.nn.engram_reference.ReferenceEngram`, the demo's structure) runs M+1 separate
projections and a Python loop over branches. Comparing both against a plain torch.matmul of the
projection's shape, timed interleaved in the same run, says how much of the achievable peak the
block reaches, independent of how fast this particular (noisy, shared) machine is.

Geometry: the DEMO preset's block (hidden 1024, M=4, 16 heads x 64 = d_mem 1024, conv on with
dilation 3, proj_bias, dtype-epsilon gate norm), with a 1M-row table: table rows change memory,
not FLOPs. Run from the repository root: ``python -m benchmarks.bench_engram_block``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import interleaved_timings, paired_ratios, stats, write_result
from engramlm.models.model import engram_block
from engramlm.models.presets import get_preset
from engramlm.nn.engram import EngramBlock
from engramlm.nn.engram_reference import ReferenceEngram


def demo_block(num_rows: int) -> EngramBlock:
    """The demo preset's Engram block geometry, built the way the model builds it."""
    cfg = get_preset("demo")
    h = cfg.engram.hash  # type: ignore[union-attr]
    return engram_block(cfg, num_rows, h.n_head_per_ngram * (h.max_ngram_size - 1))


def block_flops(n_tok: int, d: int, m: int, d_mem: int, kernel: int, conv: bool) -> dict[str, int]:
    """FLOP estimate of one forward; the projection dominates (~95% at the demo geometry).

    Element-wise terms use rough per-element counts (rms norm ~3, gate dot 2, silu ~4); they
    only matter as the "smaller terms" next to the matmul.
    """
    proj = 2 * n_tok * d_mem * (m + 1) * d
    bias = n_tok * (m + 1) * d
    gate = n_tok * m * d * (3 + 3 + 2 + 1)  # rms(q), rms(k), q.k, alpha*value
    conv_f = n_tok * m * d * (3 + 2 * kernel + 4 + 1) if conv else 0  # rms, taps, silu, add
    resid = n_tok * m * d
    return {
        "projection": proj,
        "other": bias + gate + conv_f + resid,
        "total": proj + bias + gate + conv_f + resid,
    }


def run(b: int, t: int, num_rows: int, repeats: int, seed: int) -> dict[str, Any]:
    """Build both modules, check they agree, then time them interleaved with the matmul peak."""
    torch.manual_seed(seed)
    block = demo_block(num_rows).eval()
    ref = ReferenceEngram(block).eval()
    m, d, heads, d_mem = block.n_branches, block.hidden_size, block.num_heads, block.memory_dim
    hidden = torch.randn(b, t, m, d)
    row_ids = torch.randint(0, num_rows, (b, t, heads))
    a = torch.randn(b * t, d_mem)
    w = torch.randn(d_mem, (m + 1) * d)

    with torch.inference_mode():
        got, want = block(hidden, row_ids), ref(hidden, row_ids)
        max_err = float((got - want).abs().max())
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise AssertionError(f"EngramBlock and ReferenceEngram disagree: max |diff| {max_err}")

        contenders = {
            "engram_block": lambda: block(hidden, row_ids),
            "reference_engram": lambda: ref(hidden, row_ids),
            "matmul_peak": lambda: torch.matmul(a, w),
        }
        raw_s = interleaved_timings(contenders, repeats, warmup=2, desc="engram block")

    n_tok = b * t
    flops = block_flops(n_tok, d, m, d_mem, block.conv.kernel_size if block.conv else 0, block.conv is not None)
    mm_flops = 2 * n_tok * d_mem * (m + 1) * d
    timing = {k: stats(v) for k, v in raw_s.items()}
    gflops = {
        "engram_block": stats([flops["total"] / s / 1e9 for s in raw_s["engram_block"]]),
        "reference_engram": stats([flops["total"] / s / 1e9 for s in raw_s["reference_engram"]]),
        "matmul_peak": stats([mm_flops / s / 1e9 for s in raw_s["matmul_peak"]]),
    }
    # Fraction of peak per repeat: block GFLOP/s over the matmul GFLOP/s of the SAME repeat.
    frac = {
        k: stats(
            [(flops["total"] / sb) / (mm_flops / sm) for sb, sm in zip(raw_s[k], raw_s["matmul_peak"], strict=True)]
        )
        for k in ("engram_block", "reference_engram")
    }
    return {
        "geometry": {
            "preset": "demo",
            "hidden": d,
            "branches_M": m,
            "heads": heads,
            "head_dim": block.head_dim,
            "d_mem": d_mem,
            "table_rows": num_rows,
            "conv": block.conv is not None,
            "conv_dilation": block.conv.dilation if block.conv else None,
            "proj_bias": block.wkv.bias is not None,
            "gate_norm_eps": block.gate_norm_eps,
        },
        "input": {"batch": b, "seq": t, "tokens": n_tok, "dtype": "float32", "seed": seed},
        "allclose_atol_rtol": 1e-4,
        "max_abs_diff": max_err,
        "flops": flops,
        "matmul_shape": [[n_tok, d_mem], [d_mem, (m + 1) * d]],
        "matmul_flops": mm_flops,
        "timing_s": timing,
        "speedup_vs_reference": stats(paired_ratios(raw_s["reference_engram"], raw_s["engram_block"])),
        "gflops": gflops,
        "fraction_of_matmul_peak": frac,
        "raw_s": raw_s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=25, help="interleaved repeats (>= 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    r = run(args.batch, args.seq, args.rows, args.repeats, args.seed)
    payload = {
        "parameters": {
            "batch": args.batch,
            "seq": args.seq,
            "rows": args.rows,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        **r,
    }
    path = write_result("engram_block", payload, args.results_dir)
    t, sp, fr = r["timing_s"], r["speedup_vs_reference"], r["fraction_of_matmul_peak"]
    print(
        f"block {t['engram_block']['median'] * 1e3:.1f} ms, reference "
        f"{t['reference_engram']['median'] * 1e3:.1f} ms, speedup {sp['median']:.2f}x "
        f"(IQR {sp['q1']:.2f}-{sp['q3']:.2f}); block at "
        f"{fr['engram_block']['median'] * 100:.0f}% of matmul peak "
        f"({r['gflops']['matmul_peak']['median']:.0f} GFLOP/s)"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
