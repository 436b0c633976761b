"""Every tier returns exactly MemoryTable's rows; files refuse corruption; caches stay correct."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.errors import CorruptFileError, HashSpecMismatch
from engramlm.store import direct as direct_mod
from engramlm.store.base import RowTable
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import open_store, read_header, verify_store, write_store
from engramlm.store.formats import FP8, get_format
from engramlm.store.memory import MemoryTable
from engramlm.store.mmap import MmapTable

FP = hashlib.sha256(b"hash-spec-a").hexdigest()
FP_OTHER = hashlib.sha256(b"hash-spec-b").hexdigest()
ROWS, DIM = 3001, 64  # odd row count: the last chunk and page are partial
FORMATS = ["fp32", "bf16", "fp8_e4m3_ue8m0"]
REPO = Path(__file__).resolve().parents[1]


def _weights(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed))


def _ids(n: int = 4000, seed: int = 1) -> torch.Tensor:
    """Random ids with many duplicates, including both table ends."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ROWS, (n,), generator=g)
    return torch.cat([ids, ids[:500], torch.tensor([0, ROWS - 1, 0])])


def _reference(fmt: str) -> MemoryTable:
    raw = get_format(fmt).encode(_weights())
    return MemoryTable(raw, FP, row_format=fmt)


def _supports_o_direct(directory: Path) -> bool:
    probe = directory / f".odirect-{uuid.uuid4().hex}"
    probe.write_bytes(b"\0" * 4096)
    try:
        fd = os.open(probe, os.O_RDONLY | direct_mod._O_DIRECT)
    except OSError:
        return False
    finally:
        probe.unlink()
    os.close(fd)
    return True


def _skip_unless_ci(why: str) -> None:
    """Skip on a developer machine that lacks the facility; on CI (a known Linux machine) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must exercise this path: {why}")
    pytest.skip(why)


@pytest.fixture
def direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a filesystem that accepts O_DIRECT (tmp_path, else the repo's .cache/)."""
    if _supports_o_direct(tmp_path):
        yield tmp_path
        return
    d = REPO / ".cache" / f"test_store_{uuid.uuid4().hex}"
    d.mkdir(parents=True)
    try:
        if not _supports_o_direct(d):
            _skip_unless_ci("no filesystem here accepts O_DIRECT (tmp_path and .cache/ refuse it)")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _store(directory: Path, fmt: str) -> Path:
    path = directory / f"table-{fmt}.engst"
    write_store(path, _weights(), fmt, FP, {"hash_spec": {"seed": 0}}, chunk_bytes=16384)
    return path


