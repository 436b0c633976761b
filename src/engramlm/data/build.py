"""``prepare``: source -> tokenizer -> token shards -> manifest, atomically and only when needed.

The output is built in a temp directory beside ``out_dir`` and renamed into place, so readers
see the old build or the new one, never a half-written one. A content hash over the documents
(id, split, raw sha256) and every option that changes the output decides whether an existing
build can be reused as is.

``prepare`` holds an exclusive lock on the sibling ``.NAME.lock`` (``utils.lock``; a second prepare
of the same output waits for the first, then finds it up to date). Under that lock the siblings
``.NAME.build-*`` / ``.NAME.old-*`` can only be leftovers of a killed prepare, and are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from engramlm.data import shards
from engramlm.data.corpora import Corpus, SourceSpec, load_corpus
from engramlm.data.dataset import TokenDataset
from engramlm.data.manifest import FORMAT, MANIFEST_NAME, Manifest, SplitInfo
from engramlm.data.splits import SPLITS
from engramlm.data.tokenizer import (
    BOS_ID,
    DEFAULT_VOCAB_SIZE,
    EOS_ID,
    MIN_FREQUENCY,
    PAD_ID,
    save_tokenizer,
    token_byte_lengths,
    train_tokenizer,
)
from engramlm.errors import ConfigError, CorruptFileError, EngramError
from engramlm.utils.io import make_temp_dir
from engramlm.utils.lock import DirLock

TOKENIZER_NAME = "tokenizer.json"
TOKEN_BYTES_NAME = "token_bytes.npy"
LAYOUT = "per document: [BOS] tokens [EOS], documents packed in id order"


def parse_source(text: str) -> SourceSpec:
    """``"stdlib"``, ``"sotu"``, ``"dir:PATH"`` or ``"jsonl:PATH"`` -> :class:`SourceSpec`."""
    kind, _, path = text.partition(":")
    return SourceSpec(kind=kind, path=path or None)


def _versions(corpus: Corpus) -> dict[str, str]:
    v = {"tokenizers": tokenizers.__version__, "numpy": np.__version__, "python": platform.python_version()}
    if "sotu_version" in corpus.info:
        v["sotu"] = str(corpus.info["sotu_version"])
    return v


def content_hash(corpus: Corpus, spec: SourceSpec, options: dict[str, Any]) -> str:
    """Hash of everything the output depends on; equal hashes mean an identical build."""
    h = hashlib.sha256()
    head = {
        "format": FORMAT,
        "layout": LAYOUT,
        "source": spec.options(),
        "options": options,
        "tokenizers": tokenizers.__version__,
        "split_rule": corpus.split_rule,
    }
    h.update(json.dumps(head, sort_keys=True).encode("utf-8"))
    for doc, split in zip(corpus.documents, corpus.splits, strict=True):
        h.update(f"\n{doc.id}\0{split}\0{doc.sha256}".encode())
    return h.hexdigest()


def _reusable(out: Path, chash: str) -> Manifest | None:
    try:
        manifest = Manifest.load(out)
        if manifest.content_hash != chash:
            return None
        for split in SPLITS:
            TokenDataset(out, split)  # verifies every array's checksum and shape
    except EngramError:
        return None
    return manifest


def _build(
    corpus: Corpus, spec: SourceSpec, options: dict[str, Any], chash: str, tmp: Path, progress: bool
) -> Manifest:
    vocab_size, min_freq = options["vocab_size"], options["min_frequency"]
    if not corpus.texts("train"):
        raise ConfigError("the train split is empty; the tokenizer trains on train only")
    tok = train_tokenizer(corpus.texts("train"), vocab_size, min_freq)
    tok_sha = save_tokenizer(tok, tmp / TOKENIZER_NAME)
    actual_vocab = tok.get_vocab_size(with_added_tokens=True)
    token_bytes = token_byte_lengths(tok)
    tb_sha = shards.save_array(tmp / TOKEN_BYTES_NAME, token_bytes)
    split_infos: dict[str, SplitInfo] = {}
    for split in SPLITS:
        texts = corpus.texts(split)
        tokens, offsets = shards.encode_documents(tok, texts, actual_vocab, progress=progress, desc=f"tokenize {split}")
        doc_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
        counted = int(np.bincount(tokens, minlength=actual_vocab) @ token_bytes)
        if counted != int(doc_bytes.sum()):  # byte-level BPE must be lossless
            raise CorruptFileError(
                f"{split}: tokens cover {counted} bytes, text has {int(doc_bytes.sum())}; tokenizer is not byte-exact"
            )
        files = shards.write_split(tmp, split, tokens, offsets, doc_bytes)
        split_infos[split] = SplitInfo(len(texts), int(tokens.size), int(doc_bytes.sum()), files)
    documents = [
        {"id": d.id, "split": s, "sha256": d.sha256, "bytes": len(d.text.encode("utf-8"))}
        for d, s in zip(corpus.documents, corpus.splits, strict=True)
    ]
    manifest = Manifest(
        content_hash=chash,
        source=corpus.info,
        versions=_versions(corpus),
        options={**options, "layout": LAYOUT},
        split_rule=corpus.split_rule,
        tokenizer={
            "file": TOKENIZER_NAME,
            "sha256": tok_sha,
            "vocab_size": actual_vocab,
            "requested_vocab_size": vocab_size,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "pad_id": PAD_ID,
            "token_bytes": {"file": TOKEN_BYTES_NAME, "sha256": tb_sha},
        },
        token_dtype=shards.token_dtype(actual_vocab).name,
        splits=split_infos,
        documents=documents,
        dropped=corpus.dropped,
    )
    manifest.save(tmp)
    return manifest


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished build onto ``out``; an old build is moved aside first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / "build")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _remove_orphans(out: Path, log: Callable[[str], None]) -> None:
    """Delete ``.NAME.build-*`` / ``.NAME.old-*`` temp dirs of an interrupted prepare (caller holds the lock)."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(build|old)-[a-z0-9_]{8}$")
    for p in sorted(out.parent.iterdir()):
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            log(f"removed {p} (left by an interrupted data prepare)")


