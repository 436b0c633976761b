"""The SSD trainable table (store.trainable) on its own: a cache far smaller than the working set, checked
against a plain in-memory copy after every step; reopening from manifests, compaction, garbage collection,
read-only opens; and the streamed table init equal to the in-memory one (RNG state after it included)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.errors import CorruptFileError
from engramlm.nn.engram import EngramBlock, external_tables, stream_table_init
from engramlm.store.trainable import TrainableTable, collect_garbage, manifest_files

FP = "ab" * 32


def _make(d: Path, w: torch.Tensor, cache_rows: int, block: int = 700) -> TrainableTable:
    def init(write):
        for s in range(0, w.shape[0], block):
            write(s, w[s : s + block])

    return TrainableTable.create(d, w.shape[0], w.shape[1], FP, init, cache_bytes=cache_rows * 256)


def test_cache_eviction_write_back_reopen_compaction(tmp_path: Path) -> None:
    rows, dim = 5000, 16
    w = torch.randn(rows, dim)
    t = _make(tmp_path, w, cache_rows=50)  # 50 cached rows for 200 rows a step: spills and evictions every step
    assert t.rec == 256 and t.capacity == 50
    lay = t.layout
    ref_w, ref_m, ref_v, ref_n = w.clone(), torch.zeros(rows, dim), torch.zeros(rows, dim), torch.zeros(rows).long()
    rng = np.random.default_rng(0)
    manifests = []
    for step in range(30):
        ids = np.unique(rng.integers(0, rows, 200))
        if step % 3 == 0:
            t.prefetch(ids, tick=step)
        got = lay.unpack(t.read(ids, step))
        i = torch.from_numpy(ids)
        for a, b in zip(got, (ref_w[i], ref_m[i], ref_v[i], ref_n[i]), strict=True):
            assert torch.equal(a, b), step
        new = (got[0] + 1, got[1] + 0.5, got[2] + 0.25, got[3] + 1)
        ref_w[i], ref_m[i], ref_v[i], ref_n[i] = new
        t.write(ids, lay.pack(*new), step)
        if step in (9, 19):
            manifests.append((t.flush(), ref_w.clone()))
    assert t.io["rows_written"] > 0 and t.io["log_chunks"] > 10
    final = t.flush()
    assert torch.equal(t.read_block(0, rows), ref_w)
    t.close()
    # every manifest still opens at its own state: logs only grow, the base is never rewritten in place
    for man, want in [*manifests, (final, ref_w)]:
        with TrainableTable.open(tmp_path, man, FP, cache_bytes=1 << 16, writable=False) as r:
            assert torch.equal(r.read_block(0, rows), want)
            assert torch.equal(r.gather(torch.arange(rows - 1, -1, -1)), want.flip(0))
    before = set(os.listdir(tmp_path))
    with TrainableTable.open(tmp_path, final, FP, cache_bytes=1 << 16, writable=False):
        pass
    assert set(os.listdir(tmp_path)) == before  # a read-only open creates nothing
    t2 = TrainableTable.open(tmp_path, final, FP, cache_bytes=1 << 16)
    compacted = t2.compact()
    assert compacted["logs"] == [] and compacted["base"]["file"] != final["base"]["file"]
    assert torch.equal(t2.read_block(0, rows), ref_w)
    m, v, n = lay.unpack(t2.read_records(0, rows))[1:]
    assert torch.equal(m, ref_m) and torch.equal(v, ref_v) and torch.equal(n, ref_n)
    removed = collect_garbage(tmp_path, t2.files() | manifest_files(compacted))
    assert final["base"]["file"] in removed
    t2.close()
    with TrainableTable.open(tmp_path, compacted, FP, cache_bytes=1 << 16) as t3:
        assert torch.equal(t3.read_block(0, rows), ref_w)


def test_a_flipped_bit_in_a_committed_log_chunk_is_refused(tmp_path: Path) -> None:
    t = _make(tmp_path, torch.randn(300, 8), cache_rows=10)
    ids = np.arange(0, 300, 3)
    t.write(ids, t.read(ids), 1)
    man = t.flush()
    t.close()
    log = tmp_path / man["logs"][0]["file"]
    raw = bytearray(log.read_bytes())
    raw[4096 + 5] ^= 0x10  # inside the first chunk's ids/records
    log.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=log.name):
        TrainableTable.open(tmp_path, man, FP, cache_bytes=4096)


@pytest.mark.parametrize(("rows", "dim", "std", "chunk"), [(1000, 16, 0.5, 7), (777, 24, 1.0, 100), (3, 5, 2.0, 1)])
def test_streamed_table_init_equals_the_in_memory_init(rows: int, dim: int, std: float, chunk: int) -> None:
    kw = {"hidden_size": 8, "num_rows": rows, "num_heads": 1, "head_dim": dim, "embed_init_std": std}
    torch.manual_seed(1)
    ref = EngramBlock(**kw)
    after = torch.rand(4)
    out = torch.empty(rows, dim)

    def sink(n: int, d: int, s: float) -> None:
        stream_table_init(n, d, s, lambda first, r: out[first : first + r.shape[0]].copy_(r), chunk_rows=chunk)

    torch.manual_seed(1)
    with external_tables(sink):
        blk = EngramBlock(**kw)
    assert blk.embed.weight.shape == (0, dim)
    assert torch.equal(out, ref.embed.weight.detach())
    assert torch.equal(torch.rand(4), after)  # the same RNG draws: every later parameter inits the same
    assert torch.equal(blk.wkv.weight, ref.wkv.weight)


def _force(reader, engine: str) -> None:
    reader._probed = True  # no probe at the first read: the engine stays the one under test
    if engine == "threads":
        reader.engine = "threads"


@pytest.mark.parametrize("engine", ["aio", "threads"])
def test_both_read_engines_give_the_same_records_and_refuse_a_corrupt_base_page(tmp_path: Path, engine: str) -> None:
    """The nogil aio reader (one Numba call per read) and the threaded preadv reader return the same bytes for
    base and log records in any order, and both check every base page read against its CRC32."""
    rows, dim = 4000, 16
    w = torch.randn(rows, dim)
    t = _make(tmp_path / "t", w, cache_rows=20)
    if engine == "aio" and t._base.engine != "aio":
        pytest.skip("the aio engine cannot run here (not glibc on 64-bit Linux)")
    for r in [t._base, *(g["reader"] for g in t._logs)]:
        _force(r, engine)
    rng = np.random.default_rng(1)
    moved = np.unique(rng.integers(0, rows, 600))
    recs = t.read(moved, 1)
    t.write(moved, recs + 1, 1)
    t.flush()  # the moved rows now live in the log, the others in the base
    assert {t._base.engine, t._logs[0]["reader"].engine} == {engine}
    want = t.layout.pack(w, torch.zeros(rows, dim), torch.zeros(rows, dim), torch.zeros(rows, dtype=torch.int64))
    want[moved] = recs + 1
    ids = rng.permutation(rows)[:1500]  # unsorted, both files
    assert np.array_equal(t._read_disk(ids, t._loc[ids]), want[ids])
    base = tmp_path / "t" / t.manifest()["base"]["file"]
    fresh = np.setdiff1d(np.arange(rows), moved)[:50]
    page = (4096 + int(fresh[7]) * t.rec) // 4096
    t.close()
    raw = bytearray(base.read_bytes())
    raw[page * 4096 + 11] ^= 0x04
    base.write_bytes(bytes(raw))
    r = TrainableTable.open(tmp_path / "t", t.manifest(), FP, cache_bytes=4096, writable=False, direct=False)
    _force(r._base, engine)
    with pytest.raises(CorruptFileError, match=f"{base.name}: page {page} fails its CRC32"):
        r._read_disk(fresh, r._loc[fresh])
    r.close()
