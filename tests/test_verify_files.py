"""Every file is verified before it is used: saved models (checksums.json) by every command, store rows by
every tier (per-page CRC32 on mmap/direct reads, chunk CRC32s at memory-tier open), and a store is bound to
the model weights it was built from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from engramlm.cli.main import main
from engramlm.data import prepare
from engramlm.errors import CorruptFileError, CorruptModelFileError, ForeignStoreError
from engramlm.hashing.spec import HashSpec
from engramlm.infer.tables import open_tables
from engramlm.models.build import build_model
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import CHECKSUMS, save_pretrained
from engramlm.models.locate import load_trained_model, locate_model
from engramlm.store.file import PAGE, StoreHeader, read_header, verify_store, write_store
from engramlm.store.mmap import MmapTable
from engramlm.store.storedir import open_store_dir, read_index

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
TIERS = ("memory", "mmap", "direct")


def _config() -> ModelConfig:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(1009, 1013), layer_ids=(1,), pad_id=2)
    return ModelConfig(
        vocab_size=300, hidden_size=32, num_layers=2, n_heads=2, mlp_hidden=48, hc_mult=2, max_seq_len=128,
        engram=EngramConfig(hash=spec, head_dim=16, conv_zero_init=False),
    )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    data = root / "data"
    prepare("stdlib", data, 300, max_bytes=30_000, progress=False)
    for name, seed in (("model", 0), ("other", 1)):
        torch.manual_seed(seed)
        save_pretrained(build_model(_config(), data / "tokenizer.json"), root / name)
    assert main(["store", "build", str(root / "model"), "--out", str(root / "store"), "--no-progress"]) == 0
    return {"root": root, "data": data, "model": root / "model", "other": root / "other", "store": root / "store"}


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engramlm", *argv], capture_output=True, text=True, env=env, timeout=300
    )


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------ saved models


def test_save_pretrained_records_digests_and_old_models_load_with_a_warning(env: dict[str, Path], tmp_path: Path):
    doc = json.loads((env["model"] / CHECKSUMS).read_text())
    assert set(doc["files"]) == {"config.json", "engram_hash.safetensors", "model.safetensors"}
    assert locate_model(env["model"]).weights_sha256() == doc["files"]["model.safetensors"]
    old = tmp_path / "old"
    shutil.copytree(env["model"], old)
    (old / CHECKSUMS).unlink()
    with pytest.warns(RuntimeWarning, match="no checksums.json"):
        load_trained_model(old)


def test_every_command_refuses_a_saved_model_with_one_flipped_byte(env: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(env["model"], bad)
    weights = bad / "model.safetensors"
    _flip(weights, weights.stat().st_size - 7)  # tensor bytes: safetensors itself would load them
    with pytest.raises(CorruptModelFileError, match=r"model\.safetensors: sha256 does not match"):
        load_trained_model(bad)
    tok = str(env["data"] / "tokenizer.json")
    commands = {
        "generate": ["generate", str(bad), "--prompt", "def f", "--max-new-tokens", "2", "--tokenizer", tok],
        "eval": ["eval", str(bad), "--data", str(env["data"]), "--max-batches", "1"],
        "analyze": ["analyze", "gates", str(bad), "--text", "def f(x):", "--data", str(env["data"]),
                    "--out", str(tmp_path / "an")],
        "store build": ["store", "build", str(bad), "--out", str(tmp_path / "st"), "--no-progress"],
        "store verify --model": ["store", "verify", str(env["store"]), "--model", str(bad)],
    }  # fmt: skip
    for what, argv in commands.items():
        r = _cli(*argv)
        assert r.returncode != 0, what
        assert "Traceback" not in r.stderr, (what, r.stderr)
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and f"{weights}: sha256 does not match" in errors[0], (what, r.stderr)
    assert not (tmp_path / "st" / "store.json").exists()


# ------------------------------------------------------------------------------------ store rows


def _damaged_store(env: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, int]:
    store = tmp_path / "store"
    shutil.copytree(env["store"], store)
    path = store / read_index(store)["layers"][0]["file"]
    h = read_header(path)
    page = h.num_pages // 2
    _flip(path, h.data_offset + page * PAGE + 100)
    return store, path, page


@pytest.mark.parametrize("tier", TIERS)
def test_every_tier_refuses_a_flipped_row_byte(env: dict[str, Path], tmp_path: Path, tier: str) -> None:
    store, path, page = _damaged_store(env, tmp_path)
    h = read_header(path)
    all_rows = torch.arange(h.num_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # direct on tmpfs falls back to buffered reads
        if tier == "memory":  # reads the whole file at open, so it checks it all there
            with pytest.raises(CorruptFileError, match=rf"{path.name}.*checksum mismatch in 1 chunk\(s\): chunk 0"):
                open_store_dir(store, tier)
        else:
            tables = open_store_dir(store, tier)
            clean = torch.arange(0, page * PAGE // h.row_bytes - 1)  # rows on pages before the damaged one
            assert tables[1].gather(clean).shape == (clean.numel(), h.dim)
            if tier == "mmap":  # checked once, on first read
                assert tables[1].pages_checked == page
            with pytest.raises(CorruptFileError, match=rf"{path.name}.*block \(page\) {page} .*rows"):
                tables[1].gather(all_rows)
            for t in tables.values():
                t.close()
        # verify=False serves the damaged rows: the check is what refuses them
        tables = open_store_dir(store, tier, verify=False)
        assert torch.isfinite(tables[1].gather(all_rows)).any()
        for t in tables.values():
            t.close()
    with pytest.raises(CorruptFileError, match=rf"{path.name}.*checksum mismatch"):
        verify_store(path)


@pytest.mark.parametrize("tier", TIERS)
def test_every_tier_refuses_a_truncated_file(env: dict[str, Path], tmp_path: Path, tier: str) -> None:
    store = tmp_path / "store"
    shutil.copytree(env["store"], store)
    path = store / read_index(store)["layers"][0]["file"]
    os.truncate(path, path.stat().st_size - PAGE)
    with pytest.raises(CorruptFileError, match=rf"{path.name}.*truncated"):
        open_store_dir(store, tier)


def _as_v1(src: Path, dst: Path) -> StoreHeader:
    """Rewrite a v2 store file in the v1 layout (no padding, no page table), as older builds wrote it."""
    h = read_header(src)
    raw = src.read_bytes()
    rows = raw[h.data_offset : h.data_offset + h.data_bytes]
    trailer = raw[h.crc_offset : h.crc_offset + 4 * h.num_chunks]
    meta = raw[512 : 512 + h.meta_len]
    v1 = StoreHeader(**{**h.__dict__, "version": 1, "crc_offset": h.data_offset + h.data_bytes,
                        "page_crc_offset": 0, "num_pages": 0, "page_table_crc": 0})  # fmt: skip
    head = v1._pack()
    dst.write_bytes(head + bytes(512 - len(head)) + meta + bytes(h.data_offset - 512 - h.meta_len) + rows + trailer)
    return v1


def test_v1_files_are_verified_whole_at_open_with_a_warning(tmp_path: Path) -> None:
    fp = "ab" * 32
    table = torch.randn(300, 64)
    write_store(tmp_path / "v2.engst", table, "fp32", fp)
    v1 = _as_v1(tmp_path / "v2.engst", tmp_path / "v1.engst")
    assert read_header(tmp_path / "v1.engst").version == 1 and verify_store(tmp_path / "v1.engst").num_pages == 0
    with pytest.warns(RuntimeWarning, match="v1 has no per-page checksums"), MmapTable(tmp_path / "v1.engst") as t:
        assert torch.equal(t.gather(torch.arange(300)), table)
    _flip(tmp_path / "v1.engst", v1.data_offset + 5000)
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptFileError, match="chunk 0"):
        MmapTable(tmp_path / "v1.engst")


# ------------------------------------------------------------------------------------ store <-> model


def test_a_store_is_bound_to_the_model_it_was_built_from(env: dict[str, Path], tmp_path: Path) -> None:
    index = read_index(env["store"])
    mine, theirs = locate_model(env["model"]).weights_sha256(), locate_model(env["other"]).weights_sha256()
    assert index["model_sha256"] == mine != theirs
    model = load_trained_model(env["model"]).model
    for t in open_tables(env["store"], "mmap", fingerprint=model.layout.fingerprint, model_sha256=mine).values():
        t.close()
    with pytest.raises(ForeignStoreError, match="built from model weights sha256"):
        open_tables(env["store"], "mmap", fingerprint=model.layout.fingerprint, model_sha256=theirs)
    # A layer file copied in from another model's store is refused too.
    assert main(["store", "build", str(env["other"]), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(env["store"], mixed)
    name = index["layers"][0]["file"]
    shutil.copyfile(tmp_path / "o" / name, mixed / name)
    with pytest.raises(ForeignStoreError, match=name):
        open_store_dir(mixed)
    # generate with another model's store: one error line, no traceback
    tok = str(env["data"] / "tokenizer.json")
    r = _cli("generate", str(env["other"]), "--prompt", "def", "--max-new-tokens", "2", "--tokenizer", tok,
             "--store", str(env["store"]))  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "store was built from model weights sha256" in r.stderr.strip().splitlines()[-1]


def test_store_verify_and_inspect_take_the_build_output_directory(env: dict[str, Path], tmp_path: Path) -> None:
    r = _cli("store", "verify", str(env["store"]), "--model", str(env["model"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith(f"{env['store']}: OK (1 layer(s), model weights sha256")
    r = _cli("store", "verify", str(env["store"]), "--model", str(env["other"]))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "store was built from model weights" in r.stderr
    r = _cli("store", "inspect", str(env["store"] / "store.json"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model_sha256"] and [h["version"] for h in doc["headers"]] == [2]
    store, path, _ = _damaged_store(env, tmp_path)
    r = _cli("store", "verify", str(store))
    assert r.returncode != 0 and "Traceback" not in r.stderr and path.name in r.stderr and "chunk" in r.stderr