def prepare(
    source: SourceSpec | str,
    out_dir: str | os.PathLike[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    max_bytes: int | None = None,
    min_frequency: int = MIN_FREQUENCY,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Build (or reuse) a prepared corpus in ``out_dir`` and return its manifest.

    ``workers`` sets ``RAYON_NUM_THREADS`` for the tokenizers thread pool; it only takes effect
    if no parallel tokenizers call has run yet in this process.
    """
    spec = parse_source(source) if isinstance(source, str) else source
    if vocab_size < 256 + 3:
        raise ConfigError(f"vocab_size must be >= 259 (bytes + specials), got {vocab_size}")
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = DirLock(out.parent / f".{out.name}.lock", f"data directory {out}", wait=True, on_wait=log)
    except OSError:  # a read-only parent (a shared, already prepared corpus): nothing to clean, and a
        lock = None  # rebuild would fail at its first write with the real error
    try:
        if lock is not None:
            _remove_orphans(out, log)
        return _prepare_locked(spec, out, vocab_size, max_bytes, min_frequency, progress, force, log)
    finally:
        if lock is not None:
            lock.release()


def _prepare_locked(
    spec: SourceSpec,
    out: Path,
    vocab_size: int,
    max_bytes: int | None,
    min_frequency: int,
    progress: bool,
    force: bool,
    log: Callable[[str], None],
) -> Manifest:
    corpus = load_corpus(spec, max_bytes)
    options = {"vocab_size": vocab_size, "min_frequency": min_frequency, "max_bytes": max_bytes}
    chash = content_hash(corpus, spec, options)
    if not force and (found := _reusable(out, chash)) is not None:
        log(f"up to date: {out} (content hash {chash[:12]})")
        found.reused = True
        return found
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise ConfigError(f"{out} exists and is not a prepared data directory; refusing to replace")
    tmp = make_temp_dir(out.parent, f".{out.name}.build-")  # published whole: 0777 less the umask, files 0666 less it
    try:
        manifest = _build(corpus, spec, options, chash, tmp, progress)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def summary(manifest: Manifest, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Short JSON-able description of a build, for logs and the CLI."""
    return {
        "out": str(out_dir),
        "up_to_date": manifest.reused,
        "content_hash": manifest.content_hash,
        "source": manifest.source.get("kind"),
        "vocab_size": manifest.tokenizer["vocab_size"],
        "tokenizer_sha256": manifest.tokenizer["sha256"],
        "token_dtype": manifest.token_dtype,
        "splits": {
            s: {"documents": i.documents, "tokens": i.tokens, "bytes": i.bytes} for s, i in manifest.splits.items()
        },
        "dropped": manifest.dropped,
    }


__all__ = ["LAYOUT", "content_hash", "parse_source", "prepare", "summary"]
