"""Forward time of the EngramBlock against the official demo's Engram module, the in-repo
reference structure and the block's own autograd path, with page faults and bytes moved per token.

Why: the block is element-wise work on [B, T, M, d] tensors around one projection matmul; on a CPU
its cost beyond the matmul is memory traffic and, above glibc's mmap threshold (32 MiB), the page
faults of every freshly mapped temporary. So each contender is timed interleaved in one process on
the same weights and inputs, with the minor page faults of each call (``getrusage``), the machine's
measured copy bandwidth and the projection matmul alone as the two limits.

Contenders (all share the block's weights, checked allclose to it before timing):

* ``engram_block``: :class:`~engramlm.nn.engram.EngramBlock` as inference runs it (fused in-place path);
* ``engram_block_autograd``: the same block forced onto its autograd path (``fused_inference=False``),
  i.e. what inference ran before the fused path;
* ``official_demo``: the ``Engram`` module of DeepSeek's ``engram_demo_v1.py`` itself, loaded from
  ``--demo-file`` (or ``$ENGRAMLM_DEMO_FILE``; https://github.com/deepseek-ai/Engram, not vendored
  here), its hashing replaced by the same precomputed row ids (so only the module's tensor work is
  timed) and ``+ hidden`` added as its ``TransformerBlock`` does; skipped, and said so, without the file;
* ``reference_engram``: :class:`~engramlm.nn.engram_reference.ReferenceEngram`, the demo's structure
  (always available);
* ``matmul``: the projection [B*T, d_mem] x [d_mem, (M+1) d] alone, and ``copy``: a 256 MiB tensor
  copy (memory bandwidth), both in the same interleaved loop.

Geometry: the DEMO preset's block (hidden 1024, M=4, 16 heads x 64 = d_mem 1024, conv with dilation 3,
proj_bias, dtype-epsilon gate norm), 1M-row table, conv weights random (not the zero init, so the conv
does work). Run from the repository root: ``python -m benchmarks.bench_engram_block
--demo-file PATH/engram_demo_v1.py`` (defaults: B 2 and 4, T 512, threads 1 and 2).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import paired_ratios, stats, write_result
from engramlm.models.model import engram_block
from engramlm.models.presets import get_preset
from engramlm.nn.engram import EngramBlock
from engramlm.nn.engram_reference import ReferenceEngram

# Bumped whenever the block's code changes what is measured, so old and new result files never mix.
BENCH_VERSION = 2
COPY_BYTES = 256 << 20


def demo_block(num_rows: int) -> EngramBlock:
    """The demo preset's Engram block geometry, built the way the model builds it."""
    cfg = get_preset("demo")
    h = cfg.engram.hash  # type: ignore[union-attr]
    return engram_block(cfg, num_rows, h.n_head_per_ngram * (h.max_ngram_size - 1))


