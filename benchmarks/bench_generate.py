"""End-to-end decode throughput with the Engram tables in the model, in RAM, on SSD and in Mooncake.

Why: the point of Engram as a system is that its tables need not sit in fast memory. This runs
the same batch decode (``engramlm.infer.Engine``: KV cache, streaming hasher, per-step prefetch
of every Engram layer's rows before the forward) with the rows served by

* ``model``       each block's own ``embed.weight`` (the baseline);
* ``memory``      a :class:`MemoryTable` per layer through the prefetcher (prefetch overhead alone; the tier's
                  choice: inline, no thread);
* ``memory_wN``, ``ssd_c0_wN`` the same tables with N prefetch threads (``--pool-workers``, default 2; N = 0 is
                  named ``_inline``): the worker pool against the tiers' choice, paired in one run (the direct
                  tier's choice: inline, its GIL-free I/O thread reading);
* ``ssd_c0_split`` inline without the I/O thread (``io_thread=False``): ``io_submit`` on the decode thread at
                  start, reap + CRC + copy at wait;
* ``ssd_cN``      the store file read with O_DIRECT (:class:`DirectFileTable`, page cache out of
                  play) behind a :class:`CachedTable` (LFU) of N% of the table bytes, N in 0..50,
                  so the file is always at least twice the cache budget;
* ``ssd_threads`` ``ssd_c0`` read by the direct tier's ``threads`` I/O engine (Python threads, one
                  ``preadv`` per run, a zlib CRC per page in Python: the engine before issue 18), timed
                  in the same run as the default ``aio`` engine (one Numba ``nogil`` call per gather);
* ``mooncake``    a real ``mooncake_master`` on 127.0.0.1 (TCP), rows read into a registered buffer by
                  the store's batch get-into API (:class:`MooncakeTable` ``read="batch"``: replicas
                  queried once per session, one ``batch_get_into_multi_buffer_ranges`` per gather);
* ``mooncake_wN`` ``mooncake`` with N prefetch threads (``--mooncake-workers``: the first value is
                  ``mooncake``'s, default 1, so layer 1's read has the client to itself);
* ``mooncake_niceN`` ``mooncake`` with the client's transport threads at niceness N during its calls
                  (``--mooncake-nice``), so they stop preempting the decode thread;
* ``ssd_cN_pinned`` ``ssd_cN`` on tables of its own, its Engine opened with ``decode_cpus`` (all CPUs but the last)
                  and ``io_cpus`` (the last): the decode thread and the I/O threads never share a core (``--pin``),
                  paired with ``model_pinned``;
* ``mooncake_pinned`` ``mooncake`` with the client's threads and its prefetch thread pinned to the last CPU
                  and the decode thread to the others for its calls (``--mooncake-pin``), paired with
                  ``model_pinned`` (the decode thread pinned alike, tables in the model);
* ``mooncake_legacy`` ``mooncake`` with the transfer engine's legacy TCP framing for its calls
                  (``--mooncake-legacy-framing``: ``MC_TCP_PROTO=1``, which this client reads per transfer; no
                  status frame per request). Measured, not a setting to use: a write then completes before it
                  lands, so it is set only around this contender's calls, which only read;
* ``mooncake_R``  the same pool read another way, ``R`` in ``--mooncake-reads`` (``ranges``: one
                  ``get_into_ranges`` per gather, the path before issue 18's item 2; ``lookup``);
* ``mooncake_cN`` ``mooncake`` behind a :class:`CachedTable` (LFU) of N% of the table bytes
                  (``--mooncake-cache-pcts``, none by default), warmed like the SSD caches;
* ``mooncake_process`` the same tables read by a :class:`ReaderProcess` (``--mooncake-process``; what
                  ``generate``/``serve --tier mooncake`` use by default): a pool of its own on another local
                  master, whose segment the reader lends, uploaded by a client that lends none; split phase on
                  the decode thread, no prefetch thread; ``mooncake_process_cN`` behind the same caches as
                  ``mooncake_cN``; with ``--pin`` (or ``--mooncake-pin``) also ``mooncake_process[_cN]_pinned``,
                  on a third pool, the reader's threads on the last CPU, the decode thread on the others;

and reports each contender's decode tokens/s and its time ratio to ``model`` per repeat, all
timed interleaved in one run. The workload is real text: a BPE trained on the Python standard
library's sources, prompts and continuations from held-out files. Continuations are teacher-forced
(``Engine.generate(force=...)``), so the n-gram rows requested per step follow real text rather
than a random-init model's samples; the compute per step is exactly that of generation. Every
repeat decodes NEW text (each contender sees the same sequence of texts), and the hot-row caches
are first brought to a steady state on other held-out text (``warm_caches``), so they are measured
warm but never on text they have already seen.

Run from the repository root: ``nice python -m benchmarks.bench_generate`` (a couple of minutes on
2 cores; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import paired_ratios, sched_seconds, stats, write_result
from engramlm.data.corpora import SourceSpec, load_corpus
from engramlm.data.tokenizer import BOS_ID, train_tokenizer
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.infer import Engine, SamplingParams
from engramlm.infer.tables import export_model_tables, model_tables, open_tables
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.model import EngramLM
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.mooncake import (
    MooncakeTable,
    connect,
    local_master,
    set_transport_affinity,
    set_transport_nice,
)
from engramlm.store.mooncake_reader import ReaderProcess
from engramlm.store.tiers import Tier


def pin_threads(engine: Engine, client: Any, split: tuple[set[int], set[int]] | None) -> None:
    """Pin the calling (decode) thread to ``split[0]`` and ``client``'s threads plus ``engine``'s prefetch
    threads to ``split[1]``; ``split`` None allows every CPU again."""
    every = set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, every if split is None else split[0])
    if client is not None:
        helpers = engine.prefetcher.thread_ids if engine.prefetcher is not None else []
        set_transport_affinity(client, None if split is None else split[1], helpers)


def build_workload(args: argparse.Namespace) -> tuple[Any, list[torch.Tensor]]:
    """(tokenizer, token streams of held-out files) from the stdlib corpus."""
    corpus = load_corpus(SourceSpec(kind="stdlib"), max_bytes=args.corpus_mb << 20)
    tok = train_tokenizer(corpus.texts("train"), vocab_size=8192)
    held = corpus.texts("val") + corpus.texts("test")
    streams = [torch.tensor(e.ids) for e in tok.encode_batch(held)]
    return tok, [s for s in streams if s.numel() >= args.prompt + args.steps]


def build_model(tok: Any, args: argparse.Namespace) -> EngramLM:
    cmap = CompressionMap.from_tokenizer(tok)
    spec = HashSpec(
        max_ngram_size=3,
        n_head_per_ngram=args.heads,
        engram_vocab_size=(args.head_rows, args.head_rows),
        layer_ids=tuple(args.engram_layers),
        pad_id=2,
    )
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size,
        hidden_size=args.hidden,
        num_layers=args.layers,
        n_heads=args.hidden // 64,
        mlp_hidden=args.hidden * 8 // 3 // 64 * 64,
        hc_mult=4,
        engram=EngramConfig(hash=spec, head_dim=args.head_dim, conv_zero_init=False),
    )
    torch.manual_seed(0)
    return EngramLM(cfg, make_layout(spec, cmap)).eval()


def warm_caches(model: EngramLM, caches: dict[str, dict[int, CachedTable]], ids: torch.Tensor, chunk: int) -> int:
    """Bring every hot-row cache to a steady state on other real text before timing.

    A short timed run touches far fewer rows than a serving process does over hours, so cold
    caches would never fill and every budget would look alike. The warm-up streams ``ids``
    through each cache in chunks; its misses are served from an in-memory copy of the very same
    rows (the cache's inner tier is swapped for the duration), which fills the cache exactly as
    reading the file would, only faster. Returns the tokens used.
    """
    rows = model.layout.split(model.hash(ids.reshape(1, -1)))  # {layer: [1, T, H_e]}
    mem = model_tables(model)
    for tables in caches.values():
        for lid, cached in tables.items():
            inner, cached.inner = cached.inner, mem[lid]
            try:
                for part in rows[lid][0].split(chunk):
                    cached.gather(part)
            finally:
                cached.inner = inner
            cached.stats.reset()
    return int(ids.numel())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per call")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--engram-layers", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--heads", type=int, default=4, help="hash heads per n-gram order")
    ap.add_argument("--head-rows", type=int, default=100_003, help="rows per head (prime-ish target)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cache-pcts", type=float, nargs="*", default=[0, 5, 10, 25, 50])
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="prefetch threads of `memory` and `ssd_cN` (default: the tiers' choice, RowTable.prefetch_workers; "
        "0 = inline: gathers started and completed on the decode thread, no worker)",
    )
    ap.add_argument(
        "--pool-workers",
        type=int,
        nargs="*",
        default=[2],
        help="also time `memory` and `ssd_c0` with these prefetch thread counts (contenders memory_wN, "
        "ssd_c0_wN; N = 0 is named memory_inline, ssd_c0_inline), same tables, same run",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--corpus-mb", type=int, default=8)
    ap.add_argument("--warm-tokens", type=int, default=100_000, help="other text streamed through the caches first")
    ap.add_argument("--no-mooncake", action="store_true")
    ap.add_argument(
        "--mooncake-process",
        action="store_true",
        help="also time `mooncake_process` (and `mooncake_process_cN` for --mooncake-cache-pcts, `_pinned` with "
        "--pin): the reader process, on a pool of its own whose segment it lends",
    )
    ap.add_argument(
        "--mooncake-reads",
        nargs="*",
        default=[],
        choices=["ranges", "lookup"],
        help="also time the pool read by these older paths (contenders mooncake_<read>)",
    )
    ap.add_argument(
        "--mooncake-workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="prefetch threads of the batch-read mooncake contender(s): the first is `mooncake`, any other "
        "`mooncake_wN` (one thread reads layer 1 before layer 5 starts; the client is itself multi-threaded)",
    )
    ap.add_argument(
        "--mooncake-nice",
        type=int,
        nargs="*",
        default=[],
        help="also time `mooncake` with the client's transport threads at these niceness values during its "
        "calls (contenders mooncake_niceN; resetting to 0 afterwards needs root)",
    )
    ap.add_argument(
        "--mooncake-pin",
        action="store_true",
        help="also time `mooncake_pinned` (the client's threads and its prefetch thread on the last CPU, the decode "
        "thread on the others) and `model_pinned` (the decode thread pinned alike)",
    )
    ap.add_argument(
        "--mooncake-legacy-framing",
        action="store_true",
        help="also time `mooncake_legacy`: the same reads with MC_TCP_PROTO=1 (no per-request status frame) set "
        "around its calls only (writes would complete before they land)",
    )
    ap.add_argument(
        "--mooncake-cache-pcts",
        type=float,
        nargs="*",
        default=[],
        help="also time the batch reads behind an LFU cache of these %% of the table bytes",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="also time `ssd_cN_pinned` (each cache size on tables of its own, opened by an Engine with the decode "
        "thread on all CPUs but the last, `decode_cpus`, and the I/O threads on the last, `io_cpus`) and "
        "`model_pinned` (the decode thread pinned alike)",
    )
    ap.add_argument("--no-threads-engine", action="store_true", help="skip the ssd_threads contender")
    ap.add_argument("--workdir", default=None, help="where the store file goes (must not be tmpfs for O_DIRECT)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny tables, 1 repeat")
    ap.add_argument("--out", default="generate")
    args = ap.parse_args()
    if args.quick:
        args.head_rows, args.repeats, args.steps, args.hidden, args.layers = 5003, 1, 8, 128, 4
        args.engram_layers = [1, 2]
    torch.set_num_threads(args.threads)

    tok, streams = build_workload(args)
    model = build_model(tok, args)
    table_bytes = sum(int(r) * args.head_dim * 4 for r in model.layout.table_rows)
    calls = args.repeats + 1  # + warm-up
    need = calls * args.batch
    if len(streams) < need:
        raise SystemExit(f"only {len(streams)} held-out files long enough; need {need} (raise --corpus-mb)")
    p, s = args.prompt, args.steps
    work = [
        (
            [[BOS_ID, *streams[c * args.batch + i][: p - 1].tolist()] for i in range(args.batch)],
            torch.stack([streams[c * args.batch + i][p - 1 : p - 1 + s] for i in range(args.batch)]),
        )
        for c in range(calls)
    ]
    params = SamplingParams(max_new_tokens=s)

    workroot = Path(args.workdir) if args.workdir else Path(__file__).resolve().parent / "results" / "tmp"
    workroot.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_", dir=workroot))
    store = tmp / "store"
    t0 = time.perf_counter()
    export_model_tables(model, store, progress=True)
    export_s = time.perf_counter() - t0
    fp = model.layout.fingerprint
    file_bytes = sum(f.stat().st_size for f in store.glob("*.engst"))

    engines: dict[str, Engine] = {"model": Engine(model)}
    caches: dict[str, dict[int, CachedTable]] = {}
    opened: list[dict] = []

    def suffix(nw: int) -> str:
        return "_inline" if nw == 0 else f"_w{nw}"

    mem = model_tables(model)
    engines["memory"] = Engine(model, mem, workers=args.workers)
    for nw in args.pool_workers:
        engines["memory" + suffix(nw)] = Engine(model, mem, workers=nw)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin_split = (set(cpus[:-1]), {cpus[-1]}) if len(cpus) > 1 else None  # (decode cpus, helper cpus)
    pin = args.pin and pin_split is not None
    for pct in args.cache_pcts:
        budget = int(table_bytes * pct / 100)
        name = f"ssd_c{pct:g}"
        for variant in ("", "_pinned") if pin else ("",):
            tables = open_tables(store, Tier.DIRECT, cache_bytes=budget, fingerprint=fp)
            opened.append(tables)
            if budget:
                caches[name + variant] = tables  # type: ignore[assignment]
            cpu_sets = {"decode_cpus": pin_split[0], "io_cpus": pin_split[1]} if variant and pin_split else {}
            engines[name + variant] = Engine(model, tables, workers=args.workers, **cpu_sets)
        if pct == 0:  # the same tables through a worker pool / inline: the prefetch path's own cost, paired
            for nw in args.pool_workers:
                engines[name + suffix(nw)] = Engine(model, tables, workers=nw)
            # inline without the I/O thread: io_submit on the decode thread, reaped at wait (the split phase alone)
            split = {lid: DirectFileTable(getattr(t, "inner", t).header.path, fp, io_thread=False)
                     for lid, t in tables.items()}  # fmt: skip
            opened.append(split)
            engines[name + "_split"] = Engine(model, split, workers=0)
    if not args.no_threads_engine:  # the old I/O engine on the same files, no cache: the before of issue 18
        base = open_tables(store, Tier.DIRECT, fingerprint=fp)
        tables = {lid: DirectFileTable(t.header.path, fp, io_engine="threads") for lid, t in base.items()}
        for t in base.values():
            t.close()
        opened.append(tables)
        engines["ssd_threads"] = Engine(model, tables, workers=args.workers)
    engine_of = {name: sorted({getattr(getattr(t, "inner", t), "io_engine", "?") for t in e.tables.values()})
                 for name, e in engines.items() if name.startswith("ssd")}  # fmt: skip
    inners = [getattr(t, "inner", t) for tables in opened for t in tables.values()]
    aio_submit = sorted({getattr(t, "aio_submit", "-") for t in inners})
    direct_io = all(getattr(getattr(t, "inner", t), "direct_io", False) for tables in opened for t in tables.values())
    mooncake_ctx = contextlib.ExitStack()
    mooncake_info: dict[str, Any] = {"ran": False}
    renice: dict[str, tuple[Any, int]] = {}
    pinned: dict[str, Any] = {}  # contender -> its Mooncake client (None: only the decode thread is pinned)
    legacy: set[str] = set()  # contenders timed with MC_TCP_PROTO=1
    if args.mooncake_legacy_framing:  # present before the client starts, so flipping it replaces a value in place
        os.environ.setdefault("MC_TCP_PROTO", "2")  # (glibc's setenv: no environ realloc under a reading thread)
    if pin_split is not None and (pin or (args.mooncake_pin and not args.no_mooncake)):
        engines["model_pinned"] = Engine(model, decode_cpus=pin_split[0])
    if not args.no_mooncake:
        try:
            master = mooncake_ctx.enter_context(local_master(tmp / "mooncake_master.log"))
            client = connect(master, 2 * file_bytes + (256 << 20))
            mooncake_ctx.callback(client.close)
            t1 = time.perf_counter()
            tables = open_tables(store, Tier.MOONCAKE, fingerprint=fp, mooncake=client)
            reads = sorted({getattr(t, "read", "?") for t in tables.values()})
            mooncake_info = {"ran": True, "upload_seconds": time.perf_counter() - t1, "read": reads}
            opened.append(tables)
            for i, nw in enumerate(args.mooncake_workers):
                engines["mooncake" if i == 0 else f"mooncake_w{nw}"] = Engine(model, tables, workers=nw)
            mooncake_info["legacy_framing_env_at_start"] = os.environ.get("MC_TCP_PROTO")
            if args.mooncake_legacy_framing:  # the same tables, the legacy framing for its calls
                engines["mooncake_legacy"] = Engine(model, tables, workers=args.mooncake_workers[0])
                legacy.add("mooncake_legacy")
            if args.mooncake_pin and pin_split is not None:  # the same tables, the threads pinned for its calls
                engines["mooncake_pinned"] = Engine(model, tables, workers=args.mooncake_workers[0])
                pinned["mooncake_pinned"] = client
            for nv in args.mooncake_nice:  # the same engine; its calls run with the transport threads reniced
                engines[f"mooncake_nice{nv}"] = Engine(model, tables, workers=args.mooncake_workers[0])
                renice[f"mooncake_nice{nv}"] = (client, nv)
            for read in args.mooncake_reads:  # the same objects, read another way
                other = {
                    lid: MooncakeTable(client, lid, t.head_sizes, t.dim, fp, read=read)  # type: ignore[attr-defined]
                    for lid, t in tables.items()
                }
                opened.append(other)
                engines[f"mooncake_{read}"] = Engine(model, other, workers=args.workers)
            for pct in args.mooncake_cache_pcts:
                budget = int(table_bytes * pct / 100)
                cached = open_tables(store, Tier.MOONCAKE, cache_bytes=budget, fingerprint=fp, mooncake=client)
                opened.append(cached)
                caches[f"mooncake_c{pct:g}"] = cached  # type: ignore[assignment]
                engines[f"mooncake_c{pct:g}"] = Engine(model, cached, workers=args.mooncake_workers[0])
            if args.mooncake_process:  # pools of their own, whose memory the reader process lends and reads
                pinned_too = pin_split is not None and (args.pin or args.mooncake_pin)
                for variant in ("", "_pinned") if pinned_too else ("",):
                    master2 = mooncake_ctx.enter_context(local_master(tmp / f"mooncake_master{variant}.log"))
                    reader = ReaderProcess(master2, segment_bytes=2 * file_bytes + (256 << 20))
                    mooncake_ctx.callback(reader.close)
                    client2 = connect(master2, 0)  # uploads; lends no memory, so the rows land in the reader's
                    mooncake_ctx.callback(client2.close)
                    cpu_sets = {"decode_cpus": pin_split[0], "io_cpus": pin_split[1]} if variant and pin_split else {}
                    for pct in (0, *args.mooncake_cache_pcts):
                        name = "mooncake_process" + (f"_c{pct:g}" if pct else "") + variant
                        proc = open_tables(store, Tier.MOONCAKE, cache_bytes=int(table_bytes * pct / 100),
                                           fingerprint=fp, mooncake=client2, mooncake_reader=reader)  # fmt: skip
                        opened.append(proc)
                        if pct:
                            caches[name] = proc  # type: ignore[assignment]
                        engines[name] = Engine(model, proc, **cpu_sets)
        except Exception as exc:  # report, do not hide: the JSON says why it did not run
            mooncake_info = {"ran": False, "error": f"{type(exc).__name__}: {exc}"}
            print(f"mooncake tier skipped: {mooncake_info['error']}")
    warm_tokens = warm_caches(model, caches, torch.cat(streams[need:])[: args.warm_tokens], args.batch * args.prompt)

    # Interleaved: within a repeat every contender decodes the same (new) texts; order rotates.
    names = list(engines)
    secs: dict[str, list[float]] = {n: [] for n in names}
    toks: dict[str, list[float]] = {n: [] for n in names}
    waits: dict[str, dict[str, float]] = {n: {} for n in names}
    outputs: dict[str, list] = {n: [] for n in names}
    call_secs: dict[str, list[float]] = {n: [] for n in names}  # whole generate call (prefill + decode), wall
    runnable: dict[str, list[float]] = {n: [] for n in names}  # of it: the decode thread waiting for a CPU
    on_cpu: dict[str, list[float]] = {n: [] for n in names}  # of it: the decode thread running
    rep_wait: dict[str, list[float]] = {n: [] for n in names}  # per repeat: the forward blocked on rows
    read_bytes: dict[str, int] = {n: 0 for n in names}  # bytes each tier read (SSD: its file), timed calls

    def tier_bytes(n: str) -> int:  # a cache's inner tier counts the file's bytes; tables may be shared
        return sum(getattr(t, "inner", t).stats.bytes_read for t in engines[n].tables.values())

    from tqdm import tqdm

    load_before = os.getloadavg()
    with torch.inference_mode():
        for c in tqdm(range(calls), desc="generate", unit="call"):
            shift = c % len(names)
            for n in names[shift:] + names[:shift]:
                prompts, force = work[c]
                b0 = tier_bytes(n)
                w0, (u0, q0) = time.perf_counter(), sched_seconds()
                if n in renice:
                    set_transport_nice(*renice[n])
                if n in pinned:
                    pin_threads(engines[n], pinned[n], pin_split)
                framing = os.environ.get("MC_TCP_PROTO")
                if n in legacy:
                    os.environ["MC_TCP_PROTO"] = "1"
                try:
                    gen = engines[n].generate(prompts, params, force=force)
                finally:
                    if n in renice:
                        set_transport_nice(renice[n][0], 0)
                    if n in pinned:
                        pin_threads(engines[n], pinned[n], None)
                    if n in legacy and framing is not None:
                        os.environ["MC_TCP_PROTO"] = framing
                wall, (u1, q1) = time.perf_counter() - w0, sched_seconds()
                outputs[n].append(gen.tokens)
                if c == 0:
                    continue  # warm-up: threads start, lazily built tables and buffers appear
                secs[n].append(gen.stats.decode_seconds)
                read_bytes[n] += tier_bytes(n) - b0
                call_secs[n].append(wall)
                runnable[n].append(q1 - q0)
                on_cpu[n].append(u1 - u0)
                toks[n].append(gen.stats.tokens_per_second)
                for k, v in gen.stats.wait_seconds.items():
                    waits[n][str(k)] = waits[n].get(str(k), 0.0) + v
                rep_wait[n].append(sum(gen.stats.wait_seconds.values()))
            if c == 0:
                for e in engines.values():
                    if e.prefetcher is not None:
                        e.prefetcher.reset_metrics()
                for tables in caches.values():
                    for t in tables.values():
                        t.stats.reset()
    same = {n: outputs[n] == outputs["model"] for n in names}
    results = {}
    for n in names:
        r: dict[str, Any] = {
            "decode_seconds": stats(secs[n]),
            "tokens_per_second": stats(toks[n]),
            "time_ratio_vs_model": stats(paired_ratios(secs[n], secs["model"])),
            "wait_seconds_per_layer_total": waits[n],
            "same_tokens_as_model": same[n],
        }
        r["overhead_pct_median"] = 100 * (r["time_ratio_vs_model"]["median"] - 1)
        # What the cache saves: bytes the tier read per generated token (prefill reads included).
        r["read_bytes_per_token"] = read_bytes[n] / (args.repeats * args.batch * args.steps)
        # Decode time lost per step that is NOT blocking on rows (GIL handoffs, the worker's CPU), paired per repeat.
        lost = [(a - b - w) / args.steps for a, b, w in zip(secs[n], secs["model"], rep_wait[n], strict=True)]
        r["lost_ms_per_step_not_waiting"] = stats([1e3 * v for v in lost])
        corrected = [w - q for w, q in zip(call_secs[n], runnable[n], strict=True)]
        base = [w - q for w, q in zip(call_secs["model"], runnable["model"], strict=True)]
        r["call_seconds"] = stats(call_secs[n])
        r["runnable_wait_pct_of_call"] = 100 * sum(runnable[n]) / max(sum(call_secs[n]), 1e-12)
        r["load_corrected_time_ratio_vs_model"] = stats(paired_ratios(corrected, base))
        r["load_corrected_overhead_pct_median"] = 100 * (r["load_corrected_time_ratio_vs_model"]["median"] - 1)
        # Where the extra time goes: the decode thread's own CPU (Python, copies, cache misses) against ``model``,
        # and its time off a CPU that is not waiting for one (blocked on rows, the GIL, a futex), per call.
        r["decode_thread_cpu_overhead_pct_median"] = 100 * (
            stats(paired_ratios(on_cpu[n], on_cpu["model"]))["median"] - 1
        )
        r["off_cpu_ms_per_call"] = stats(
            [1e3 * (w - u - q) for w, u, q in zip(call_secs[n], on_cpu[n], runnable[n], strict=True)]
        )
        # Time the forward sat blocked on rows, over the decode time: immune to the machine's noise.
        r["wait_pct_of_decode"] = 100 * sum(waits[n].values()) / max(sum(secs[n]), 1e-12)
        pf = engines[n].prefetcher
        if pf is not None:
            r["prefetch_workers"] = pf.workers  # 0: inline (started and completed on the decode thread)
            r["split_phase"] = all(t.split_phase for t in engines[n].tables.values())
            r["io_thread"] = all(
                getattr(getattr(t, "inner", t), "io_thread", False) for t in engines[n].tables.values()
            )
        if pf is not None:  # gather time in the workers (prefill + decode): work hidden behind compute
            r["fetch_seconds_per_layer"] = {str(k): m["fetch_s"] for k, m in pf.metrics.items()}
            r["max_wait_seconds_per_layer"] = {str(k): m["max_wait_s"] for k, m in pf.metrics.items()}
        if n in caches:
            hits = sum(t.stats.hits for t in caches[n].values())
            misses = sum(t.stats.misses for t in caches[n].values())
            r["cache_hit_rate"] = hits / max(hits + misses, 1)
            r["cache_rows"] = sum(t.capacity for t in caches[n].values())
        results[n] = r
    curve = [
        {"cache_pct": pct, "overhead_pct": results[f"ssd_c{pct:g}"]["overhead_pct_median"],
         "wait_pct_of_decode": results[f"ssd_c{pct:g}"]["wait_pct_of_decode"],
         "load_corrected_overhead_pct": results[f"ssd_c{pct:g}"]["load_corrected_overhead_pct_median"],
         "hit_rate": results[f"ssd_c{pct:g}"].get("cache_hit_rate", 0.0),
         "read_bytes_per_token": results[f"ssd_c{pct:g}"]["read_bytes_per_token"]}
        for pct in args.cache_pcts
    ]  # fmt: skip
    for e in engines.values():
        e.close()
    for tables in opened:
        for t in tables.values():
            t.close()
    mooncake_ctx.close()
    shutil.rmtree(tmp, ignore_errors=True)

    payload = {
        "params": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "engram_layers": list(model.layout.layer_ids),
            "table_rows": [int(r) for r in model.layout.table_rows],
            "table_bytes": table_bytes,
            "store_file_bytes": file_bytes,
            "export_seconds": export_s,
        },
        "direct_io": direct_io,
        "io_engine": engine_of,
        "aio_submit": aio_submit,  # kernel: Linux AIO (no helper threads); glibc: POSIX AIO's helper threads
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "mooncake": mooncake_info,
        "pinned_cpus": {"decode": sorted(pin_split[0]), "helpers": sorted(pin_split[1])}
        if (pinned or pin) and pin_split else None,
        "workload": {"corpus": "stdlib (held-out val+test files)", "tokenizer": "BPE 8k trained on stdlib train",
                     "decode": "teacher-forced real text", "tokens_per_call": args.batch * args.steps,
                     "cache_warmup_tokens": warm_tokens},
        "results": results,
        "overhead_vs_cache": curve,
    }  # fmt: skip
    path = write_result(args.out, payload)
    print(f"wrote {path}")
    width = max(len(n) for n in names)
    for n in names:
        r = results[n]
        hit = f"  hit {r['cache_hit_rate']:.1%}" if "cache_hit_rate" in r else ""
        ratio = r["time_ratio_vs_model"]
        print(
            f"{n:<{width}}  {r['tokens_per_second']['median']:8.1f} tok/s  overhead {r['overhead_pct_median']:+6.1f}%"
            f"  (IQR {100 * (ratio['q1'] - 1):+.1f}..{100 * (ratio['q3'] - 1):+.1f}%)"
            f"  wait {r['wait_pct_of_decode']:.2f}%  load-corrected {r['load_corrected_overhead_pct_median']:+6.1f}%"
            f"  lost/step {r['lost_ms_per_step_not_waiting']['median']:+.3f} ms"
            f"  thread CPU {r['decode_thread_cpu_overhead_pct_median']:+.1f}%"
            f"  off-CPU {r['off_cpu_ms_per_call']['median']:.1f} ms"
            f"  same={r['same_tokens_as_model']}{hit}"
        )


if __name__ == "__main__":
    main()