def _tiers(path: Path, fmt: str) -> dict[str, RowTable]:
    return {
        "memory": _reference(fmt),
        "memory_dense": MemoryTable(get_format(fmt).decode(get_format(fmt).encode(_weights())), FP),
        "mmap": MmapTable(path, FP),
        "direct": DirectFileTable(path, FP, queue_depth=8),
        "cached_lfu": CachedTable(MmapTable(path), 64 * 4 * 200, "lfu"),
        "cached_lru": CachedTable(DirectFileTable(path, queue_depth=4), 64 * 4 * 200, "lru"),
        "cached_static": CachedTable(_reference(fmt), 64 * 4 * 200, "static"),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_tier_matches_memory(direct_dir: Path, fmt: str) -> None:
    path = _store(direct_dir, fmt)
    ref = _reference(fmt)
    ids = _ids()
    want = ref.gather(ids)
    assert want.dtype == torch.float32 and want.shape == (ids.numel(), DIM)
    tiers = _tiers(path, fmt)
    assert tiers["direct"].direct_io  # type: ignore[attr-defined]
    for name, table in tiers.items():
        assert (table.num_rows, table.dim, table.fingerprint) == (ROWS, DIM, FP), name
        for _ in range(2):  # second pass exercises cache hits
            assert torch.equal(table.gather(ids), want), name
        out = torch.full((ids.numel(), DIM), float("nan"), dtype=torch.bfloat16)
        assert table.gather(ids, out=out) is out
        assert torch.equal(out, want.to(torch.bfloat16)), name
        grid = ids[:600].reshape(20, 30)
        assert torch.equal(table.gather(grid), want[:600].reshape(20, 30, DIM)), name
        s = table.stats
        assert s.rows_unique < s.rows_total and 0 < s.unique_ratio < 1, name
        table.close()


def test_split_form_memory_table() -> None:
    weight, scale = FP8.quantize(_weights())
    table = MemoryTable.from_split(weight, scale, FP)
    ids = _ids()
    assert torch.equal(table.gather(ids), _reference("fp8_e4m3_ue8m0").gather(ids))


def test_direct_reads_are_page_granular(direct_dir: Path) -> None:
    path = _store(direct_dir, "fp32")
    with DirectFileTable(path, queue_depth=4, max_run_pages=2) as table:
        table.gather(torch.arange(0, 64))  # 64 rows x 256 B = 4 pages, 2 runs
        assert table.stats.bytes_used == 64 * 256
        assert table.stats.bytes_read == 4 * 4096
        table.gather(torch.tensor([5, 5, 9]))  # one page, read once
        assert table.stats.bytes_read == 5 * 4096


def test_direct_falls_back_when_o_direct_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _store(tmp_path, "bf16")
    real_open = os.open

    def tmpfs_like_open(p: object, flags: int, *a: object) -> int:
        if flags & direct_mod._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(direct_mod.os, "open", tmpfs_like_open)
    with pytest.warns(RuntimeWarning, match="O_DIRECT"):
        table = DirectFileTable(path, FP)
    assert not table.direct_io and "refused" in (table.fallback_reason or "")
    ids = _ids()
    assert torch.equal(table.gather(ids), _reference("bf16").gather(ids))
    table.close()


def test_direct_on_tmpfs_if_present() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        _skip_unless_ci("/dev/shm is not available")
    d = shm / f"engram-test-{uuid.uuid4().hex}"
    d.mkdir()
    try:
        path = _store(d, "fp32")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            table = DirectFileTable(path)
        # Either tmpfs accepts O_DIRECT (newer kernels) or we fell back with a warning.
        assert table.direct_io or any("O_DIRECT" in str(w.message) for w in record)
        ids = _ids()
        assert torch.equal(table.gather(ids), _reference("fp32").gather(ids))
        table.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_out_of_range_and_bad_ids() -> None:
    table = _reference("fp32")
    with pytest.raises(IndexError, match=rf"min -1, max 5, table has {ROWS} rows"):
        table.gather(torch.tensor([3, -1, 5]))
    with pytest.raises(IndexError, match=rf"max {ROWS}\b"):
        table.gather(torch.tensor([ROWS]))
    with pytest.raises(TypeError, match="integer"):
        table.gather(torch.tensor([1.0]))
    assert table.gather(torch.empty(0, dtype=torch.int64)).shape == (0, DIM)


def test_header_roundtrip_and_meta(tmp_path: Path) -> None:
    path = _store(tmp_path, "fp8_e4m3_ue8m0")
    h = verify_store(path, FP)
    assert (h.num_rows, h.dim, h.row_bytes, h.row_format) == (ROWS, DIM, 66, "fp8_e4m3_ue8m0")
    assert h.data_offset % 4096 == 0 and h.meta == {"hash_spec": {"seed": 0}}
    assert h.file_size == path.stat().st_size
    # Chunked iterables (float and pre-encoded) write the same bytes as one tensor.
    w = _weights()
    p2 = tmp_path / "chunks.engst"
    blocks = [FP8.encode(w[:1000]), w[1000:2500], w[2500:]]
    write_store(p2, iter(blocks), "fp8_e4m3_ue8m0", FP, {"hash_spec": {"seed": 0}},
                chunk_bytes=16384)  # fmt: skip
    assert p2.read_bytes() == path.read_bytes()


def test_truncated_file_refused(tmp_path: Path) -> None:
    path = _store(tmp_path, "fp32")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CorruptFileError, match=r"truncated: \d+ bytes, header says \d+"):
        open_store(path)
    with pytest.raises(CorruptFileError, match="truncated"):
        MmapTable(path)
    path.write_bytes(data[:100])
    with pytest.raises(CorruptFileError, match="truncated header"):
        read_header(path)
    path.write_bytes(b"NOTASTORE" + data[9:])
    with pytest.raises(CorruptFileError, match="bad magic"):
        read_header(path)


