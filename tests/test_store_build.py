"""``engramlm store build`` from a saved model, and ``open_store_dir`` on every file tier."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from engramlm.cli.main import main
from engramlm.errors import ConfigError, CorruptFileError, HashSpecMismatch
from engramlm.hashing.spec import HashSpec
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import save_pretrained
from engramlm.models.model import EngramLM
from engramlm.store.cache import CachedTable
from engramlm.store.file import verify_store
from engramlm.store.formats import get_format
from engramlm.store.prefetch import Prefetcher
from engramlm.store.storedir import open_store_dir, read_index
from helpers import tiny_lm

V = 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[EngramLM, Path]:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(97, 97), layer_ids=(0, 2))
    cfg = ModelConfig(
        vocab_size=V, hidden_size=16, num_layers=3, n_heads=2, mlp_hidden=24, hc_mult=2, max_seq_len=64,
        engram=EngramConfig(hash=spec, head_dim=32),
    )  # fmt: skip
    model = tiny_lm(cfg)
    return model, save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "model")


def _build(ckpt: Path, out: Path, fmt: str, *extra: str) -> int:
    return main(["store", "build", str(ckpt), "--out", str(out), "--format", fmt, "--no-progress", *extra])


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp8"])
def test_build_roundtrip_every_tier(saved: tuple[EngramLM, Path], tmp_path: Path, fmt: str) -> None:
    model, ckpt = saved
    out = tmp_path / "store"
    assert _build(ckpt, out, fmt) == 0
    doc = read_index(out)
    name = {"fp8": "fp8_e4m3_ue8m0"}.get(fmt, fmt)
    assert doc["fingerprint"] == model.layout.fingerprint and doc["row_format"] == name
    assert [e["layer_id"] for e in doc["layers"]] == [0, 2]
    layout = model.layout
    for i, entry in enumerate(doc["layers"]):
        assert entry["head_sizes"] == layout.primes[i].reshape(-1).tolist()
        h = verify_store(out / entry["file"], layout.fingerprint)
        assert (h.num_rows, h.dim, h.row_format) == (int(layout.table_rows[i]), 32, name)
        assert h.meta["layer_id"] == entry["layer_id"] and h.meta["hash_spec"]["layer_ids"] == [0, 2]
    fmt_obj = get_format(name)
    g = torch.Generator().manual_seed(3)
    for tier in ("memory", "mmap", "direct"):
        for cache in (0, 4096):
            tables = open_store_dir(out, tier=tier, cache_bytes=cache, expected_fingerprint=layout.fingerprint)
            for layer, table in tables.items():
                assert isinstance(table, CachedTable) == bool(cache)
                w = model.engram_layers[layer].embed.weight.detach()
                want = fmt_obj.decode(fmt_obj.encode(w))  # exactly what the format keeps
                ids = torch.randint(0, w.shape[0], (2, 7, 6), generator=g)
                assert torch.equal(table.gather(ids), want[ids]), (tier, cache, layer)
                table.close()


def test_prefetch_from_store_dir_feeds_the_model(saved: tuple[EngramLM, Path], tmp_path: Path) -> None:
    """Rows fetched from the built store give the same logits as the model's own tables."""
    model, ckpt = saved
    assert _build(ckpt, tmp_path / "s", "fp32", "--tier", "mmap") == 0
    tables = open_store_dir(tmp_path / "s", cache_bytes=8192)
    assert read_index(tmp_path / "s")["tier"] == "mmap"
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    row_ids = model.hasher(x)
    with Prefetcher(tables, workers=2) as pf, torch.no_grad():
        handle = pf.start({lid: row_ids[i] for i, lid in enumerate(model.layout.layer_ids)})
        got = model(x, engram=model.engram_inputs(x, rows=handle))
        want = model(x)
    got_logits = got.logits if hasattr(got, "logits") else got
    want_logits = want.logits if hasattr(want, "logits") else want
    assert torch.equal(got_logits, want_logits)
    assert set(handle.wait_seconds) == {0, 2}


def test_refusals(saved: tuple[EngramLM, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, ckpt = saved
    out = tmp_path / "s"
    assert _build(ckpt, out, "bf16") == 0
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(HashSpecMismatch, match=other):
        open_store_dir(out, expected_fingerprint=other)
    with pytest.raises(ConfigError, match=r"tier: must be one of \['memory', 'mmap', 'direct', 'mooncake'\]"):
        open_store_dir(out, tier="ssd")
    with pytest.raises(ConfigError, match="needs a set-up MooncakeDistributedStore"):
        open_store_dir(out, tier="mooncake")
    with pytest.raises(CorruptFileError, match=r"no store\.json"):
        open_store_dir(tmp_path)
    # A damaged layer file is refused at open, naming the file.
    entry = read_index(out)["layers"][1]
    path = out / entry["file"]
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(CorruptFileError, match=rf"{entry['file']}.*truncated"):
        open_store_dir(out, tier="mmap")
    # fp8 needs dim % 32 == 0; a non-engram or missing checkpoint is a clean CLI error.
    (tmp_path / "empty").mkdir()
    assert main(["store", "build", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["hash_fingerprint"] == model.layout.fingerprint
