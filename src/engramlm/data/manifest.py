"""The build manifest: provenance and checksums of a prepared corpus, read back before any use.

It pins what data.md §0 requires (package versions, file list, split rule, sha256 of every built
array and of the tokenizer) so A/B arms can prove they ran on the same build, and carries the
content hash that lets ``prepare`` skip an identical rebuild. It holds no timestamps or temp
paths, so two builds of the same inputs write byte-identical manifests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlm.data.splits import SPLITS
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.utils.io import atomic_write_json, sha256_bytes

FORMAT = "engramlm-data/1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class SplitInfo:
    """Counts of one split and its arrays (``role -> {"file", "sha256"}``)."""

    documents: int
    tokens: int
    bytes: int
    files: dict[str, dict[str, str]]


@dataclass
class Manifest:
    """Everything needed to trust, reuse, or reproduce one prepared corpus directory."""

    content_hash: str
    source: dict[str, Any]
    versions: dict[str, str]
    options: dict[str, Any]
    split_rule: str
    tokenizer: dict[str, Any]
    token_dtype: str
    splits: dict[str, SplitInfo]
    documents: list[dict[str, Any]]
    dropped: dict[str, int]
    format: str = FORMAT
    reused: bool = field(default=False, compare=False)  # set by prepare; never written

    def to_dict(self) -> dict[str, Any]:
        """JSON form (without the runtime-only ``reused`` flag)."""
        d = dataclasses.asdict(self)
        d.pop("reused")
        return d

    def digest(self) -> str:
        """sha256 of the canonical JSON: equal builds have equal digests."""
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True).encode("utf-8"))

    def save(self, out_dir: str | os.PathLike[str]) -> None:
        """Write ``manifest.json`` atomically."""
        atomic_write_json(Path(out_dir) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        """Parse, refusing other formats or missing fields with a message that names them."""
        if not isinstance(d, dict):
            raise CorruptFileError(f"{where}: not a JSON object")
        if d.get("format") != FORMAT:
            raise CorruptFileError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"reused"}
        missing = sorted(names - d.keys())
        if missing:
            raise CorruptFileError(f"{where}: missing fields {missing}")
        try:
            splits = {k: SplitInfo(**v) for k, v in d["splits"].items()}
        except TypeError as exc:
            raise CorruptFileError(f"{where}: bad 'splits' entry ({exc})") from exc
        if set(splits) != set(SPLITS):
            raise CorruptFileError(f"{where}: splits {sorted(splits)} != {sorted(SPLITS)}")
        return cls(**{k: d[k] for k in names if k != "splits"}, splits=splits)

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> Manifest:
        """Read ``manifest.json``: missing -> ConfigError, unreadable -> CorruptFileError."""
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ConfigError(f"{out_dir}: no {MANIFEST_NAME}; build it with `engramlm data prepare --out {out_dir}`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(d, where=str(path))
