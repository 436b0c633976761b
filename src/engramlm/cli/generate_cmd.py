"""``engramlm generate CHECKPOINT --prompt TEXT``: sample text, with the Engram tables on any tier.

CHECKPOINT is a ``save_pretrained`` directory, a training checkpoint (its ``model/``), or a run
directory (its latest checkpoint). The tokenizer is the one the model was trained with
(:func:`engramlm.models.locate.find_tokenizer`: ``--tokenizer``, else found next to the model or
its training data); one whose compression map differs from the model's is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from engramlm.errors import ConfigError, EngramError
from engramlm.store.tiers import Tier, tier_help


class _Given(argparse.Action):
    """Store the value and note that it was given (options that only apply with another one)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), option_string}


def add_workers_option(p: argparse.ArgumentParser) -> None:
    """``--workers``: the prefetch threads, as ``generate`` and ``serve`` both take them."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="prefetch worker threads, 0 = gather on the decode thread (default: the tiers' choice: 0 for memory "
        "and for the direct tier with its I/O thread, 1 for mooncake, else 2)",
    )


def add_mooncake_options(p: argparse.ArgumentParser) -> None:
    """The Mooncake pool's address, the memory this host lends it, and who reads it (``generate`` and ``serve``)."""
    p.add_argument("--mooncake-master", default="127.0.0.1:50051", help="mooncake_master RPC address (--tier mooncake)")
    p.add_argument("--mooncake-metadata", default="http://127.0.0.1:8080/metadata", help="its HTTP metadata server")
    p.add_argument("--mooncake-segment-mb", type=int, default=512, help="memory this host lends to the pool")
    p.add_argument(
        "--mooncake-reader",
        choices=("process", "thread"),
        default="process",
        help="who reads the pool: a reader process of its own, which also lends the segment (default; no GIL "
        "hand-offs with the decode thread), or a prefetch thread of this process",
    )


def mooncake_client(args: argparse.Namespace) -> tuple[Any, Any]:
    """(client, reader) for ``--tier mooncake``: the client uploads and checks fingerprints; the reader process,
    unless ``--mooncake-reader thread``, lends the segment and reads (the client then lends none)."""
    from engramlm.store.mooncake import MasterAddress, check_reachable, connect
    from engramlm.store.mooncake_reader import ReaderProcess

    master = MasterAddress(args.mooncake_master, args.mooncake_metadata)
    segment = args.mooncake_segment_mb << 20
    try:
        check_reachable(master)
        if args.mooncake_reader == "thread":
            return connect(master, segment), None
        reader = ReaderProcess(master, segment_bytes=segment)
        try:
            return connect(master, 0), reader
        except BaseException:
            reader.close()
            raise
    except EngramError as exc:
        raise ConfigError(f"--mooncake-master: {exc}") from exc


