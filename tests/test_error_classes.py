"""Control flow by exception class, never by message text (issue 12 item 6)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import engramlm.store.mmap as mmap_mod
import engramlm.store.mooncake as mooncake_mod
from engramlm.data.dataset import load_array
from engramlm.errors import CorruptFileError, HashSpecMismatch, MissingFingerprint
from engramlm.store.tiers import LayerFile, OpenOptions
from engramlm.store.tiers import _open_mooncake as _open_layer


def test_empty_array_loads_and_garbage_is_corrupt(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros(0, dtype=np.int64))
    assert load_array(empty, None, verify=False, dtype="int64", length=0).shape == (0,)
    full = tmp_path / "full.npy"
    np.save(full, np.arange(5, dtype=np.int64))
    assert isinstance(load_array(full, None, verify=False, dtype="int64", length=5), np.memmap)
    truncated = tmp_path / "trunc.npy"
    truncated.write_bytes(full.read_bytes()[:-16])
    with pytest.raises(CorruptFileError, match=r"trunc\.npy"):
        load_array(truncated, None, verify=False)
    # numpy's wording of an unmappable file no longer decides anything
    garbage = tmp_path / "empty_but_not.npy"
    garbage.write_bytes(b"empty" * 10)
    with pytest.raises(CorruptFileError, match="not a readable"):
        load_array(garbage, None, verify=False)


class _FakeMmap:
    num_rows = 3

    def __init__(self, path: Any, fp: str, *, verify: bool = True) -> None:
        pass

    def __enter__(self) -> _FakeMmap:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def fetch_sorted_unique(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ids.numel(), 2)


def _fake_table(exc: Exception) -> type:
    class _Table:
        def __init__(self, *args: Any, reader: Any = None) -> None:
            raise exc

        @classmethod
        def populate(
            cls, client: Any, layer: int, weights: torch.Tensor, heads: Any, fp: str, *, reader: Any = None
        ) -> str:
            return f"populated {layer} {tuple(weights.shape)}"

    return _Table


def _open_mooncake(client: Any, layer: int, path: Path, entry: dict[str, Any], fp: str) -> Any:
    """The tier opener, called with a layer file shaped from the index entry."""
    layer_file = LayerFile(layer, path, SimpleNamespace(dim=entry["dim"]), entry["head_sizes"])
    return _open_layer(layer_file, fp, OpenOptions(mooncake=object()))


def test_mooncake_upload_decided_by_missing_fingerprint_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmap_mod, "MmapTable", _FakeMmap)
    entry = {"head_sizes": [3], "dim": 2}
    # a missing fingerprint is recognised by its class, whatever the message says
    monkeypatch.setattr(mooncake_mod, "MooncakeTable", _fake_table(MissingFingerprint("layer 4 not in the pool")))
    assert _open_mooncake(None, 4, Path("x"), entry, "f" * 64) == "populated 4 (3, 2)"
    # any other mismatch propagates, even if its text mentions a fingerprint
    other = HashSpecMismatch("no engramlm fingerprint matches")
    monkeypatch.setattr(mooncake_mod, "MooncakeTable", _fake_table(other))
    with pytest.raises(HashSpecMismatch) as info:
        _open_mooncake(None, 4, Path("x"), entry, "f" * 64)
    assert info.value is other


def test_missing_fingerprint_is_a_hash_spec_mismatch() -> None:
    assert issubclass(MissingFingerprint, HashSpecMismatch)
