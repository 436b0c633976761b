"""``engramlm serve RUN``: an OpenAI-compatible HTTP server (continuous batching) on 127.0.0.1 by default.

RUN is anything ``engramlm generate`` accepts; ``--store DIR --tier T`` serves the Engram rows from a store
directory on any tier. SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight
(at most ``--drain-timeout`` seconds) and exits 0.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from engramlm.cli.generate_cmd import add_mooncake_options, add_workers_option
from engramlm.errors import ConfigError
from engramlm.store.tiers import Tier, tier_help


def register(subparsers: Any) -> None:
    from engramlm.cli.generate_cmd import _Given

    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching)")
    p.add_argument("checkpoint", help="save_pretrained dir, training checkpoint or run dir")
    p.add_argument("--tokenizer", help="tokenizer.json path or known name (default: found next to the model)")
    p.add_argument("--store", help="store directory (store.json) serving the Engram tables")
    p.add_argument(
        "--tier", default=Tier.MMAP.value, choices=Tier.names(), action=_Given, help=f"with --store: {tier_help()}"
    )
    p.add_argument("--cache-mb", type=float, default=0.0, action=_Given, help="hot-row cache budget in MiB (0 = none)")
    p.add_argument("--no-verify-store", action="store_true", help="with --store: skip the per-page row checksums")
    add_mooncake_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's directory name)")
    p.add_argument("--max-batch", type=int, default=16, help="decode slots: requests running at once")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--prefill-tokens", type=int, default=1024, help="prompt tokens admitted per scheduler step")
    p.add_argument("--max-len", type=int, default=None, help="context length (default: the model's max_seq_len)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests in flight")
    add_workers_option(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from engramlm.serve.app import create_app
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"serve: {exc.name} is not installed; install the extra: pip install 'engramlm[serve]'"
        ) from None
    import torch

    from engramlm.cli.generate_cmd import mooncake_client
    from engramlm.serve.served import load_served

    given = {*getattr(args, "given", ()), *(["--no-verify-store"] if args.no_verify_store else [])}
    if args.store is None and given:
        raise ConfigError(f"{sorted(given)[-1]}: only applies with --store DIR (the tables then come from that store)")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: must lie in [0, 65535], got {args.port}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    client, reader = mooncake_client(args) if args.store and args.tier == Tier.MOONCAKE else (None, None)
    try:
        served = load_served(
            args.checkpoint,
            name=args.served_model_name,
            tokenizer=args.tokenizer,
            store=args.store,
            tier=args.tier,
            cache_bytes=int(args.cache_mb * (1 << 20)),
            verify_store=not args.no_verify_store,
            mooncake=client,
            mooncake_reader=reader,
            device=args.device,
            workers=args.workers,
        )
    except BaseException:
        if reader is not None:
            reader.close()
        raise
    try:
        if args.max_len is not None and args.max_len > served.max_len:
            raise ConfigError(f"--max-len: the model's context is {served.max_len} tokens, got {args.max_len}")
        app = create_app(
            served,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prefill_tokens=args.prefill_tokens,
            max_len=args.max_len,
        )
        config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=args.drain_timeout
        )
        # SIGTERM/SIGINT: uvicorn stops accepting, finishes the responses in flight, the lifespan drains the
        # scheduler; then uvicorn replays the signal into the handler it found. A no-op one makes SIGTERM a
        # clean exit 0 (a service manager's stop), Ctrl-C keeps its KeyboardInterrupt (exit 130).
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            uvicorn.Server(config).run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        served.close()
        if reader is not None:
            reader.close()
    return 0