def test_flipped_byte_refused(tmp_path: Path) -> None:
    path = _store(tmp_path, "fp32")
    h = read_header(path)
    data = bytearray(path.read_bytes())
    row = 2000
    data[h.data_offset + row * h.row_bytes + 7] ^= 0x10
    path.write_bytes(bytes(data))
    chunk = row // h.chunk_rows
    with pytest.raises(CorruptFileError, match=rf"1 chunk\(s\): chunk {chunk} \(rows"):
        verify_store(path)
    data[h.data_offset + row * h.row_bytes + 7] ^= 0x10
    data[40] ^= 0x01  # inside the header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="header checksum"):
        open_store(path)


def test_wrong_fingerprint_refused(tmp_path: Path) -> None:
    path = _store(tmp_path, "bf16")
    for opener in (open_store, verify_store, MmapTable, DirectFileTable):
        with pytest.raises(HashSpecMismatch) as exc:
            opener(path, FP_OTHER)
        assert FP in str(exc.value) and FP_OTHER in str(exc.value)


def _zipf_ids(rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.from_numpy((rng.zipf(1.3, n) - 1) % ROWS)


@pytest.mark.parametrize("policy", ["lfu", "lru", "static"])
def test_cache_hits_on_zipf(policy: str) -> None:
    ref = _reference("fp32")
    cache = CachedTable(_reference("fp32"), 200 * DIM * 4, policy)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = _zipf_ids(rng, 1000)
        assert torch.equal(cache.gather(ids), ref.gather(ids))
    assert cache.cached_rows == cache.capacity == 200
    assert cache.stats.hit_rate > 0.2


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_cache_tiny_budget_heavy_eviction(policy: str) -> None:
    ref = _reference("bf16")
    cache = CachedTable(_reference("bf16"), 5 * DIM * 4, policy)
    rng = np.random.default_rng(1)
    for i in range(60):
        ids = _zipf_ids(rng, 300) if i % 2 else torch.from_numpy(rng.integers(0, ROWS, 300))
        assert torch.equal(cache.gather(ids), ref.gather(ids))
        # The id -> slot map stays a consistent bijection.
        assert np.array_equal(cache._slot_id[cache._key_slot], cache._keys)
        assert bool(np.all(np.diff(cache._keys) > 0))
    assert cache.stats.hits > 0


def test_cache_preload_static() -> None:
    cache = CachedTable(_reference("fp32"), 10 * DIM * 4, "static")
    cache.preload(torch.arange(10))
    cache.gather(torch.arange(20))
    assert cache.stats.hits == 10 and cache.stats.misses == 10
    assert sorted(cache._keys.tolist()) == list(range(10))


def test_cache_concurrent_gathers_correct(tmp_path: Path) -> None:
    path = _store(tmp_path, "fp32")
    ref = _reference("fp32")
    cache = CachedTable(DirectFileTable(path, queue_depth=4), 50 * DIM * 4, "lfu")
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(40):
            ids = _zipf_ids(rng, 500)
            if not torch.equal(cache.gather(ids), ref.gather(ids)):
                errors.append(f"thread {seed} got wrong rows")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.stats.requests == 160 and cache.stats.hit_rate > 0
    assert np.array_equal(cache._slot_id[cache._key_slot], cache._keys)
    cache.close()
