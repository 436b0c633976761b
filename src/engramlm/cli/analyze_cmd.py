"""``engramlm analyze``: the analysis instruments, each writing JSON plus a picture under ``--out``.

``gates`` / ``fired`` take a checkpoint and a text; ``knockout`` / ``rows`` / ``logit-lens`` / ``cka``
take checkpoints and a prepared corpus (``engramlm data prepare``); ``plan`` takes a preset or
config file and needs no checkpoint. See ``engramlm.analysis`` for the definitions.

Without ``--out`` the files go next to what was analysed, never into the current directory:
``RUN/analysis/<instrument>/`` for a run directory or one of its checkpoints (the first checkpoint's,
for ``logit-lens`` / ``cka``), ``MODEL_DIR/analysis/<instrument>/`` for a bare saved model; one line
on stderr says where. ``plan`` prints its table and writes ``plan.json`` only into an ``--out`` given.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _int_list(text: str, option: str) -> list[int]:
    """``8,64,512`` -> [8, 64, 512]; a bad entry is a ConfigError naming ``option``."""
    from engramlm.errors import ConfigError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{option}: must be comma-separated integers >= 1, got {text!r}")
    return values


def _float_list(text: str, option: str) -> list[float]:
    from engramlm.errors import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ConfigError(f"{option}: must be comma-separated numbers > 0, got {text!r}")
    return values


def _at_least(low: int):
    """An argparse type: an int >= ``low`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def _common(p: argparse.ArgumentParser, *, eval_opts: bool = False) -> None:
    p.add_argument("--out", default=None, help="output directory (default: RUN/analysis/INSTRUMENT/, see above)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar of the evaluation sweep on stderr (default: when stderr is a terminal)",
    )
    if eval_opts:
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--max-batches", type=int, default=None, help="score only the first N batches")


def _text_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a saved model, a training checkpoint or a run directory (its latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to analyse")
    src.add_argument("--text-file", help="read the text from this UTF-8 file")
    p.add_argument("--tokenizer", help="tokenizer.json (default: --data's, the checkpoint's, or the config's)")
    p.add_argument("--data", help="a prepared corpus directory (for its tokenizer.json)")


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "analyze",
        help="analysis instruments (gates, knockout, rows, fired, logit-lens, cka, plan)",
        description="Each instrument writes <name>.json plus a picture into --out (default: RUN/analysis/INSTRUMENT/ "
        "of the run the (first) checkpoint belongs to, or MODEL_DIR/analysis/INSTRUMENT/ for a bare saved model).",
    )
    inst = a.add_subparsers(dest="instrument", metavar="INSTRUMENT")

    p = inst.add_parser("gates", help="gate per token/layer/branch: HTML coloured text + PNG heatmap")
    _text_opts(p)
    _common(p)
    p.set_defaults(func=_leaves_nothing_on_failure(run_gates))

    p = inst.add_parser("fired", help="n-grams, row ids and gate of one token")
    _text_opts(p)
    p.add_argument("--position", type=int, default=-1, help="token index (negative: from the end; 0 is BOS)")
    _common(p)
    p.set_defaults(func=_leaves_nothing_on_failure(run_fired))

    p = inst.add_parser("knockout", help="loss/bpb normal vs Engram suppressed vs capacity-1 table, per class")
    p.add_argument("checkpoint")
    p.add_argument("--data", action="append", required=True, help="prepared corpus directory (repeatable)")
    p.add_argument("--split", action="append", default=None, help="split(s) to score (default val)")
    p.add_argument("--no-per-layer", action="store_true", help="skip the per-layer knockouts")
    _common(p, eval_opts=True)
    p.set_defaults(func=_leaves_nothing_on_failure(run_knockout))

    p = inst.add_parser("rows", help="row usage, Zipf fit, collisions, loss on frequent vs rare n-grams")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train", help="split whose row accesses are counted (default train)")
    p.add_argument("--eval-split", default="val", help="split scored for loss by n-gram count ('none' to skip)")
    p.add_argument("--max-tokens", type=int, default=None, help="count only the first N tokens of --split")
    _common(p, eval_opts=True)
    p.set_defaults(func=_leaves_nothing_on_failure(run_rows))

    p = inst.add_parser("logit-lens", help="KL of each layer's early exit to the final distribution")
    p.add_argument("checkpoint", nargs="+", help="one or more checkpoints (plotted together)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    _common(p, eval_opts=True)
    p.set_defaults(func=_leaves_nothing_on_failure(run_logit_lens))

    p = inst.add_parser("cka", help="linear CKA between the layers of two checkpoints")
    p.add_argument("checkpoint_a")
    p.add_argument("checkpoint_b")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--max-tokens", type=int, default=1024, help="scored positions used (default 1024)")
    p.add_argument(
        "--positions", choices=("recurring", "all"), default="recurring",
        help="recurring: final tokens of n-grams seen >= 2 times in the split (spec 9.8); all: every scored token",
    )  # fmt: skip
    p.add_argument("--ngram", type=_at_least(1), default=3, help="n of the recurring n-grams (default 3)")
    p.add_argument("--minibatch", type=_at_least(4), default=256, help="samples per HSIC minibatch (default 256)")
    p.add_argument("--top-k", type=_at_least(1), default=5, help="layers the alignment index averages (default 5)")
    _common(p, eval_opts=True)
    p.set_defaults(func=_leaves_nothing_on_failure(run_cka))

    p = inst.add_parser("plan", help="table bytes per tier, bytes per token/step, bandwidth/IOPS needed")
    p.add_argument("target", help="preset name or config file")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp8 (default: the config's table_dtype)")
    p.add_argument("--tier", default="hbm", help=f"where the table lives: {' | '.join(_medium_names())}")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step (decode: concurrent sequences)")
    p.add_argument("--tokens-per-s", type=float, default=1e5, help="target throughput")
    p.add_argument("--dedup", type=float, default=1.0, help="row reads per distinct row within a step (>= 1)")
    p.add_argument("--page-bytes", type=int, default=4096, help="ssd read unit")
    p.add_argument("--ref-bytes-per-s", type=float, default=None, help="override the tier's reference bandwidth")
    p.add_argument("--ref-iops", type=float, default=None, help="override the tier's reference IOPS")
    p.add_argument("--cache-mb", type=float, default=0.0, help="hot-row cache budget of the placement, MiB (0 = none)")
    p.add_argument(
        "--seq-len",
        type=_at_least(1),
        default=None,
        help="--batch counts sequences of this many tokens (tokens per step = batch x seq-len)",
    )
    d = p.add_argument_group("distributed view (training with tables row-sharded over ranks)")
    d.add_argument("--ranks", default=None, help="comma-separated rank counts, e.g. 8,64,512 (default: no view)")
    d.add_argument("--row-dtype", default="fp32", help="dtype of the trained rows the exchange moves (default fp32)")
    d.add_argument("--unique-model", default="uniform", help="uniform (worst case) | zipf | measured")
    d.add_argument(
        "--unique-fraction",
        type=float,
        default=None,
        help="measured unique rows / row reads of one rank's local batch (--unique-model measured)",
    )
    d.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of n-gram draws (--unique-model zipf)")
    d.add_argument("--zipf-types", type=int, default=10**9, help="n-gram types of the Zipf law (--unique-model zipf)")
    d.add_argument("--links-gbps", default="25,50,100,400", help="per-rank link speeds to time the exchange at, Gb/s")
    d.add_argument("--accel-tflops", type=float, default=989.0, help="accelerator dense rate, TFLOP/s (H100 bf16)")
    d.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of that rate (default 0.4)")
    p.add_argument("--out", default=None, help="also write plan.json into this directory (default: print only)")
    p.set_defaults(func=_leaves_nothing_on_failure(run_plan))

    a.set_defaults(func=lambda _args: a.print_help() or 2)


# ------------------------------------------------------------------------------------ helpers


def _medium_names() -> tuple[str, ...]:
    from engramlm.store.tiers import Medium

    return Medium.names()


def _model_and_tokenizer(args: argparse.Namespace, checkpoint: str, data: str | None = None):
    from engramlm.models.locate import load_trained_model

    trained = load_trained_model(checkpoint)
    return trained.model, _tokenizer(args, trained, data)


def _tokenizer(args: argparse.Namespace, trained, data: str | None):
    """The tokenizer ``trained`` was hashed with (``--tokenizer``, else ``data``'s, else found near it)."""
    from engramlm.data.tokenizer import check_specials
    from engramlm.models.locate import find_tokenizer, read_tokenizer

    path = find_tokenizer(trained.files, trained.model, explicit=getattr(args, "tokenizer", None), data=data)
    tok = read_tokenizer(path)
    check_specials(tok)  # the instruments prepend the project's BOS id
    return tok


def _read_text(args: argparse.Namespace) -> str:
    return args.text if args.text is not None else Path(args.text_file).read_text(encoding="utf-8")


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else args.progress


def _out_dir(args: argparse.Namespace, instrument: str, checkpoint: str) -> Path:
    """``--out``, else ``analysis/<instrument>/`` under the run ``checkpoint`` belongs to: the run directory of
    a run or of one of its checkpoints, a checkpoint directory outside a run, a bare saved model's directory.
    Created here, so that one we cannot write is refused before the analysis runs."""
    from engramlm.errors import ConfigError
    from engramlm.models.locate import checkpoints_dir, locate_model

    if args.out is not None:
        out = Path(args.out)
    else:
        files = locate_model(checkpoint)
        if files.checkpoint is None:
            home = files.model_dir
        elif files.checkpoint.parent == checkpoints_dir(files.checkpoint.parent.parent):
            home = files.checkpoint.parent.parent
        else:
            home = files.checkpoint
        out = home / "analysis" / instrument
    first_new = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: cannot create {out} ({exc.strerror}); pass --out DIR") from exc
    if first_new is not None:
        args.created_out = first_new  # removed again if the instrument fails before writing anything
    return out


def _leaves_nothing_on_failure(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An instrument that fails leaves no output directory it created itself (and nothing in it)."""

    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except BaseException:
            created = getattr(args, "created_out", None)
            if created is not None and not any(p.is_file() for p in created.rglob("*")):
                shutil.rmtree(created, ignore_errors=True)
            raise

    return guarded


def _done(files: dict[str, str], summary: dict[str, Any]) -> int:
    where = Path(files["json"]).parent
    print(f"engramlm: wrote {', '.join(Path(f).name for f in files.values())} to {where}/", file=sys.stderr)
    print(json.dumps({"files": files, **summary}, indent=2))
    return 0


# ------------------------------------------------------------------------------------ commands


def run_gates(args: argparse.Namespace) -> int:
    from engramlm.analysis.common import encode_text, token_texts, write_outputs
    from engramlm.analysis.gates import compute_gates, gate_report, plot_gates, render_html

    out = _out_dir(args, "gates", args.checkpoint)  # first: an unwritable one fails before the work

    model, tok = _model_and_tokenizer(args, args.checkpoint, args.data)
    ids, doc = encode_text(tok, _read_text(args))
    texts = token_texts(tok, model.config.vocab_size)
    report = gate_report([texts[i] for i in ids[0].tolist()], ids[0].tolist(), compute_gates(model, ids, doc))
    report["checkpoint"] = str(args.checkpoint)
    files = write_outputs(out, "gates", report, plot_gates(report), render_html(report))
    return _done(files, {"tokens": len(report["tokens"]), "mean_gate": report["mean_gate"]})


def run_fired(args: argparse.Namespace) -> int:
    from engramlm.analysis.common import encode_text, token_texts, write_outputs
    from engramlm.analysis.fired import fired_rows, plot_fired

    out = _out_dir(args, "fired", args.checkpoint)  # first: an unwritable one fails before the work

    model, tok = _model_and_tokenizer(args, args.checkpoint, args.data)
    ids, doc = encode_text(tok, _read_text(args))
    report = fired_rows(model, ids, doc, args.position, token_texts(tok, model.config.vocab_size))
    report["checkpoint"] = str(args.checkpoint)
    files = write_outputs(out, "fired", report, plot_fired(report))
    return _done(files, {"position": report["position"], "token": report["token"]})


def _train_counts(data: str, vocab_size: int):
    import numpy as np

    from engramlm.data import TokenDataset

    ds = TokenDataset(data, "train", verify=False)
    return np.bincount(np.asarray(ds.tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]


def run_knockout(args: argparse.Namespace) -> int:
    import numpy as np

    from engramlm.analysis.classes import TokenClasses
    from engramlm.analysis.common import token_texts, write_outputs
    from engramlm.analysis.knockout import plot_knockout
    from engramlm.analysis.knockout import run_knockout as knockout
    from engramlm.data import TokenDataset
    from engramlm.models.locate import load_trained_model

    out = _out_dir(args, "knockout", args.checkpoint)  # first: an unwritable one fails before the work
    trained = load_trained_model(args.checkpoint)
    model = trained.model
    sets = {}
    for data in args.data:
        tok = _tokenizer(args, trained, data)
        v = model.config.vocab_size
        counts = _train_counts(data, v)
        for split in args.split or ["val"]:
            ds = TokenDataset(data, split)
            classes = TokenClasses(token_texts(tok, v), np.asarray(ds.token_bytes), counts)
            sets[f"{Path(data).name}/{split}"] = (ds, classes, counts)
    report = knockout(
        model,
        sets,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_batches=args.max_batches,
        per_layer=not args.no_per_layer,
        progress=_progress(args),
    )
    report["checkpoint"] = str(args.checkpoint)
    files = write_outputs(out, "knockout", report, plot_knockout(report))
    summary = {
        name: {"loss": {m: r["modes"][m]["loss"] for m in r["modes"]}, "share_kept": r["share_kept"]}
        for name, r in ((n, s["overall"]) for n, s in report["sets"].items())
    }
    return _done(files, {"overall": summary})


def run_rows(args: argparse.Namespace) -> int:
    from engramlm.analysis.common import write_outputs
    from engramlm.analysis.rows import plot_rows
    from engramlm.analysis.rows import run_rows as rows
    from engramlm.data import TokenDataset

    out = _out_dir(args, "rows", args.checkpoint)  # first: an unwritable one fails before the work

    model, _ = _model_and_tokenizer(args, args.checkpoint, args.data)
    eval_ds = None if args.eval_split == "none" else TokenDataset(args.data, args.eval_split)
    report, curves = rows(
        model,
        model.layout,
        TokenDataset(args.data, args.split),
        eval_ds,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_batches=args.max_batches,
        progress=_progress(args),
    )
    report["checkpoint"] = str(args.checkpoint)
    files = write_outputs(out, "rows", report, plot_rows(report, curves))
    touched = {lid: [round(h["touched_share"], 4) for h in layer["heads"]] for lid, layer in report["layers"].items()}
    return _done(files, {"touched_share": touched})


def run_logit_lens(args: argparse.Namespace) -> int:
    from engramlm.analysis.common import write_outputs
    from engramlm.analysis.lens import logit_lens, plot_logit_lens
    from engramlm.data import TokenDataset

    out = _out_dir(args, "logit-lens", args.checkpoint[0])  # first: an unwritable one fails before the work

    ds = TokenDataset(args.data, args.split)
    reports = {}
    for ckpt in args.checkpoint:
        model, _ = _model_and_tokenizer(args, ckpt, args.data)
        rep = logit_lens(model, ds, batch_size=args.batch_size, seq_len=args.seq_len, max_batches=args.max_batches,
                         progress=_progress(args))  # fmt: skip
        reports[str(ckpt)] = rep
    files = write_outputs(out, "logit_lens", {"split": args.split, "models": reports}, plot_logit_lens(reports))
    return _done(files, {name: {"kl_to_final": r["kl_to_final"]} for name, r in reports.items()})


def run_cka(args: argparse.Namespace) -> int:
    from engramlm.analysis.common import write_outputs
    from engramlm.analysis.lens import (
        alignment_index,
        cka_matrix,
        collect_states,
        layer_names,
        plot_cka,
        recurring_ngram_ends,
    )  # fmt: skip
    from engramlm.data import TokenDataset

    out = _out_dir(args, "cka", args.checkpoint_a)  # first: an unwritable one fails before the work

    ds = TokenDataset(args.data, args.split)
    where = recurring_ngram_ends(ds, args.ngram) if args.positions == "recurring" else None
    states, names = [], []
    for ckpt in (args.checkpoint_a, args.checkpoint_b):
        model, _ = _model_and_tokenizer(args, ckpt, args.data)
        states.append(collect_states(model, ds, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                     seq_len=args.seq_len, positions=where))  # fmt: skip
        names.append(layer_names(model))
    mat = cka_matrix(states[0], states[1], minibatch=args.minibatch)
    report = {
        "a": str(args.checkpoint_a),
        "b": str(args.checkpoint_b),
        "split": args.split,
        "positions": args.positions if args.positions == "all" else f"recurring {args.ngram}-gram ends",
        "tokens": int(states[0][0].shape[0]),
        "minibatch": args.minibatch,
        "layers_a": names[0],
        "layers_b": names[1],
        "cka": mat.round(6).tolist(),
        "alignment_index": {"top_k": args.top_k, "a": alignment_index(mat, args.top_k)},
    }
    fig = plot_cka(mat, names[0], names[1], Path(args.checkpoint_a).name, Path(args.checkpoint_b).name)
    files = write_outputs(out, "cka", report, fig)
    return _done(files, {"tokens": report["tokens"], "alignment_index": report["alignment_index"]["a"]})


def run_plan(args: argparse.Namespace) -> int:
    from engramlm.analysis.planner import (
        DistRequest,
        PlanRequest,
        format_distributed,
        format_plan,
        plan,
        plan_distributed,
    )
    from engramlm.models.build import resolve_config
    from engramlm.utils.io import atomic_write_json

    config = resolve_config(args.target)
    dtype = args.dtype or (config.engram.table_dtype if config.engram is not None else "fp32")
    tokens = args.batch * (args.seq_len or 1)
    req = PlanRequest(
        dtype=dtype,
        tier=args.tier,
        batch=tokens,
        tokens_per_s=args.tokens_per_s,
        dedup=args.dedup,
        page_bytes=args.page_bytes,
        reference_bytes_per_s=args.ref_bytes_per_s,
        reference_iops=args.ref_iops,
        cache_bytes=int(args.cache_mb * (1 << 20)),
    )
    dreqs = [
        DistRequest(
            ranks=ranks,
            batch=tokens,
            row_dtype=args.row_dtype,
            unique_model=args.unique_model,
            unique_fraction=args.unique_fraction,
            zipf_s=args.zipf_s,
            zipf_types=args.zipf_types,
            links_gbps=tuple(_float_list(args.links_gbps, "--links-gbps")),
            accel_flops=args.accel_tflops * 1e12,
            mfu=args.mfu,
        )
        for ranks in (_int_list(args.ranks, "--ranks") if args.ranks is not None else [])
    ]  # every request checked before anything prints
    result = plan(config, req)
    print(format_plan(result))
    if dreqs:
        result["distributed"] = [plan_distributed(config, d) for d in dreqs]
        for view in result["distributed"]:
            print("\n" + format_distributed(view))
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out) / "plan.json", result)
        print(f"\nwrote {Path(args.out) / 'plan.json'}")
    return 0
