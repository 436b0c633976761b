"""Greedy generation against HF transformers ``generate`` on a Llama of the same shape, and the Engram
layers' share of engramlm's decode.

Why: a decode step at small batch is a chain of small matmuls and element-wise ops, so per-op
dispatch and per-step Python decide the speed, not FLOPs. The fair peer is the code most people
would run: ``LlamaForCausalLM.generate`` (HF transformers, its default dynamic KV cache) with the
same hidden size, layers, heads, MLP width and vocabulary, random weights, the same prompts (real
text) and the same number of new tokens, greedy. Contenders, timed interleaved per repeat (one
``generate`` call each: prefill + all decode steps), all in one process:

* ``engramlm``: :class:`engramlm.infer.Engine` on the EngramLM (tables in the model);
* ``engramlm_no_engram``: the same weights without the Engram layers (hashing and blocks gone), so
  ``1 - t(no_engram) / t(engramlm)`` is the Engram layers' share;
* ``hf_llama``: the HF Llama;
* ``engramlm_unpacked`` (``--unpacked on``, the default): the eager engine with ``packed=False``, its
  matmuls through plain ``F.linear`` instead of prepacked oneDNN weights (the before of that change);
* ``engramlm_compiled`` / ``engramlm_no_engram_compiled`` (``--compile on``, the default): the same
  two engines with ``Engine(compile=True)``, the one-token decode steps run by ``torch.compile``
  (prefill eager). Their graphs are built in the warm-up call (call 0, untimed); that call's wall
  time and the compile time inside it are reported separately (``compile_seconds``), so the timed
  repeats are steady-state numbers that exclude compilation. ``--compile none`` drops them.

Run from the repository root: ``python -m benchmarks.bench_decode`` (needs ``transformers``, the
``bench`` extra); ``--batch 1 8`` by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import torch

from benchmarks._common import paired_ratios, stats, write_result
from benchmarks.bench_generate import build_model, build_workload
from engramlm.infer import Engine, SamplingParams
from engramlm.models.model import EngramLM

# Bumped whenever the decode path's code changes what is measured, so old and new results never mix.
BENCH_VERSION = 7


def hf_backbone_shape(c: Any) -> dict[str, int]:
    """The HF config fields of a ``ModelConfig``'s backbone shape, shared by every same-shape HF peer."""
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads or c.n_heads,
    }


