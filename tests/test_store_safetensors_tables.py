"""DeepSeek-V4.1 checkpoint tensors served in place from safetensors (split fp8 and dense)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engramlm.errors import CorruptFileError
from engramlm.store.formats import FP8, decode_split
from engramlm.store.memory import MemoryTable
from engramlm.store.safetensors_tables import SafetensorsTable, open_safetensors_tables, read_safetensors_header

FP = hashlib.sha256(b"v41-spec").hexdigest()
DIM = 256  # the V4.1 head dim: 256 e4m3 values + 8 ue8m0 scales per row
ROWS = {1: 1201, 14: 977}


def _split(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(layer)
    rows = torch.randn(ROWS[layer], DIM, generator=g) * torch.logspace(-3, 2, ROWS[layer])[:, None]
    return FP8.quantize(rows)


def _v41_tensors(layer: int) -> dict[str, torch.Tensor]:
    weight, scale = _split(layer)
    return {
        f"layers.{layer}.engram.embed.weight": weight,
        f"layers.{layer}.engram.embed.scale": scale,
        f"layers.{layer}.engram.q_weight": torch.ones(4, 64, dtype=torch.bfloat16),
    }


def _ids(n: int, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, rows, (n,), generator=g), torch.tensor([0, rows - 1, 0])])


def test_v41_layout_file_header_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "model-00048-of-00048.safetensors"
    save_file(_v41_tensors(1), str(path))
    locs = read_safetensors_header(path)
    w, s = locs["layers.1.engram.embed.weight"], locs["layers.1.engram.embed.scale"]
    assert (w.dtype, w.shape, s.dtype, s.shape) == ("F8_E4M3", (ROWS[1], 256), "F8_E8M0", (ROWS[1], 8))
    # 264 bytes per row in total, in the spec's split form
    assert w.nbytes // ROWS[1] + s.nbytes // ROWS[1] == 264


def test_split_fp8_rows_in_place(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_v41_tensors(1), str(path))
    weight, scale = _split(1)
    table = SafetensorsTable(path, 1, FP, expected_rows=ROWS[1])
    assert (table.num_rows, table.dim, table.row_bytes, table.row_format.name) == (ROWS[1], 256, 264, "fp8_e4m3_ue8m0")
    assert isinstance(table._weight, np.memmap) and isinstance(table._scale, np.memmap)  # mapped, not loaded
    ids = _ids(500, ROWS[1])
    want = decode_split(weight[ids], scale[ids])
    assert torch.equal(table.gather(ids), want)
    assert torch.equal(table.gather(ids), MemoryTable.from_split(weight, scale, FP).gather(ids))
    grid = ids[:48].reshape(2, 4, 6)
    assert torch.equal(table.gather(grid), want[:48].reshape(2, 4, 6, 256))
    # Only the touched pages count as read, far less than the 317 KB weight tensor.
    table.stats.reset()
    table.gather(torch.tensor([5, 6]))
    assert 0 < table.stats.bytes_read <= 3 * 4096 < ROWS[1] * 264
    # Sequential export reads the same values.
    assert torch.equal(table.read_block(10, 20), decode_split(weight[10:20], scale[10:20]))
    assert torch.equal(table.read_raw_block(0, 3), FP8.encode(table.read_block(0, 3)))
    table.close()


def test_sharded_directory_with_index(tmp_path: Path) -> None:
    """Weight and scale in different shards, located through model.safetensors.index.json."""
    t1, t14 = _v41_tensors(1), _v41_tensors(14)
    shard_a = {k: v for k, v in {**t1, **t14}.items() if k.endswith("embed.weight")}
    shard_b = {k: v for k, v in {**t1, **t14}.items() if not k.endswith("embed.weight")}
    save_file(shard_a, str(tmp_path / "model-00047-of-00048.safetensors"))
    save_file(shard_b, str(tmp_path / "model-00048-of-00048.safetensors"))
    (tmp_path / "unrelated.safetensors").write_bytes(b"garbage, not listed in the index")
    weight_map = {k: "model-00047-of-00048.safetensors" for k in shard_a}
    weight_map.update({k: "model-00048-of-00048.safetensors" for k in shard_b})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    tables = open_safetensors_tables(tmp_path, FP, expected_rows=ROWS)
    assert sorted(tables) == [1, 14]
    for layer, table in tables.items():
        weight, scale = _split(layer)
        ids = _ids(300, ROWS[layer], seed=layer)
        assert torch.equal(table.gather(ids), decode_split(weight[ids], scale[ids]))
    with pytest.raises(CorruptFileError, match=r"Engram layers \[1, 14\], but the hash layout has \[1, 2\]"):
        open_safetensors_tables(tmp_path, FP, expected_rows={1: ROWS[1], 2: 5})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_tables_in_place(tmp_path: Path, dtype: torch.dtype) -> None:
    w = torch.randn(333, 48).to(dtype)
    save_file({"layers.3.engram.embed.weight": w}, str(tmp_path / "model.safetensors"))
    table = SafetensorsTable(tmp_path / "model.safetensors", 3, FP)
    ids = _ids(200, 333)
    assert torch.equal(table.gather(ids), w[ids].float())
    assert table.row_format.name == ("fp32" if dtype == torch.float32 else "bf16")


def test_refusals(tmp_path: Path) -> None:
    weight, scale = _split(1)
    p = tmp_path / "m.safetensors"
    save_file({"layers.1.engram.embed.weight": weight}, str(p))
    with pytest.raises(CorruptFileError, match=r"embed.scale \(its ue8m0 scales\) is missing"):
        SafetensorsTable(p, 1, FP)
    with pytest.raises(CorruptFileError, match=r"no tensor layers.7.engram.embed.weight; Engram layers present: \[1\]"):
        SafetensorsTable(p, 7, FP)
    save_file(
        {"layers.1.engram.embed.weight": weight, "layers.1.engram.embed.scale": scale[:, :4].contiguous()}, str(p)
    )
    with pytest.raises(CorruptFileError, match=r"shape \[1201, 4\], expected \[1201, 8\]"):
        SafetensorsTable(p, 1, FP)
    save_file({"layers.1.engram.embed.weight": weight, "layers.1.engram.embed.scale": scale}, str(p))
    with pytest.raises(CorruptFileError, match="has 1201 rows, but the hash layout expects 1200"):
        SafetensorsTable(p, 1, FP, expected_rows=1200)
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(CorruptFileError, match="truncated"):
        SafetensorsTable(p, 1, FP)
    p.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(CorruptFileError, match="header length"):
        SafetensorsTable(p, 1, FP)
    save_file({"layers.1.engram.embed.weight": torch.zeros(4, 8, dtype=torch.int32)}, str(p))
    with pytest.raises(CorruptFileError, match="dtype I32"):
        SafetensorsTable(p, 1, FP)
    with pytest.raises(ValueError, match="64 hex"):
        SafetensorsTable(p, 1, "not-a-fingerprint")