def _sample_vocab(tok: Any, model: Any) -> int:
    """Ids generation may sample: the tokenizer's (the model's vocabulary may be padded past it)."""
    return min(tok.get_vocab_size(with_added_tokens=True), model.config.vocab_size)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="generate text from a saved model (tables in the model or a store)")
    p.add_argument("checkpoint", help="save_pretrained dir, training checkpoint or run dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--tokenizer", help="tokenizer.json path or known name (default: found next to the model)")
    p.add_argument("--store", help="store directory (store.json) serving the Engram tables")
    p.add_argument(
        "--tier", default=Tier.MMAP.value, choices=Tier.names(), action=_Given, help=f"with --store: {tier_help()}"
    )
    p.add_argument("--cache-mb", type=float, default=0.0, action=_Given, help="hot-row cache budget in MiB (0 = none)")
    p.add_argument(
        "--no-verify-store",
        action="store_true",
        help="with --store: skip the per-page checksum of every row read (faster; corrupt rows then go unnoticed)",
    )
    add_mooncake_options(p)
    add_workers_option(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stream", action="store_true", help="print the prompt, then the new text as it is generated (one prompt)"
    )
    p.add_argument("--no-echo", action="store_true", help="with --stream: print only the new text, not the prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the result and timing as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from engramlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
    from engramlm.infer import Engine, SamplingParams
    from engramlm.infer.tables import drop_model_tables, open_tables
    from engramlm.models.locate import find_tokenizer, load_trained_model, read_tokenizer

    given = {*getattr(args, "given", ()), *(["--no-verify-store"] if args.no_verify_store else [])}
    if args.store is None and given:
        option = sorted(given)[-1]  # --tier before --no-verify-store before --cache-mb
        raise ConfigError(f"{option}: only applies with --store DIR (the tables then come from that store)")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device: {args.device!r} is not a torch device ({exc})") from None
    if device.type != "cpu" and not getattr(getattr(torch, device.type, None), "is_available", lambda: False)():
        raise ConfigError(f"--device: {args.device} is not available on this machine; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    trained = load_trained_model(args.checkpoint, map_location=args.device)
    model, model_dir = trained.model, trained.files.model_dir
    tok_path = find_tokenizer(trained.files, model, explicit=args.tokenizer)
    tok = read_tokenizer(tok_path)
    if [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]:  # the project layout
        bos, eos = [BOS_ID], (EOS_ID,)
    else:  # e.g. a DeepSeek tokenizer: no BOS/EOS convention
        bos, eos = [], ()
    # BOS is ours to add: a tokenizer that adds it itself (an `export-hf` copy's post-processor) must not add it twice
    prompts = [bos + tok.encode(text, add_special_tokens=not bos).ids for text in args.prompt]
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_tokens=eos,
        seed=args.seed,
    )
    tables, reader = None, None
    if args.store:
        if model.layout is None:
            raise ConfigError("--store: the model has no Engram layers")
        client, reader = mooncake_client(args) if args.tier == Tier.MOONCAKE else (None, None)
        try:
            tables = open_tables(
                args.store,
                args.tier,
                cache_bytes=int(args.cache_mb * (1 << 20)),
                fingerprint=model.layout.fingerprint,
                mooncake=client,
                mooncake_reader=reader,
                model_sha256=trained.files.weights_sha256(),
                verify=not args.no_verify_store,
            )
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        drop_model_tables(model)
    on_step = None
    if args.stream and len(prompts) == 1 and not args.json:
        ids: list[int] = []
        shown = [0]

        def on_step(out) -> None:  # one sequence: print the new text as it arrives
            if bool(out.emitted[0]):
                ids.append(int(out.tokens[0]))
                text = tok.decode(ids)
                if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                    sys.stdout.write(text[shown[0] :])
                    sys.stdout.flush()
                    shown[0] = len(text)
            if bool(out.finished[0]):
                sys.stdout.write(tok.decode(ids)[shown[0] :])

    if on_step is not None and not args.no_echo:  # as the non-streamed output: the prompt, then its continuation
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    try:
        with (
            torch.inference_mode(),
            Engine(
                model, tables, workers=args.workers, pad_id=bos[0] if bos else 0, vocab_size=_sample_vocab(tok, model)
            ) as eng,
        ):
            gen = eng.generate(prompts, params, on_step=on_step)
    finally:
        for t in (tables or {}).values():
            t.close()
        if reader is not None:
            reader.close()
    wall = time.perf_counter() - t0
    texts = [tok.decode(ids) for ids in gen.tokens]
    if args.json:
        doc = {
            "model": str(model_dir),
            "tokenizer": str(tok_path),
            "store": args.store,
            "tier": args.tier if args.store else "model",
            "outputs": [
                {"prompt": p, "text": t, "tokens": ids, "finish_reason": r}
                for p, t, ids, r in zip(args.prompt, texts, gen.tokens, gen.finish_reasons, strict=True)
            ],
            "stats": {**gen.stats.as_dict(), "wall_seconds": wall},
        }
        print(json.dumps(doc, indent=2))
        return 0
    if on_step is not None:
        print()
    else:
        for prompt, text in zip(args.prompt, texts, strict=True):
            print(f"{prompt}{text}")
    s = gen.stats
    print(
        f"[{s.new_tokens} tokens, prefill {s.prefill_seconds * 1e3:.1f} ms, decode {s.tokens_per_second:.1f} tok/s"
        + (f", Engram wait {sum(s.wait_seconds.values()) * 1e3:.1f} ms" if s.wait_seconds else "")
        + "]",
        file=sys.stderr,
    )
    return 0
