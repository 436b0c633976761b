"""Corpus sources and split rules: deterministic, by document, disjoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engramlm.data.corpora import SourceSpec, load_corpus, read_source
from engramlm.data.splits import hash_split, slice_budget, sotu_splits
from engramlm.errors import ConfigError, CorruptFileError


def test_hash_split_is_stable_and_roughly_80_10_10() -> None:
    ids = [f"pkg/mod{i}.py" for i in range(2000)]
    first = [hash_split(i) for i in ids]
    assert first == [hash_split(i) for i in ids]
    share = {s: first.count(s) / len(ids) for s in ("train", "val", "test")}
    assert 0.75 < share["train"] < 0.85 and 0.07 < share["val"] < 0.13
    assert 0.07 < share["test"] < 0.13


def test_sotu_rule_on_synthetic_names() -> None:
    names = [f"{1790 + k}_p_n.txt" for k in range(20)] + ["2000_a_d.txt", "2001_b_r.txt"]
    got = dict(zip(names, sotu_splits(names), strict=True))
    assert got["2000_a_d.txt"] == got["2001_b_r.txt"] == "val"
    assert got["1799_p_n.txt"] == got["1809_p_n.txt"] == "test"  # pre-2000 index 9 and 19
    assert sum(s == "test" for s in got.values()) == 2
    assert got["1790_p_n.txt"] == "train"


def test_slice_budget_keeps_each_split_and_whole_docs() -> None:
    sizes = [50, 500, 30, 30, 40, 1000]
    splits = ["train", "val", "train", "test", "train", "val"]
    # train share 80: 50 + 30 fit, 40 does not; val and test fit nothing -> first doc each.
    assert slice_budget(sizes, splits, max_bytes=100) == [True, True, True, True, False, False]


def test_slice_budget_fallback_and_fit() -> None:
    keep = slice_budget([50, 30, 40, 500, 30], ["train", "train", "train", "val", "test"], 100)
    assert keep == [True, True, False, True, True]


def _write_tree(root: Path) -> None:
    (root / "b" / "c").mkdir(parents=True)
    (root / "a.txt").write_text("alpha document\n")
    (root / "b" / "c" / "deep.txt").write_text("deep document\n")
    (root / "b" / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
    (root / "b" / "skip.md").write_text("not matched\n")
    (root / "b" / "empty.txt").write_text("  \n")
    (root / "b" / "dup.txt").write_text("alpha document\n")


def test_dir_source_recursive_sorted_replace(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    docs, *_ = read_source(SourceSpec("dir", str(tmp_path)))
    assert [d.id for d in docs] == ["a.txt", "b/bad.txt", "b/c/deep.txt", "b/dup.txt", "b/empty.txt"]
    assert "\ufffd" in docs[1].text
    corpus = load_corpus(SourceSpec("dir", str(tmp_path)))
    assert [d.id for d in corpus.documents] == ["a.txt", "b/bad.txt", "b/c/deep.txt"]
    assert corpus.dropped == {"empty": 1, "duplicate": 1, "slice": 0}
    md = read_source(SourceSpec("dir", str(tmp_path), glob="**/*.md"))[0]
    assert [d.id for d in md] == ["b/skip.md"]


def test_jsonl_source_fields_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [{"body": f"text {i}", "key": f"k{i:02d}"} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs, *_ = read_source(SourceSpec("jsonl", str(path), text_field="body"))
    assert [d.id for d in docs] == [f"line{i:08d}" for i in range(1, 6)]
    docs, *_ = read_source(SourceSpec("jsonl", str(path), text_field="body", id_field="key"))
    assert [d.text for d in docs] == [f"text {i}" for i in range(5)]
    with pytest.raises(ConfigError, match="body2"):
        read_source(SourceSpec("jsonl", str(path), text_field="body2"))
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorruptFileError, match=":2"):
        read_source(SourceSpec("jsonl", str(path)))


def test_stdlib_source_skips_tests() -> None:
    docs, _, _, info = read_source(SourceSpec("stdlib"))
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and "os.py" in ids and info["python_version"]
    for d in ids:
        parts = set(d.split("/"))
        assert not parts & {"test", "tests", "site-packages", "__pycache__"}
    gui = read_source(SourceSpec("stdlib", exclude_gui=True))[0]
    assert not any(d.id.startswith(("idlelib/", "tkinter/", "lib2to3/")) for d in gui)
    assert len(gui) < len(docs)


def test_bad_specs() -> None:
    with pytest.raises(ConfigError):
        SourceSpec("web")
    with pytest.raises(ConfigError):
        SourceSpec("dir")
