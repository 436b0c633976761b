"""``engramlm store``: build store directories from checkpoints; check and describe store files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError, CorruptFileError, ForeignStoreError, HashSpecMismatch
from engramlm.store.tiers import Tier, tier_help


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("store", help="build, inspect and verify table stores")
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check the header and every chunk checksum")
    verify.add_argument("path", help="a store directory (what `store build --out` writes) or one layer file")
    verify.add_argument("--fingerprint", help="expected hash-spec fingerprint (64 hex)")
    verify.add_argument(
        "--model", help="a saved model, checkpoint or run: the store must hold its tables (same weights, same spec)"
    )
    verify.set_defaults(func=run_verify)
    inspect = sub.add_parser("inspect", help="print the header as JSON (a directory: its index and every header)")
    inspect.add_argument("path", help="a store directory or one layer file")
    inspect.set_defaults(func=run_inspect)
    build = sub.add_parser("build", help="export a saved model's Engram tables into a store directory")
    build.add_argument("checkpoint", help="a run directory (latest checkpoint), a checkpoint or a save_pretrained dir")
    build.add_argument("--out", required=True, help="store directory to write (layer files + store.json)")
    build.add_argument("--format", default="fp32", choices=["fp32", "bf16", "fp8"], help="row format")
    build.add_argument(
        "--tier",
        default=Tier.DIRECT.value,
        choices=Tier.names(),
        help=f"default tier recorded in store.json ({tier_help()}; mooncake: uploaded from the files when opened)",
    )
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=run_build)


def _store_dir(path: str) -> Path | None:
    """The store directory ``path`` names (the directory or its ``store.json``), or None for a layer file."""
    from engramlm.store.storedir import INDEX_NAME

    p = Path(path)
    if p.is_file() and p.name == INDEX_NAME:
        return p.parent
    return p if p.is_dir() else None


def _model_identity(model: str) -> tuple[str, str]:
    """(hash fingerprint, weights sha256) of the model at ``model``, its files verified first."""
    from engramlm.models.locate import locate_model

    files = locate_model(model)
    files.verify()
    return files.read_config().get("hash_fingerprint", "none"), files.weights_sha256()


def run_verify(args: argparse.Namespace) -> int:
    from engramlm.store.file import verify_store
    from engramlm.store.storedir import INDEX_NAME, check_model, read_index

    fingerprint, weights = args.fingerprint, None
    if args.model:
        model_fp, weights = _model_identity(args.model)
        if fingerprint is not None and fingerprint.lower() != model_fp:
            raise ConfigError(f"--fingerprint: {fingerprint} is not the hash spec of --model {args.model} ({model_fp})")
        fingerprint = model_fp
    directory = _store_dir(args.path)
    if directory is None:
        if weights is not None:
            raise ConfigError("--model: needs a store directory (its store.json records the model), not a layer file")
        h = verify_store(args.path, fingerprint)
        print(f"{args.path}: OK ({h.num_rows} rows x {h.dim}, {h.row_format}, {h.num_chunks} chunks)")
        return 0
    doc = read_index(directory)
    if fingerprint is not None and doc["fingerprint"] != fingerprint.lower():
        raise HashSpecMismatch(
            f"{directory / INDEX_NAME}: store was built under hash spec {doc['fingerprint']}, not {fingerprint}"
        )
    check_model(directory, doc, weights)
    for entry in doc["layers"]:
        h = verify_store(directory / entry["file"], doc["fingerprint"])
        if h.meta.get("model_sha256") != doc.get("model_sha256"):
            raise ForeignStoreError(f"{h.path}: built from other model weights than {directory / INDEX_NAME} says")
        print(f"{h.path}: OK ({h.num_rows} rows x {h.dim}, {h.row_format}, {h.num_chunks} chunks)")
    model = doc.get("model_sha256")
    bound = f", model weights sha256 {model[:16]}..." if model else ", no model recorded"
    print(f"{directory}: OK ({len(doc['layers'])} layer(s){bound})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from engramlm.store.file import read_header
    from engramlm.store.storedir import read_index

    directory = _store_dir(args.path)
    if directory is None:
        print(json.dumps(read_header(args.path).to_dict(), indent=2, sort_keys=True))
        return 0
    doc = read_index(directory)
    doc["headers"] = [read_header(directory / e["file"]).to_dict() for e in doc["layers"]]
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from engramlm.hashing.artifact import load_layout
    from engramlm.models.locate import locate_model
    from engramlm.store.safetensors_tables import open_safetensors_tables
    from engramlm.store.storedir import export_tables, resolve_format
    from engramlm.store.trainable import checkpoint_table_docs, open_checkpoint_tables

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out: {args.out} is a file; a store is a directory (layer files + store.json)")
    files = locate_model(args.checkpoint)
    files.verify()
    weights_sha256 = files.weights_sha256()
    model_dir = files.model_dir
    doc = files.read_config()
    if not doc["model"].get("engram"):
        raise ConfigError(f"{model_dir}: the model has no Engram layers, so there are no tables to export")
    layout = load_layout(model_dir / "engram_hash.safetensors")
    layout.check_fingerprint(doc.get("hash_fingerprint", "none"), what=f"model {model_dir}")
    expected_rows = {lid: layout.rows_of(lid) for lid in layout.layer_ids}
    head_sizes = {lid: layout.head_sizes(lid) for lid in layout.layer_ids}
    # a checkpoint of a run trained with engram.table_tier=ssd (one process, or one row range per rank)
    if checkpoint_table_docs(model_dir.parent):  # streamed from the SSD tables (base + dirty-row logs), never whole
        tables = open_checkpoint_tables(model_dir.parent, layout.fingerprint)
        bad = {lid: t.num_rows for lid, t in tables.items() if t.num_rows != expected_rows.get(lid)}
        if bad or set(tables) != set(expected_rows):
            for t in tables.values():
                t.close()
            raise CorruptFileError(f"{model_dir.parent}: SSD tables {bad or sorted(tables)} do not match the layout")
    else:
        tables = open_safetensors_tables(
            model_dir / "model.safetensors", layout.fingerprint, expected_rows=expected_rows
        )
    created = not Path(args.out).exists()
    try:
        index = export_tables(
            tables,
            args.out,
            resolve_format(args.format),
            layout.fingerprint,
            tier=args.tier,
            head_sizes=head_sizes,
            meta={"source": str(model_dir.resolve()), "hash_spec": layout.spec.to_dict()},
            progress=not args.no_progress,
            model_sha256=weights_sha256,
        )
    except BaseException:
        if created:  # a failed build (full disk, Ctrl-C) leaves no directory it made itself
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    finally:
        for t in tables.values():
            t.close()
    layers = json.loads(index.read_text(encoding="utf-8"))["layers"]
    total = sum(e["file_size"] for e in layers)
    print(f"{index}: {len(layers)} layer(s), {total / 2**20:.1f} MiB, format {resolve_format(args.format)}")
    return 0