def hf_llama(model: EngramLM) -> torch.nn.Module:
    """A LlamaForCausalLM with the EngramLM's backbone shape, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(
        **hf_backbone_shape(c),
        rope_theta=c.rope_theta,
        max_position_embeddings=4096,
        tie_word_embeddings=c.tie_embeddings,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


def without_engram(model: EngramLM) -> EngramLM:
    """The same backbone weights with no Engram layers (config ``engram=None``)."""
    cfg = dataclasses.replace(model.config, engram=None)
    plain = EngramLM(cfg).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if missing or any(".engram." not in k for k in unexpected):
        raise AssertionError(f"backbone weights differ: missing {missing}, unexpected {unexpected}")
    return plain


def run_batch(
    model: EngramLM, plain: EngramLM, hf: torch.nn.Module, streams: list[torch.Tensor], b: int, args: argparse.Namespace
) -> dict[str, Any]:
    p, s = args.prompt, args.steps
    calls = args.repeats + 1
    if len(streams) < calls * b:
        raise SystemExit(f"only {len(streams)} held-out texts; need {calls * b}")
    prompts = [torch.stack([streams[c * b + i][:p] for i in range(b)]) for c in range(calls)]
    params = SamplingParams(max_new_tokens=s)
    engines = {"engramlm": Engine(model), "engramlm_no_engram": Engine(plain)}
    if args.unpacked == "on":  # before/after of the prepacked matmuls (engramlm.nn.packed)
        engines["engramlm_unpacked"] = Engine(model, packed=False)
    if args.compile == "on":
        engines["engramlm_compiled"] = Engine(model, compile=True)
        engines["engramlm_no_engram_compiled"] = Engine(plain, compile=True)

    split: dict[str, dict[str, list[float]]] = {n: {"prefill_s": [], "decode_step_s": []} for n in engines}

    def ours(name: str, ids: torch.Tensor) -> int:
        gen = engines[name].generate(ids.tolist(), params)
        split[name]["prefill_s"].append(gen.stats.prefill_seconds)
        split[name]["decode_step_s"].append(gen.stats.decode_seconds / max(1, len(gen.stats.step_seconds)))
        return sum(len(t) for t in gen.tokens)

    def theirs(ids: torch.Tensor) -> int:
        out = hf.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=s,
            min_new_tokens=s,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return int(out[:, p:].numel())

    contenders = {name: (lambda ids, name=name: ours(name, ids)) for name in engines}
    contenders["hf_llama"] = theirs
    warmup: dict[str, float] = {}
    names = list(contenders)
    secs: dict[str, list[float]] = {n: [] for n in names}
    from tqdm import tqdm

    with torch.inference_mode():
        for c in tqdm(range(calls), desc=f"batch {b}", leave=False):
            shift = c % len(names)
            for n in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                made = contenders[n](prompts[c])
                dt = time.perf_counter() - t0
                if made != b * s:
                    raise AssertionError(f"{n} made {made} tokens, expected {b * s}")
                if c:  # call 0 is the warm-up (thread pools, lazily compiled kernels, caches, torch.compile)
                    secs[n].append(dt)
                else:
                    warmup[n] = dt
    tok = b * s

    def share(plain_name: str, name: str) -> dict[str, float]:
        return stats([1 - a / e for a, e in zip(secs[plain_name], secs[name], strict=True)])

    out = {
        "batch": b,
        "new_tokens_per_call": tok,
        "seconds_per_call": {n: stats(v) for n, v in secs.items()},
        "tokens_per_second": {n: stats([tok / x for x in v]) for n, v in secs.items()},
        "speedup_vs_hf": stats(paired_ratios(secs["hf_llama"], secs["engramlm"])),
        "no_engram_speedup_vs_hf": stats(paired_ratios(secs["hf_llama"], secs["engramlm_no_engram"])),
        "engram_share": share("engramlm_no_engram", "engramlm"),
        **(
            {"unpacked_speedup_vs_hf": stats(paired_ratios(secs["hf_llama"], secs["engramlm_unpacked"]))}
            if "engramlm_unpacked" in secs
            else {}
        ),
        "warmup_call_seconds": warmup,
        # engramlm's prefill and mean decode step per call (the warm-up call excluded)
        "prefill_and_step_seconds": {n: {k: stats(v[1:]) for k, v in d.items()} for n, d in split.items()},
        "raw_s": secs,
    }
    compiled = {n: e for n, e in engines.items() if e.compiled is not None}
    if compiled:
        out["compiled"] = {
            "speedup_vs_hf": stats(paired_ratios(secs["hf_llama"], secs["engramlm_compiled"])),
            "no_engram_speedup_vs_hf": stats(paired_ratios(secs["hf_llama"], secs["engramlm_no_engram_compiled"])),
            "speedup_vs_eager": stats(paired_ratios(secs["engramlm"], secs["engramlm_compiled"])),
            "engram_share": share("engramlm_no_engram_compiled", "engramlm_compiled"),
            "compile_seconds": {n: e.compiled.compile_seconds for n, e in compiled.items()},
            "compiled_steps": {n: e.compiled.calls for n, e in compiled.items()},
            "errors": {n: e.compiled.error for n, e in compiled.items() if e.compiled.error},
        }
    for e in engines.values():
        e.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="new tokens per sequence")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--engram-layers", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--heads", type=int, default=4, help="hash heads per n-gram order")
    ap.add_argument("--head-rows", type=int, default=100_003)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--corpus-mb", type=int, default=8)
    ap.add_argument(
        "--compile",
        choices=["on", "none"],
        default="on",
        help="add torch.compile'd contenders (Engine(compile=True)); none: eager only",
    )
    ap.add_argument(
        "--unpacked",
        choices=["on", "none"],
        default="on",
        help="add engramlm_unpacked: the eager engine without prepacked weights (Engine(packed=False))",
    )
    ap.add_argument("--out", default="decode_vs_hf")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    _, streams = build_workload(args)
    model = build_model(_, args)
    plain = without_engram(model)
    hf = hf_llama(model)
    load_before = os.getloadavg()
    runs = [run_batch(model, plain, hf, streams, b, args) for b in args.batch]
    import transformers

    payload = {
        "version": BENCH_VERSION,
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "model": {
            "engramlm_parameters": sum(p.numel() for p in model.parameters()),
            "engramlm_backbone_parameters": sum(p.numel() for p in plain.parameters()),
            "hf_parameters": sum(p.numel() for p in hf.parameters()),
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": model.config.n_heads,
            "mlp_hidden": model.config.mlp_hidden,
            "vocab": model.config.vocab_size,
            "hc_mult": model.config.hc_mult,
            "engram_layers": list(model.layout.layer_ids),  # type: ignore[union-attr]
        },
        "transformers": transformers.__version__,
        "hf_generate": "greedy, default (dynamic) KV cache, eos disabled",
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "runs": runs,
    }
    path = write_result(args.out, payload)
    for r in runs:
        sp, sh = r["speedup_vs_hf"], r["engram_share"]
        print(
            f"batch {r['batch']}: engramlm {r['tokens_per_second']['engramlm']['median']:.1f} tok/s, "
            f"HF {r['tokens_per_second']['hf_llama']['median']:.1f} tok/s: {sp['median']:.2f}x "
            f"(IQR {sp['q1']:.2f}-{sp['q3']:.2f}); Engram share {sh['median']:.1%}"
            + (f"; unpacked {r['unpacked_speedup_vs_hf']['median']:.2f}x" if "unpacked_speedup_vs_hf" in r else "")
        )
        if "compiled" in r:
            c = r["compiled"]
            print(
                f"  compiled: {c['speedup_vs_hf']['median']:.2f}x HF "
                f"(IQR {c['speedup_vs_hf']['q1']:.2f}-{c['speedup_vs_hf']['q3']:.2f}), "
                f"{c['speedup_vs_eager']['median']:.2f}x eager; Engram share {c['engram_share']['median']:.1%}; "
                f"compile {c['compile_seconds']}"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
