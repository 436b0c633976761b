"""prepare(): stdlib tiny slice end to end, determinism, reuse, corruption, jsonl/dir, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from engramlm.cli import data_cmd
from engramlm.data import SourceSpec, TokenDataset, load_corpus, load_tokenizer, prepare
from engramlm.data.manifest import Manifest
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.utils.io import sha256_file

TINY = 200_000
VOCAB = 512


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stdlib") / "prep"
    prepare("stdlib", out, VOCAB, max_bytes=TINY, progress=False)
    return out


def test_tokenizer_specials_and_manifest(built: Path) -> None:
    m = Manifest.load(built)
    tok = load_tokenizer(built / "tokenizer.json")
    assert [tok.id_to_token(i) for i in range(3)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
    assert m.tokenizer["sha256"] == sha256_file(built / "tokenizer.json")
    assert m.tokenizer["vocab_size"] == tok.get_vocab_size() == VOCAB
    assert m.token_dtype == "uint16" and m.versions["python"] and m.versions["tokenizers"]
    assert 0.8 * TINY < sum(s.bytes for s in m.splits.values()) <= TINY * 1.05
    for split, info in m.splits.items():
        assert info.documents > 0, split
        for entry in info.files.values():
            assert sha256_file(built / entry["file"]) == entry["sha256"]


def test_splits_disjoint_by_document_and_shards_decode(built: Path) -> None:
    m = Manifest.load(built)
    by_split: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for doc in m.documents:
        by_split[doc["split"]].add(doc["id"])
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    corpus = load_corpus(SourceSpec("stdlib"), TINY)
    tok = load_tokenizer(built / "tokenizer.json")
    for split in ("train", "val"):
        ds = TokenDataset(built, split)
        texts = corpus.texts(split)
        assert ds.n_documents == len(texts)
        ends = [*ds.doc_offsets[1:].tolist(), ds.n_tokens]
        for k in (0, len(texts) - 1):
            ids = np.asarray(ds.tokens[ds.doc_offsets[k] : ends[k]]).tolist()
            assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:] and 1 not in ids[:-1]
            assert tok.decode(ids[1:-1], skip_special_tokens=False) == texts[k]
        assert int(ds.token_bytes[np.asarray(ds.tokens)].sum()) == ds.n_bytes


def test_rebuild_is_deterministic_and_rerun_reuses(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = prepare("stdlib", tmp_path / "b", VOCAB, max_bytes=TINY, progress=False)
    first = Manifest.load(built)
    assert again.digest() == first.digest() and not again.reused
    assert sha256_file(tmp_path / "b" / "manifest.json") == sha256_file(built / "manifest.json")
    capsys.readouterr()
    reused = prepare("stdlib", built, VOCAB, max_bytes=TINY, progress=False)
    assert reused.reused and "up to date" in capsys.readouterr().out
    other = prepare("stdlib", tmp_path / "b", VOCAB, max_bytes=TINY // 2, progress=False)
    assert not other.reused and other.content_hash != first.content_hash


def test_corruption_is_refused_and_rebuilt(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    prepare("stdlib", out, VOCAB, max_bytes=TINY // 4, progress=False)
    shard = out / "train.tokens.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="sha256"):
        TokenDataset(out, "train")
    shard.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CorruptFileError, match=r"train\.tokens"):
        TokenDataset(out, "train", verify=False)
    assert not prepare("stdlib", out, VOCAB, max_bytes=TINY // 4, progress=False).reused
    TokenDataset(out, "train")
    (out / "val.doc_offsets.npy").unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        TokenDataset(out, "val")
    (out / "manifest.json").write_text("{ torn")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        TokenDataset(out, "test")
    (out / "manifest.json").write_text(json.dumps({"format": "engramlm-data/1"}))
    with pytest.raises(CorruptFileError, match="missing fields"):
        Manifest.load(out)
    with pytest.raises(ConfigError, match="data prepare"):
        TokenDataset(tmp_path / "nowhere", "train")
    with pytest.raises(ConfigError, match="split"):
        TokenDataset(built, "dev")


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a prepared"):
        prepare("stdlib", tmp_path, VOCAB, max_bytes=10_000, progress=False)
    assert (tmp_path / "mine.txt").exists()


def _jsonl(path: Path, n: int = 60) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(40 + i))
            f.write(json.dumps({"id": f"doc{i:03d}", "content": text}) + "\n")
    return path


def test_jsonl_and_dir_sources(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "c.jsonl")
    spec = SourceSpec("jsonl", str(src), text_field="content", id_field="id")
    m = prepare(spec, tmp_path / "j", 300, progress=False)
    assert sum(s.documents for s in m.splits.values()) == 60
    assert {d["id"] for d in m.documents} == {f"doc{i:03d}" for i in range(60)}
    assert m.source["file_sha256"] == sha256_file(src)
    root = tmp_path / "tree"
    (root / "x").mkdir(parents=True)
    for i in range(30):
        (root / "x" / f"f{i:02d}.txt").write_text(f"file {i} " + "lorem ipsum dolor " * (i + 3))
    m = prepare(SourceSpec("dir", str(root)), tmp_path / "d", 300, progress=False)
    assert sorted(d["id"] for d in m.documents) == [f"x/f{i:02d}.txt" for i in range(30)]
    assert m.split_rule.startswith("sha256")


def test_cli_prepare_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    data_cmd.register(parser.add_subparsers())
    src = _jsonl(tmp_path / "c.jsonl", 20)
    argv = [
        "data",
        "prepare",
        "--source",
        "jsonl",
        "--path",
        str(src),
        "--text-field",
        "content",
        "--out",
        str(tmp_path / "o"),
        "--vocab-size",
        "300",
        "--no-progress",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["up_to_date"] is False and out["vocab_size"] <= 300
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert '"up_to_date": true' in capsys.readouterr().out
