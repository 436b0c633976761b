"""The ``engramlm`` command line, run as a real subprocess (what users type)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from engramlm.hashing.batch import NgramHasher
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import make_layout
from engramlm.models.presets import get_preset


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engramlm", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_info_preset_accounting_json() -> None:
    res = _cli("info", "paper-27b")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["params"]["engram_tables"] == 5_792_338_560
    assert doc["engram"]["rows_per_layer"] == [36_199_972, 36_204_260]
    assert abs(doc["params"]["rho"] - 0.743) < 0.005


def test_info_config_file_and_bad_preset(tmp_path) -> None:
    cfg = get_preset("tiny").to_dict()
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cfg))
    ok = _cli("info", str(path))
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "tiny"
    bad = _cli("info", "nope")
    assert bad.returncode == 2 and "allowed" in bad.stderr and "tiny" in bad.stderr
    cfg["engram"]["hash"]["layer_ids"] = [9]
    path.write_text(json.dumps(cfg))
    res = _cli("info", str(path))
    assert res.returncode == 2 and "layer_ids" in res.stderr


def test_hash_command_matches_library(dsv4_cmap: CompressionMap, dsv4_tokenizer_path) -> None:
    from tokenizers import Tokenizer

    text = "Alexander the Great"
    res = _cli("hash", "--preset", "deepseek-v4.1", "--tokenizer", str(dsv4_tokenizer_path), "--text", text, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["compressed_vocab_size"] == 99_092
    layout = make_layout(get_preset("deepseek-v4.1").engram.hash, dsv4_cmap)
    ids = Tokenizer.from_file(str(dsv4_tokenizer_path)).encode(text, add_special_tokens=False).ids
    local = NgramHasher(layout)(torch.tensor([ids]), head_local=True)
    assert set(doc["layers"]) == {"1", "14"}
    for i, lid in enumerate(("1", "14")):
        layer = doc["layers"][lid]
        assert layer["row_ids"] == local[i, 0].tolist()
        assert len(layer["row_ids"]) == len(ids) and len(layer["row_ids"][0]) == 24
        assert np.array_equal(np.asarray(layer["table_sizes"]), layout.primes[i])
        assert layer["multipliers"] == layout.multipliers[i].tolist()
        assert all(m % 2 == 1 for m in layer["multipliers"])


def test_demo_main_job_runs(dsv4_tokenizer_path) -> None:
    res = _cli("demo", "--tokenizer", str(dsv4_tokenizer_path), "--seq-len", "64", "--batch-size", "1", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["compression"]["compressed_vocab_size"] == 99_092
    layer = doc["engram"]["1"]
    assert 0 < layer["unique_rows"] <= layer["row_lookups"] == 64 * 8
    assert all(0.0 < g < 1.0 for g in layer["gate_mean_per_branch"])
    assert abs(doc["loss_at_init"] - doc["uniform_loss"]) < 1.0  # an untrained model is near uniform