def load_demo_engram(path: Path, block: EngramBlock) -> tuple[torch.nn.Module, Callable[[Any], None]]:
    """The demo file's own ``Engram`` module carrying ``block``'s weights, and a setter for its row ids.

    The demo builds its hash mapping from a tokenizer on the hub; here the mapping is replaced by one
    that returns the row ids it is given (offsets zeroed: the ids are already offset-applied), so the
    module's forward, its projections, norms, gate and ``ShortConv``, run unchanged.
    """
    spec = importlib.util.spec_from_file_location("engram_demo_v1", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    layer = 1

    class GivenIds:
        """Stands in for the demo's NgramHashMapping: the table sizes of ``block``, ids set per input."""

        def __init__(self, **_: Any) -> None:
            per = block.num_rows // block.num_heads
            sizes = [per] * block.num_heads
            sizes[-1] += block.num_rows - per * block.num_heads
            self.vocab_size_across_layers = {layer: [sizes]}
            self.ids: Any = None

        def hash(self, input_ids: Any) -> dict[int, Any]:
            return {layer: self.ids}

    mod.NgramHashMapping = GivenIds
    mod.engram_cfg.layer_ids = [layer]
    m, d, c = block.n_branches, block.hidden_size, block.conv
    mod.engram_cfg.kernel_size = c.kernel_size  # type: ignore[union-attr]
    mod.backbone_config.hidden_size, mod.backbone_config.hc_mult = d, m
    eng = mod.Engram(layer_id=layer)
    ref = ReferenceEngram(block)
    with torch.no_grad():
        emb = eng.multi_head_embedding
        emb.offsets.zero_()
        emb.embedding.weight.copy_(block.embed.weight)
        eng.value_proj.load_state_dict(ref.value_proj.state_dict())
        for i in range(m):
            eng.key_projs[i].load_state_dict(ref.key_projs[i].state_dict())
            eng.norm1[i].weight.copy_(block.k_weight[i])  # norm1 normalises the key, norm2 the query
            eng.norm2[i].weight.copy_(block.q_weight[i])
            eng.short_conv.norms[i].weight.copy_(c.norm_weight[i])  # type: ignore[union-attr]
        eng.short_conv.conv.weight.copy_(c.weight)  # type: ignore[union-attr]
    eng.eval()

    def set_ids(row_ids: torch.Tensor) -> None:
        eng.hash_mapping.ids = row_ids.numpy()

    return eng, set_ids


def bytes_per_token(d: int, m: int, d_mem: int, n_tok: int, weight_bytes: int) -> dict[str, float]:
    """Memory traffic per token, fp32.

    ``compulsory``: what any implementation must move: read the stream [M, d] and the rows [d_mem],
    write the output [M, d], write and read the projection output [(M+1), d] once, and the weights
    once per forward. ``fused_passes``: the fused path's passes over full-size [M, d] data, counted
    from its code (gate: 2 reads of the stream, keys read, scaled in place, read again; conv: input
    written once, lag-0 tap, 3 in-place taps, SiLU, gated value, residual), an upper bound: its
    chunks are 16 MiB, so part of that traffic stays in cache.
    """
    f = 4
    stream = m * d * f
    compulsory = 2 * stream + d_mem * f + 2 * (m + 1) * d * f + weight_bytes / n_tok
    gate = 1 + 1 + 2 + 2  # sum of squares of the stream and the keys, keys *= q_w k_w, the dot product
    conv = 1 + 2 + 3 * 3 + 2 + 2 + 3  # input, lag-0 tap, 3 in-place taps, SiLU, + gated value, + residual
    passes = gate + conv
    return {
        "compulsory": compulsory,
        "fused_passes": float(passes),
        "fused_estimate": compulsory + (passes - 2) * stream,
    }


def _timed(fn: Callable[[], object]) -> tuple[float, int]:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def interleaved(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int, desc: str
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds and minor page faults per call, every contender once per repeat, order rotating."""
    from tqdm import tqdm

    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    secs: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            dt, fl = _timed(contenders[n])
            secs[n].append(dt)
            faults[n].append(fl)
    return secs, faults


def run_cell(
    block: EngramBlock,
    ref: ReferenceEngram,
    demo: tuple[torch.nn.Module, Callable[[Any], None]] | None,
    b: int,
    t: int,
    threads: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """One (batch, threads) cell: agreement check, then all contenders interleaved."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed + b)
    m, d, heads, d_mem = block.n_branches, block.hidden_size, block.num_heads, block.memory_dim
    hidden = torch.randn(b, t, m, d, generator=g)
    row_ids = torch.randint(0, block.num_rows, (b, t, heads), generator=g)
    e = F.embedding(row_ids, block.embed.weight).reshape(b * t, d_mem)
    src, dst = torch.randn(COPY_BYTES // 4), torch.empty(COPY_BYTES // 4)

    def autograd_path() -> torch.Tensor:
        block.fused_inference = False
        try:
            return block(hidden, row_ids)
        finally:
            block.fused_inference = True

    contenders: dict[str, Callable[[], object]] = {
        "engram_block": lambda: block(hidden, row_ids),
        "engram_block_autograd": autograd_path,
        "reference_engram": lambda: ref(hidden, row_ids),
    }
    if demo is not None:
        eng, set_ids = demo
        set_ids(row_ids)
        contenders["official_demo"] = lambda: eng(hidden, None) + hidden
    contenders["matmul"] = lambda: F.linear(e, block.wkv.weight, block.wkv.bias)
    contenders["copy"] = lambda: dst.copy_(src)

    with torch.inference_mode():
        want = contenders["engram_block_autograd"]()
        diffs = {}
        for name in ("engram_block", "reference_engram", "official_demo"):
            if name in contenders:
                got = contenders[name]()
                diffs[name] = float((got - want).abs().max())  # type: ignore[operator]
                if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):  # type: ignore[arg-type]
                    raise AssertionError(f"{name} disagrees with the block: max |diff| {diffs[name]}")
        secs, faults = interleaved(contenders, repeats, warmup=1, desc=f"B={b} threads={threads}")

    n_tok = b * t
    bw = [2 * COPY_BYTES / s / 1e9 for s in secs["copy"]]
    traffic = bytes_per_token(d, m, d_mem, n_tok, block.wkv.weight.numel() * 4)
    timed = [n for n in contenders if n not in ("matmul", "copy")]
    cell: dict[str, Any] = {
        "batch": b,
        "seq": t,
        "threads": threads,
        "tokens": n_tok,
        "max_abs_diff_vs_autograd_path": diffs,
        "timing_s": {n: stats(v) for n, v in secs.items()},
        "minor_faults_per_call": {n: stats([float(x) for x in v]) for n, v in faults.items()},
        "memory_bandwidth_gbs": stats(bw),
        "bytes_per_token": traffic,
        # time the block would take if it only moved its compulsory bytes at the measured copy bandwidth
        "bandwidth_floor_fraction": stats(
            [n_tok * traffic["compulsory"] / (g_ * 1e9) / s for g_, s in zip(bw, secs["engram_block"], strict=True)]
        ),
        "matmul_fraction": stats([sm / s for sm, s in zip(secs["matmul"], secs["engram_block"], strict=True)]),
        "speedup_of_engram_block": {
            n: stats(paired_ratios(secs[n], secs["engram_block"])) for n in timed if n != "engram_block"
        },
        "raw_s": secs,
    }
    return cell


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=9, help="interleaved repeats per (batch, threads) cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--demo-file",
        type=Path,
        default=os.environ.get("ENGRAMLM_DEMO_FILE") or None,
        help="the official engram_demo_v1.py (default $ENGRAMLM_DEMO_FILE); without it the demo is skipped",
    )
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--out", default="engram_block")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    block = demo_block(args.rows).eval()
    with torch.no_grad():  # a working conv (the zero init would make it a no-op)
        block.conv.weight.normal_(std=0.3)  # type: ignore[union-attr]
    ref = ReferenceEngram(block).eval()
    demo, demo_info = None, {"available": False, "path": None}
    if args.demo_file is not None:
        path = Path(args.demo_file)
        try:
            demo = load_demo_engram(path, block)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            demo_info = {"available": True, "path": path.name, "sha256": sha}
        except Exception as exc:  # report, do not hide: the JSON says why the demo did not run
            demo_info = {"available": False, "path": str(path), "error": f"{type(exc).__name__}: {exc}"}
            print(f"official demo skipped: {demo_info['error']}")
    else:
        print("official demo skipped: pass --demo-file PATH/engram_demo_v1.py (or set ENGRAMLM_DEMO_FILE)")

    cells = []
    load_before = os.getloadavg()
    for threads in args.threads:
        for b in args.batch:
            cells.append(run_cell(block, ref, demo, b, args.seq, threads, args.repeats, args.seed))
            c = cells[-1]
            sp = c["speedup_of_engram_block"]
            line = ", ".join(f"{k} {v['median']:.2f}x" for k, v in sp.items())
            print(
                f"B={b} threads={threads}: block {c['timing_s']['engram_block']['median'] * 1e3:.0f} ms; "
                f"speedup vs {line}; faults/call {c['minor_faults_per_call']['engram_block']['median']:.0f}"
            )
    payload = {
        "version": BENCH_VERSION,
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "results_dir"},
        "geometry": {
            "preset": "demo",
            "hidden": block.hidden_size,
            "branches_M": block.n_branches,
            "heads": block.num_heads,
            "head_dim": block.head_dim,
            "d_mem": block.memory_dim,
            "table_rows": args.rows,
            "conv": block.conv is not None,
            "conv_dilation": block.conv.dilation if block.conv else None,
            "proj_bias": block.wkv.bias is not None,
            "gate_norm_eps": block.gate_norm_eps,
        },
        "official_demo": demo_info,
        "allocator_env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")},
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "cells": cells,
    }
    path = write_result(args.out, payload, args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
