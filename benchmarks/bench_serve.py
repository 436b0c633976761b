"""Serving under load: ``engramlm serve`` (continuous batching) vs a plain per-request ``generate()`` server.

Why: a server is judged by what its clients see when many talk to it at once. This starts real server
processes on localhost and drives each with N concurrent streaming clients (closed loop: each client
sends its next request when the last one finished), for N in 1, 4, 16, 64, on a mix of real prompts
(held-out Python standard-library text, 16-128 tokens) and output lengths (16-64 tokens, ``ignore_eos``
so every contender generates the same number of tokens). Per contender and N: output tokens/s, time to
first token p50/p99 and inter-token latency p50/p99 (the gaps between streamed chunks, one token each).

Contenders, all with one torch thread per server process:

* ``engramlm``       ``engramlm serve`` with the Engram tables in the model;
* ``engramlm_mmap``  the same with the rows from a store directory on the ``mmap`` tier (``--tier``;
  ``--contenders`` also takes ``engramlm_memory`` and ``engramlm_direct``);
* ``hf_generate``    a HF transformers ``LlamaForCausalLM`` of the same backbone shape (hidden size, layers,
  heads, MLP width, vocabulary) with **random weights** (there is no engramlm -> transformers export in this
  tree, so the baseline has no Engram layers: it does less work per token), served by
  ``benchmarks/_hf_server.py``: FastAPI + uvicorn, one ``model.generate()`` per request, one at a time.

Where the time goes: the engramlm servers' own ``/metrics`` (prefill, decode steps, row-fetch wait) are
read before and after each level and reported as shares of the level's wall time.

Run from the repository root: ``nice -n 10 python -m benchmarks.bench_serve`` (``--quick`` for 1 and 4
clients and fewer requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._common import RESULTS_DIR, save_png, write_result
from engramlm.data.corpora import SourceSpec, load_corpus
from engramlm.data.tokenizer import BOS_ID, save_tokenizer, train_tokenizer
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.infer.tables import export_model_tables
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import save_pretrained
from engramlm.models.locate import locate_model
from engramlm.models.model import EngramLM

REPO = Path(__file__).resolve().parents[1]
PROMPT_LENS = (16, 32, 64, 128)
OUTPUT_LENS = (16, 32, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(args: argparse.Namespace, work: Path) -> tuple[Any, list[list[int]], dict[str, Any]]:
    """Tokenizer, held-out token streams, and the saved models (engramlm + same-shape HF Llama) and store."""
    corpus = load_corpus(SourceSpec(kind="stdlib"), max_bytes=args.corpus_mb << 20)
    tok = train_tokenizer(corpus.texts("train"), vocab_size=args.vocab)
    streams = [e.ids for e in tok.encode_batch(corpus.texts("val") + corpus.texts("test"))]
    run = work / "run"
    run.mkdir()
    save_tokenizer(tok, run / "tokenizer.json")
    cmap = CompressionMap.from_tokenizer(run / "tokenizer.json")
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=4, engram_vocab_size=(args.head_rows, args.head_rows),
                    layer_ids=tuple(args.engram_layers), pad_id=2)  # fmt: skip
    n_heads = args.hidden // 64
    mlp = args.hidden * 8 // 3 // 64 * 64
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size, hidden_size=args.hidden, num_layers=args.layers, n_heads=n_heads,
        n_kv_heads=n_heads, mlp_hidden=mlp, hc_mult=args.hc, max_seq_len=args.max_len,
        engram=EngramConfig(hash=spec, head_dim=args.head_dim, conv_zero_init=False),
    )  # fmt: skip
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(spec, cmap)).eval()
    save_pretrained(model, run / "model")
    store = export_model_tables(model, run / "store", model_sha256=locate_model(run / "model").weights_sha256())
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cmap.vocab_size, hidden_size=args.hidden, intermediate_size=mlp, num_hidden_layers=args.layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=args.max_len,
        tie_word_embeddings=False,
    )).eval()  # fmt: skip
    llama.save_pretrained(run / "llama")
    info = {
        "engramlm_parameters": sum(p.numel() for p in model.parameters()),
        "engram_table_bytes": sum(int(r) * args.head_dim * 4 for r in model.layout.table_rows),
        "llama_parameters": sum(p.numel() for p in llama.parameters()),
        "engram_layers": list(args.engram_layers),
        "vocab": cmap.vocab_size,
    }
    return tok, streams, {"run": run, "store": store.parent, "info": info}


def workload(streams: list[list[int]], tok: Any, n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` (prompt text, output tokens): real held-out text cut to a mix of prompt lengths."""
    rng = random.Random(seed)
    long = [s for s in streams if len(s) >= max(PROMPT_LENS) + 1]
    jobs = []
    for _ in range(n):
        s = rng.choice(long)
        length = rng.choice(PROMPT_LENS)
        at = rng.randrange(0, len(s) - length)
        jobs.append((tok.decode(s[at : at + length]), rng.choice(OUTPUT_LENS)))
    return jobs


