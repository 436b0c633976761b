"""The Mooncake reader process against a real ``mooncake_master`` on 127.0.0.1: the child lends the pool its
memory and reads it for this process, through shared slots and two pipes."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engramlm.errors import ConfigError, EngramError, HashSpecMismatch, MissingFingerprint
from engramlm.store.memory import MemoryTable

if os.environ.get("CI"):  # CI installs the store extra: a missing client must fail, not skip
    import mooncake.store  # noqa: F401
else:
    pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine-non-cuda is not installed")
from engramlm.store.mooncake import MasterAddress, MooncakeTable, connect, local_master
from engramlm.store.mooncake_reader import ReaderProcess, slot_capacity

FP = hashlib.sha256(b"mooncake-reader-spec").hexdigest()
SLOT_BYTES = 8192  # small slots: a few hundred ids already take several turns


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MasterAddress, ReaderProcess, Any]]:
    """A master, a reader process lending it 64 MiB (so the rows live in the child), and a client lending none."""
    with local_master(tmp_path_factory.mktemp("mooncake") / "master.log", timeout=15.0) as master:
        with ReaderProcess(master, slots=6, slot_bytes=SLOT_BYTES, segment_bytes=64 << 20) as reader:
            client = connect(master, 0, 16 << 20)
            yield master, reader, client
            client.close()


def test_reader_gathers_equal_memory_split_phase_and_not(pool: tuple[MasterAddress, ReaderProcess, Any]) -> None:
    """Split-phase gathers (start on this thread, the child reads, ``result`` expands) and synchronous ones (a
    gather larger than a slot, read in turns; bf16 rows; a cache's sorted-unique reads) return exactly the memory
    tier's rows; the prefetcher runs them inline; ids out of range are refused before any request."""
    from engramlm.store.cache import CachedTable
    from engramlm.store.prefetch import Prefetcher

    _, reader, client = pool
    heads = [97, 5, 1, 131, 2]
    w = torch.randn(sum(heads), 24, generator=torch.Generator().manual_seed(31))
    MooncakeTable.populate(client, 31, w, heads, FP)
    table = MooncakeTable(client, 31, heads, 24, FP, reader=reader)
    ref = MemoryTable(w, FP)
    assert table.split_phase and table.prefetch_workers == 0
    capacity = slot_capacity(reader.slot_bytes, 24 * 4)
    g = torch.Generator().manual_seed(32)
    for ids in (
        torch.tensor([[100, 3, 3], [234, 235, 100]]),  # heads 1, 0, 3 and 4, out of order, repeated
        torch.randint(0, sum(heads), (8, 1, 9), generator=g),
        torch.randint(0, sum(heads), (9, 8), generator=g).t(),  # not contiguous: the base's gather
        torch.arange(sum(heads)).flip(0).repeat(3),  # every row: more than a slot holds
    ):
        out = torch.full((*ids.shape, 24), float("nan"))
        pending = table.start_gather(ids, out=out)
        assert pending.result() is out and torch.equal(out, ref.gather(ids))
        assert torch.equal(table.gather(ids), ref.gather(ids))
        bf16 = table.gather(ids, out=torch.empty(*ids.shape, 24, dtype=torch.bfloat16))
        assert torch.equal(bf16, ref.gather(ids).to(torch.bfloat16))
    assert sum(heads) > capacity
    assert table.stats.bytes_read == table.stats.bytes_used  # only the unique rows travel
    cached = CachedTable(table, budget_bytes=64 * 24 * 4)
    ids = torch.randint(0, sum(heads), (200,), generator=g)
    assert torch.equal(cached.gather(ids), w[ids]) and torch.equal(cached.gather(ids), w[ids])
    for _ in range(2):  # split phase through the cache: probe, the child reads the misses, admit at result()
        hits = cached.stats.hits
        assert torch.equal(cached.start_gather(ids[:50]).result(), w[ids[:50]])
        assert cached.stats.hits > hits
    missed = cached.start_gather(torch.arange(240, 250))  # reaped unread: nothing admitted, the slot comes back
    missed.close()
    for tables in ({31: table}, {31: cached}):
        with Prefetcher(tables) as pf:
            assert pf.workers == 0
            got = pf.fetch({31: ids.view(20, 10)})
            assert torch.equal(got[31], w[ids].view(20, 10, 24))
    for bad in (torch.tensor([0, sum(heads)]), torch.tensor([-1, 4])):
        with pytest.raises(IndexError, match=rf"row ids out of range: min {int(bad.min())}, max {int(bad.max())}"):
            table.start_gather(bad).result()
    assert table.remove() == len(heads)


def test_a_gather_larger_than_a_slot_takes_several_or_is_read_in_turns(
    pool: tuple[MasterAddress, ReaderProcess, Any],
) -> None:
    """A prefill-sized gather starts in as many slots as its unique ids need when that many are free (rows equal,
    every slot given back), and is read synchronously, one slot at a time, when they are not."""
    _, reader, client = pool
    w = torch.randn(1000, 24, generator=torch.Generator().manual_seed(38))
    MooncakeTable.populate(client, 38, w, [400, 600], FP)
    table = MooncakeTable(client, 38, [400, 600], 24, FP, reader=reader)
    capacity = slot_capacity(reader.slot_bytes, 24 * 4)
    g = torch.Generator().manual_seed(39)
    fits = torch.randperm(1000, generator=g)[: 3 * capacity + 5].repeat(2)  # 4 slots of 6
    too_many = torch.arange(1000).flip(0)  # 13 slots: more than there are
    for ids in (fits, too_many):
        out = torch.full((ids.numel(), 24), float("nan"))
        pending = table.start_gather(ids, out=out)
        assert pending.result() is out and torch.equal(out, w[ids])
    held = table.start_gather(fits)
    held.close()  # reaped: all four slots come back
    pendings = [table.start_gather(torch.tensor([i])) for i in range(reader.slots)]
    assert [torch.equal(p.result(), w[[i]]) for i, p in enumerate(pendings)] == [True] * reader.slots
    assert table.remove() == 2


def test_the_child_checks_the_fingerprint_too(pool: tuple[MasterAddress, ReaderProcess, Any]) -> None:
    """The child opens each table itself: a layer uploaded under another hash spec, or not at all, is refused
    there with the same error type as in this process."""
    _, reader, client = pool
    w = torch.randn(10, 8, generator=torch.Generator().manual_seed(33))
    MooncakeTable.populate(client, 33, w, [4, 6], FP)
    with pytest.raises(HashSpecMismatch, match=FP):
        reader.open_table(33, [4, 6], 8, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(MissingFingerprint, match="layer 34"):
        reader.open_table(34, [4, 6], 8, FP)
    table = MooncakeTable(client, 33, [4, 6], 8, FP, reader=reader)  # the reader still serves after refusing
    assert torch.equal(table.gather(torch.tensor([9, 0, 5])), w[[9, 0, 5]])
    assert table.remove() == 2


def test_slots_run_out_with_a_clear_error_and_come_back(pool: tuple[MasterAddress, ReaderProcess, Any]) -> None:
    _, reader, client = pool
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(35))
    MooncakeTable.populate(client, 35, w, [50], FP)
    table = MooncakeTable(client, 35, [50], 8, FP, reader=reader)
    held = [table.start_gather(torch.tensor([i, i + 1])) for i in range(reader.slots)]
    with pytest.raises(EngramError, match=f"all {reader.slots} slots of the Mooncake reader process are in use"):
        table.start_gather(torch.tensor([7])).result()
    held[0].close()  # reaped: its slot is free again, its rows are never taken
    with pytest.raises(RuntimeError, match="closed"):
        held[0].result()
    assert torch.equal(table.start_gather(torch.tensor([7])).result(), w[[7]])
    for i, p in enumerate(held[1:], start=1):
        assert torch.equal(p.result(), w[[i, i + 1]])
    assert table.remove() == 1


def test_a_dead_reader_is_named_and_a_closed_one_refuses(pool: tuple[MasterAddress, ReaderProcess, Any]) -> None:
    master, _, client = pool
    w = torch.randn(20, 8, generator=torch.Generator().manual_seed(36))
    MooncakeTable.populate(client, 36, w, [20], FP)
    reader = ReaderProcess(master, slots=2)
    table = MooncakeTable(client, 36, [20], 8, FP, reader=reader)
    assert torch.equal(table.gather(torch.tensor([3, 1])), w[[3, 1]])
    assert table.io_thread_ids == reader.thread_ids and reader.pid in reader.thread_ids
    if hasattr(os, "sched_setaffinity"):  # Engine(io_cpus=...) confines the child's threads, as a tier's own
        last = max(os.sched_getaffinity(0))
        table.set_io_cpus({last})
        assert {frozenset(os.sched_getaffinity(t)) for t in table.io_thread_ids} == {frozenset({last})}
        table.set_io_cpus(None)
        assert all(len(os.sched_getaffinity(t)) == os.cpu_count() for t in table.io_thread_ids)
    os.kill(reader.pid, signal.SIGKILL)
    with pytest.raises(EngramError, match=r"the Mooncake reader process exited \(code -9\)"):
        table.start_gather(torch.tensor([3])).result()
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(EngramError, match="closed"):
        table.gather(torch.tensor([3]))
    assert not Path(reader.log_path).exists()
    assert table.remove() == 1


def test_bad_reader_options_are_refused(pool: tuple[MasterAddress, ReaderProcess, Any]) -> None:
    master, reader, client = pool
    with pytest.raises(ConfigError, match="slots must be an integer >= 1, got 0"):
        ReaderProcess(master, slots=0)
    with pytest.raises(ConfigError, match="slot_bytes must be an integer >= 4096"):
        ReaderProcess(master, slot_bytes=100)
    with pytest.raises(ConfigError, match="segment_bytes must be an integer >= 0, got -1"):
        ReaderProcess(master, segment_bytes=-1)
    nobody = MasterAddress("127.0.0.1:1", "http://127.0.0.1:1/metadata")
    with pytest.raises(EngramError, match=r"no Mooncake master at 127\.0\.0\.1:1"):  # the child's own error
        ReaderProcess(nobody)
    w = torch.randn(6, 8)
    MooncakeTable.populate(client, 37, w, [6], FP)
    with pytest.raises(ConfigError, match="mooncake read must be 'batch' with a reader process, got 'ranges'"):
        MooncakeTable(client, 37, [6], 8, FP, read="ranges", reader=reader)
    MooncakeTable(client, 37, [6], 8, FP).remove()


def test_the_child_reads_with_the_legacy_framing_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child only reads, so its transfers skip the per-request status frame (``MC_TCP_PROTO=1``); a value the
    caller set wins, and ``legacy_framing=False`` leaves the default. engramlm is importable there from any cwd."""
    from engramlm.store.mooncake_reader import _child_env

    monkeypatch.delenv("MC_TCP_PROTO", raising=False)
    assert _child_env(True)["MC_TCP_PROTO"] == "1"
    assert "MC_TCP_PROTO" not in _child_env(False)
    monkeypatch.setenv("MC_TCP_PROTO", "2")
    assert _child_env(True)["MC_TCP_PROTO"] == "2"
    src = Path(__file__).resolve().parents[1] / "src"
    assert str(src) in _child_env(True)["PYTHONPATH"].split(os.pathsep)
