"""Issue 18's leaner gather: the Numba dedupe kernel and the direct tier's one-call gather (dedupe, read,
verify, expand straight into the caller's buffer) against ``torch.unique`` and the generic path, bit for bit."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engramlm.hashing.batch import NgramHasher
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.store import _aio
from engramlm.store import cache as cache_mod
from engramlm.store import direct as direct_mod
from engramlm.store._dedup import unique_inverse
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import write_store
from engramlm.store.memory import MemoryTable
from tests.test_store_tiers import FP, ROWS, _ids, _reference, _store, _weights, direct_dir  # noqa: F401

needs_aio = pytest.mark.skipif(not _aio.available(), reason=f"aio engine unavailable: {_aio.why_unavailable()}")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=300))
def test_unique_inverse_equals_torch_unique(values: list[int]) -> None:
    flat = np.array(values, dtype=np.int64)
    unique, inverse = unique_inverse(flat)
    want_u, want_inv = torch.unique(torch.from_numpy(flat), sorted=True, return_inverse=True)
    assert np.array_equal(unique, want_u.numpy()) and np.array_equal(inverse, want_inv.numpy())
    assert np.array_equal(unique[inverse], flat)


def test_unique_inverse_on_duplicates_and_descending_ids() -> None:
    flat = np.array([9, 3, 9, 9, 0, 3, 7, 0], dtype=np.int64)
    unique, inverse = unique_inverse(flat)
    assert unique.tolist() == [0, 3, 7, 9] and inverse.tolist() == [3, 1, 3, 3, 0, 1, 2, 0]
    unique, inverse = unique_inverse(np.arange(50, 0, -1))
    assert unique.tolist() == list(range(1, 51)) and inverse.tolist() == list(range(49, -1, -1))


def _pairs(path: Path, fmt_dtype: torch.dtype) -> tuple[DirectFileTable, DirectFileTable]:
    """(aio table whose gathers into ``fmt_dtype`` take the fused kernel, threads table: the generic path)."""
    return DirectFileTable(path, FP, queue_depth=8, io_engine="aio"), DirectFileTable(path, FP, io_engine="threads")


@needs_aio
@pytest.mark.parametrize(("fmt", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fused_gather_equals_generic_path(direct_dir: Path, fmt: str, dtype: torch.dtype) -> None:  # noqa: F811
    path = _store(direct_dir, fmt)
    ref = _reference(fmt)
    fused, generic = _pairs(path, dtype)
    calls = 0
    real_gather = _aio.gather

    def counting(*args: object, **kw: object) -> tuple[int, ...]:
        nonlocal calls
        result = real_gather(*args, **kw)
        calls += result[0] != -1  # -1: the buffer was too small, the table grows it and calls again
        return result

    _aio.gather = counting  # type: ignore[assignment]
    try:
        requests = [
            _ids(),  # duplicates, both table ends
            _ids(64, seed=3)[:64].reshape(8, 8),  # a decode step's shape
            torch.tensor([ROWS - 1, 0, ROWS - 1, 5, 4, 5]),  # out of order
            torch.tensor([17]),
            torch.arange(ROWS - 1, -1, -1),  # every row, descending: the buffer grows
            torch.randint(0, ROWS, (2, 3, 5), generator=torch.Generator().manual_seed(9)).to(torch.int32),
        ]
        for ids in requests:
            want = ref.gather(ids).to(dtype)
            got = fused.gather(ids, out=torch.empty(*ids.shape, ref.dim, dtype=dtype))
            assert got.dtype == dtype and torch.equal(got, want)
            assert torch.equal(generic.gather(ids, out=torch.empty(*ids.shape, ref.dim, dtype=dtype)), want)
        assert calls == len(requests)  # every request above took the one-call path
        for key in ("requests", "rows_total", "rows_unique", "bytes_used", "bytes_read"):
            assert getattr(fused.stats, key) == getattr(generic.stats, key), key
    finally:
        _aio.gather = real_gather  # type: ignore[assignment]
        fused.close()
        generic.close()


@needs_aio
def test_fused_gather_errors_and_empty_requests(direct_dir: Path) -> None:  # noqa: F811
    path = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    with DirectFileTable(path, FP, io_engine="aio") as table:
        for bad in (torch.tensor([3, ROWS]), torch.tensor([-1, 2, 2])):
            with pytest.raises(IndexError) as got:
                table.gather(bad)
            with pytest.raises(IndexError) as want:
                ref.gather(bad)
            assert str(got.value) == str(want.value)
        empty = table.gather(torch.zeros(2, 0, dtype=torch.long))
        assert empty.shape == (2, 0, ref.dim)
        assert table.stats.requests == 0
        out = torch.full((3, ref.dim), 7.0)
        table.gather(torch.tensor([1, 1, 1]), out=out)  # a flat [n, dim] out is accepted too
        assert torch.equal(out, ref.gather(torch.tensor([1, 1, 1])))


@needs_aio
def test_cached_direct_on_real_text_ids(direct_dir: Path, dsv3_tokenizer_path: Path) -> None:  # noqa: F811
    """Row ids hashed from real text (the V3 tokenizer on this repo's sources) through the fused direct tier
    and an LFU cache in front of it, against a MemoryTable: same rows, same dedup counts."""
    tok = tokenizers.Tokenizer.from_file(str(dsv3_tokenizer_path))
    cmap = CompressionMap.from_tokenizer(dsv3_tokenizer_path)
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(701, 701), layer_ids=(1,), pad_id=2)
    layout = make_layout(spec, cmap)
    rows = layout.rows_of(1)
    text = inspect.getsource(json) + inspect.getsource(inspect)
    ids = torch.tensor(tok.encode(text).ids[: 8 * 256]).reshape(8, 256)
    row_ids = NgramHasher(layout)(ids)[0]  # [8, 256, heads]
    weights = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))
    path = direct_dir / "real.engst"
    write_store(path, weights, "fp32", FP)
    mem = MemoryTable(weights, FP)
    with (
        DirectFileTable(path, FP, io_engine="aio") as direct,
        CachedTable(DirectFileTable(path, FP, io_engine="aio"), rows * 64 * 4 // 10) as cached,
    ):
        for t in range(0, 256, 8):  # decode-sized steps, then one prefill-sized request
            step = row_ids[:, t : t + 8]
            want = mem.gather(step)
            assert torch.equal(direct.gather(step), want) and torch.equal(cached.gather(step), want)
        assert torch.equal(direct.gather(row_ids), mem.gather(row_ids))
        assert direct.stats.rows_unique == mem.stats.rows_unique and direct.stats.rows_total == mem.stats.rows_total
        assert cached.stats.hits > 0 and cached.stats.misses > 0  # real text repeats n-grams


@needs_aio
@pytest.mark.parametrize("path", ["one-call", "split"])
@pytest.mark.parametrize("policy", ["lfu", "lru", "static"])
def test_cached_fused_path_keeps_the_generic_paths_policy(
    direct_dir: Path,  # noqa: F811
    policy: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two equal caches over the same file, fed the same requests: one through the fused kernels (float32 out),
    one through dedupe -> ``_fetch_unique`` -> expand (float64 out): same rows, hits, slots and scores. The fused
    cache runs as one kernel call per gather (``one-call``), or, above ``FUSED_MAX_IDS`` ids, as three (``split``)."""
    file = _store(direct_dir, "fp32")
    ref = _reference("fp32")
    budget = 300 * 64 * 4  # 300 of 3001 rows: eviction on every policy but static
    fused = CachedTable(DirectFileTable(file, FP, io_engine="aio"), budget, policy)
    generic = CachedTable(DirectFileTable(file, FP, io_engine="aio"), budget, policy)
    expanded: list[int] = []
    if path == "split":
        monkeypatch.setattr(direct_mod, "FUSED_MAX_IDS", 63)
        real_expand = cache_mod._expand
        monkeypatch.setattr(
            cache_mod, "_expand", lambda rows, inv, out: (expanded.append(inv.size), real_expand(rows, inv, out))
        )
    else:
        kernel = cache_mod._fused_kernel()
        monkeypatch.setattr(cache_mod, "_fused_kernel", lambda: lambda *a: (expanded.append(a[0].size), kernel(*a))[1])
    g = torch.Generator().manual_seed(5)
    hot = torch.randint(0, ROWS, (40,), generator=g)
    try:
        for k in range(60):
            ids = torch.cat([hot[torch.randint(0, 40, (30,), generator=g)], torch.randint(0, ROWS, (34,), generator=g)])
            ids = ids.reshape(8, 8) if k % 2 else ids.flip(0)
            a = fused.gather(ids, out=torch.empty(*ids.shape, 64))
            b = generic.gather(ids, out=torch.empty(*ids.shape, 64, dtype=torch.float64))
            want = ref.gather(ids)
            assert torch.equal(a, want) and torch.equal(b, want.double())
        assert expanded == [64] * 60  # the fused cache took the kernels' path every time, the other never
        assert np.array_equal(fused._slot_of, generic._slot_of) and np.array_equal(fused._score, generic._score)
        assert np.array_equal(fused._slot_id, generic._slot_id)
        for key in ("hits", "misses", "rows_unique", "rows_total"):
            assert getattr(fused.stats, key) == getattr(generic.stats, key), key
        assert fused.stats.hits > 0 and fused.cached_rows == generic.cached_rows > 0
        with pytest.raises(IndexError, match="row ids out of range: min -3"):
            fused.gather(torch.tensor([5, -3]))
    finally:
        fused.close()
        generic.close()


class _GenericMemory(MemoryTable):
    """The memory tier through the generic dedupe -> _fetch_unique -> expand path (no fused call)."""

    def _gather_bytes(self, flat: np.ndarray, out: np.ndarray, dtype: torch.dtype) -> int | None:
        return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_tier_fused_gather_equals_the_generic_path(dtype: torch.dtype) -> None:
    """The memory tier's one-call gather (dense rows, any ids) gives the generic path's rows bit for bit, its
    counters and its out-of-range message; packed records and the split fp8 form keep the generic path."""
    w = _weights().to(dtype)
    fused, generic = MemoryTable(w, FP), _GenericMemory(w, FP)
    rng = np.random.default_rng(0)
    for shape in [(8, 1, 8), (2, 40, 6), (1,), (3, 0)]:
        ids = torch.from_numpy(rng.zipf(1.3, shape) % ROWS)
        for out in (None, torch.empty(*shape, w.shape[1], dtype=dtype)):
            got = fused.gather(ids, out=out)
            assert got.dtype == (dtype if out is not None else torch.float32)
            assert torch.equal(got, generic.gather(ids, out=None if out is None else out.clone()))
            assert torch.equal(got, w[ids].to(got.dtype))
    a, b = fused.stats.as_dict(), generic.stats.as_dict()
    for field in ("requests", "rows_total", "rows_unique", "bytes_read", "bytes_used"):
        assert a[field] == b[field], field
    bad = torch.tensor([[5, ROWS, 7]])
    messages = []
    for t in (fused, generic):
        with pytest.raises(IndexError, match=rf"min 5, max {ROWS}") as exc:
            t.gather(bad, out=torch.empty(1, 3, w.shape[1], dtype=dtype))
        messages.append(str(exc.value))
    assert messages[0] == messages[1]
    packed = _reference("bf16")  # uint8 records with a row format: decoded by the generic path
    assert packed._gather_bytes(np.array([1, 2], np.int64), np.empty((2, 128), np.uint8), torch.bfloat16) is None