class Server:
    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name, self.port = name, port
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 180) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def metrics(self) -> dict[str, float]:
        """Sums of the scheduler's own timers (engramlm servers only)."""
        import httpx2 as httpx

        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.TransportError:
            return {}
        want = {"engramlm_prefill_seconds_sum": "prefill_s", "engramlm_decode_step_seconds_sum": "decode_s",
                "engramlm_decode_step_seconds_count": "decode_steps",
                "engramlm_row_fetch_wait_seconds_total": "row_wait_s"}  # fmt: skip
        out: dict[str, float] = {}
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in want:
                out[want[name]] = out.get(want[name], 0.0) + float(line.split()[-1])
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one(client: Any, url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
            if doc.get("choices") and doc["choices"][0].get("text"):
                times.append(time.perf_counter())
    return {"start": t0, "chunks": times, "tokens": tokens, "end": time.perf_counter()}


async def level(url: str, jobs: list[tuple[str, int]], clients: int) -> tuple[list[dict[str, Any]], float]:
    import httpx2 as httpx

    queue = list(jobs)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                prompt, n = queue.pop(0)
                results.append(await one(client, url, prompt, n))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - t0


def summarise(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ttft = np.array([r["chunks"][0] - r["start"] for r in results if r["chunks"]])
    itl = np.concatenate([np.diff(r["chunks"]) for r in results if len(r["chunks"]) > 1] or [np.zeros(0)])
    tokens = sum(r["tokens"] for r in results)

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if a.size else None

    return {
        "requests": len(results), "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
    }  # fmt: skip


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, levels in doc["results"].items():
        ns = sorted(int(n) for n in levels)
        for ax, key, scale in zip(axes, ("output_tokens_per_s", "ttft_p50_s", "itl_p50_s"), (1, 1e3, 1e3),
                                  strict=True):  # fmt: skip
            ax.plot(ns, [levels[str(n)][key] * scale for n in ns], marker="o", label=name)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "ITL p50 (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests-per-client", type=float, default=2.0, help="requests per level = max(8, this x N)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hc", type=int, default=1, help="residual branches (1: a plain residual, like the Llama)")
    ap.add_argument("--engram-layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--head-rows", type=int, default=50_021)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--corpus-mb", type=int, default=2)
    ap.add_argument(
        "--contenders",
        nargs="+",
        default=["engramlm", "engramlm_mmap", "hf_generate"],
        help="also: engramlm_memory, engramlm_direct (O_DIRECT: the store must not be on tmpfs)",
    )
    ap.add_argument("--workdir", default=None, help="where the models and the store go (not tmpfs for direct)")
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients, 4 requests per level minimum")
    ap.add_argument("--out", default="serve")
    args = ap.parse_args()
    if args.quick:
        args.clients = [1, 4]
    torch.set_num_threads(1)
    load_before = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="bench_serve_", dir=args.workdir))
    servers: dict[str, Server] = {}
    try:
        tok, streams, built = build(args, work)
        run = built["run"]
        max_batch = str(max(args.clients))
        common = [sys.executable, "-m", "engramlm", "serve", str(run / "model"), "--threads", "1",
                  "--served-model-name", "bench", "--max-batch", max_batch, "--max-queue", "1024"]  # fmt: skip
        argv = {
            "engramlm": [*common, "--port", "{port}"],
            **{f"engramlm_{tier}": [*common, "--store", str(built["store"]), "--tier", tier, "--port", "{port}"]
               for tier in ("memory", "mmap", "direct")},
            "hf_generate": [sys.executable, "-m", "benchmarks._hf_server", "--model", str(run / "llama"),
                            "--tokenizer", str(run / "tokenizer.json"), "--bos", str(BOS_ID), "--port", "{port}"],
        }  # fmt: skip
        for name in args.contenders:
            port = free_port()
            servers[name] = Server(name, [a.replace("{port}", str(port)) for a in argv[name]], port)
        for s in servers.values():
            s.wait()
        warm = workload(streams, tok, 2, seed=99)
        for s in servers.values():
            asyncio.run(level(s.url, warm, 1))
        results: dict[str, dict[str, Any]] = {name: {} for name in servers}
        minimum = 4 if args.quick else 8
        for n in args.clients:
            jobs = workload(streams, tok, max(minimum, int(args.requests_per_client * n)), seed=n)
            for name, s in servers.items():  # interleaved: every contender at this level, then the next level
                before = s.metrics()
                res, wall = asyncio.run(level(s.url, jobs, n))
                after = s.metrics()
                summary = summarise(res, wall)
                if after:
                    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                    summary["time_shares"] = {
                        "prefill": spent.get("prefill_s", 0.0) / wall, "decode": spent.get("decode_s", 0.0) / wall,
                        "row_wait": spent.get("row_wait_s", 0.0) / wall,
                        "mean_batch": summary["output_tokens"] / max(1.0, spent.get("decode_steps", 0.0)),
                    }  # fmt: skip
                results[name][str(n)] = summary
                print(f"{name:14s} N={n:3d} {summary['output_tokens_per_s']:8.1f} tok/s  ttft p50 "
                      f"{summary['ttft_p50_s'] * 1e3:8.1f} ms  itl p50 {summary['itl_p50_s'] * 1e3:7.1f} ms",
                      flush=True)  # fmt: skip
        png = RESULTS_DIR / f"{args.out}.png"
        doc = {
            "kind": "serve",
            "params": {k: v for k, v in vars(args).items() if k != "out"},
            "model": built["info"],
            "workload": {"prompt_tokens": PROMPT_LENS, "output_tokens": OUTPUT_LENS, "corpus": "stdlib held-out",
                         "baseline": "random-weight LlamaForCausalLM of the same backbone shape (no export)"},
            "load_average_before_after": [load_before, list(os.getloadavg())],
            "results": results,
            "plot": png.name,
        }  # fmt: skip
        plot(doc, png)
        print(write_result(args.out, doc))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
