"""Mooncake remote tier against a real ``mooncake_master`` on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engramlm.errors import ConfigError, EngramError, HashSpecMismatch
from engramlm.store.memory import MemoryTable

# CI installs the store extra: a missing client must fail, not skip. A missing or broken master
# fails everywhere (local_master raises), since the client package ships it.
if os.environ.get("CI"):
    import mooncake.store  # noqa: F401
else:
    pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine-non-cuda is not installed")
from engramlm.store.mooncake import MooncakeTable, connect, local_master

FP = hashlib.sha256(b"mooncake-spec").hexdigest()


@pytest.fixture(scope="module")
def mooncake_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with local_master(tmp_path_factory.mktemp("mooncake") / "master.log", timeout=15.0) as master:
        client = connect(master, 64 << 20, 16 << 20)
        yield client
        client.close()


def test_mooncake_matches_memory(mooncake_client: Any) -> None:
    heads = [101, 37, 211, 64]
    w = torch.randn(sum(heads), 32, generator=torch.Generator().manual_seed(0))
    table = MooncakeTable.populate(mooncake_client, 3, w, heads, FP)
    ref = MemoryTable(w, FP)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sum(heads), (900,), generator=g)
    ids = torch.cat([ids, ids[:100], torch.tensor([0, 100, 101, 137, 138, sum(heads) - 1])])
    assert torch.equal(table.gather(ids), ref.gather(ids))
    out = torch.empty(ids.numel(), 32, dtype=torch.bfloat16)
    assert torch.equal(table.gather(ids, out=out), ref.gather(ids).to(torch.bfloat16))
    reopened = MooncakeTable(mooncake_client, 3, heads, 32, FP)
    assert torch.equal(reopened.gather(ids[:50]), ref.gather(ids[:50]))
    with pytest.raises(HashSpecMismatch, match=FP):
        MooncakeTable(mooncake_client, 3, heads, 32, hashlib.sha256(b"other").hexdigest())
    assert table.remove() == len(heads)


def test_store_dir_mooncake_tier(mooncake_client: Any, tmp_path: Path) -> None:
    """open_store_dir(tier="mooncake") uploads missing layers from the files, then reuses the pool."""
    from engramlm.store.formats import FP8
    from engramlm.store.storedir import export_tables, open_store_dir

    heads = {5: [53, 59], 9: [61, 67, 71]}
    weights = {k: torch.randn(sum(h), 64, generator=torch.Generator().manual_seed(k)) for k, h in heads.items()}

    class _Src:
        def __init__(self, w: torch.Tensor) -> None:
            self.w, self.num_rows, self.dim = w, w.shape[0], w.shape[1]

        def read_block(self, start: int, stop: int) -> torch.Tensor:
            return self.w[start:stop]

    export_tables({k: _Src(w) for k, w in weights.items()}, tmp_path, "fp8", FP, tier="mooncake",
                  head_sizes=heads, progress=False)  # fmt: skip
    want = {k: FP8.decode(FP8.encode(w)) for k, w in weights.items()}
    ids = torch.randint(0, 112, (3, 5, 4), generator=torch.Generator().manual_seed(2))
    tables = open_store_dir(tmp_path, mooncake=mooncake_client, cache_bytes=2048)
    again = open_store_dir(tmp_path, mooncake=mooncake_client)  # already in the pool: opened, not uploaded
    for k in heads:
        assert torch.equal(tables[k].gather(ids), want[k][ids])
        assert torch.equal(again[k].gather(ids), want[k][ids])
    for k in heads:
        assert again[k].remove() == len(heads[k])


def test_missing_master_names_the_store_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import mooncake

    import engramlm.store.mooncake as mc

    monkeypatch.setattr(mooncake, "__file__", str(tmp_path / "__init__.py"))
    monkeypatch.setattr(mc.shutil, "which", lambda name: None)
    with pytest.raises(EngramError, match=r"engramlm\[store\].*libibverbs1"), local_master(tmp_path / "master.log"):
        pass


@pytest.mark.parametrize("read", ["batch", "ranges"])
def test_ranged_reads_equal_lookup_and_memory(mooncake_client: Any, read: str) -> None:
    """Both ranged reads into a registered buffer (the session's batch get-into, one ``get_into_ranges``)
    return exactly what EngramStore.lookup returns; a removed table is a named failure."""
    import threading

    heads = [1009, 13, 2003]
    w = torch.randn(sum(heads), 48, generator=torch.Generator().manual_seed(4))
    ranges = MooncakeTable.populate(mooncake_client, 7, w, heads, FP)
    assert ranges.read == "batch"  # the default
    ranges = MooncakeTable(mooncake_client, 7, heads, 48, FP, read=read)
    lookup = MooncakeTable(mooncake_client, 7, heads, 48, FP, read="lookup")
    assert ranges.read == read
    g = torch.Generator().manual_seed(5)
    for ids in (torch.randint(0, sum(heads), (700,), generator=g), torch.arange(sum(heads)), torch.tensor([1009])):
        got = ranges.gather(ids)  # arange: 3025 rows x 48 > the first buffer's 65536 floats: grown
        assert torch.equal(got, lookup.gather(ids)) and torch.equal(got, w[ids])
    assert ranges.stats.bytes_read == ranges.stats.bytes_used  # reads exactly its rows, nothing padded
    errors: list[int] = []

    def worker(seed: int) -> None:  # each thread its own registered buffer
        gen = torch.Generator().manual_seed(seed)
        for _ in range(10):
            ids = torch.randint(0, sum(heads), (300,), generator=gen)
            if not torch.equal(ranges.gather(ids), w[ids]):
                errors.append(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ranges.remove() == len(heads)
    with pytest.raises(EngramError, match=r"head 0 \(.*\) failed"):  # the objects are gone: a named failure
        ranges.gather(torch.tensor([3]))


def test_bad_read_mode_refused(mooncake_client: Any) -> None:
    from engramlm.errors import ConfigError

    with pytest.raises(ConfigError, match="mooncake read must be one of"):
        MooncakeTable(mooncake_client, 1, [3], 8, FP, read="get")


def test_batch_read_renews_a_lost_session(mooncake_client: Any) -> None:
    """The batch read survives its session being dropped behind its back (as an expired lease drops it):
    the read reports the key as unknown, the table starts a new session and reads again, exactly."""
    from engramlm.store import mooncake as mc

    heads = [211, 307]
    w = torch.randn(sum(heads), 16, generator=torch.Generator().manual_seed(8))
    table = MooncakeTable.populate(mooncake_client, 11, w, heads, FP)
    ids = torch.tensor([0, 5, 210, 211, 400, 517])
    assert torch.equal(table.gather(ids), w[ids])
    started = table._session_at
    assert started is not None
    mooncake_client.batch_get_session_end(table._keys)  # the client forgets the replicas; the table does not
    assert torch.equal(table.gather(ids), w[ids])
    assert table._session_at is not None and table._session_at > started  # renewed by the retry, not by age
    table._session_at -= 2 * mc.SESSION_RENEW_S  # an old session is renewed before the read
    renewed_before = table._session_at
    assert torch.equal(table.gather(ids[:2]), w[ids[:2]])
    assert table._session_at > renewed_before
    table.close()
    assert table._session_at is None
    assert table.remove() == len(heads)


def test_batch_read_of_missing_keys_is_a_named_error(mooncake_client: Any) -> None:
    """Objects removed by another handle: the renewed session finds no replica and names layer, head and key."""
    heads = [97, 89]
    w = torch.randn(sum(heads), 8, generator=torch.Generator().manual_seed(9))
    table = MooncakeTable.populate(mooncake_client, 12, w, heads, FP)
    other = MooncakeTable(mooncake_client, 12, heads, 8, FP)
    assert torch.equal(table.gather(torch.tensor([1, 100])), w[[1, 100]])
    assert other.remove() == len(heads)
    table._session_at = None  # renew now, as it would at the next SESSION_RENEW_S
    with pytest.raises(EngramError, match=r"layer 12 head 0 \(.*\) failed: the session start returned error"):
        table.gather(torch.tensor([3]))


def test_wait_slack_is_set_for_the_block_and_restored() -> None:
    from engramlm.store import mooncake as mc

    prctl = mc._prctl()
    if not prctl:
        pytest.skip("prctl timer slack is Linux-only")
    before = prctl(mc._PR_GET_TIMERSLACK, 0, 0, 0, 0)
    with mc.wait_slack(300):
        assert prctl(mc._PR_GET_TIMERSLACK, 0, 0, 0, 0) == 300_000
    assert prctl(mc._PR_GET_TIMERSLACK, 0, 0, 0, 0) == before


def test_transport_threads_can_be_reniced(tmp_path: Path) -> None:
    """connect remembers the threads the client starts; set_transport_nice lowers their priority (Linux)."""
    from engramlm.store import mooncake as mc

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("thread ids come from /proc (Linux)")
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    lower = min(own + 1, 19)  # raising niceness needs no privilege
    with local_master(tmp_path / "master.log", timeout=15.0) as master:
        client = connect(master, 16 << 20, 4 << 20, transport_nice=lower)
        try:
            tids = mc.transport_threads(client)
            assert tids and threading_ids_disjoint(tids)
            assert {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {lower}
            assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the caller is untouched
        finally:
            client.close()


def threading_ids_disjoint(tids: list[int]) -> bool:
    """None of the reniced threads is a Python thread (the caller, the test runner's threads)."""
    return not set(tids) & {t.native_id for t in threading.enumerate()}


def test_fused_gather_equals_memory_and_keeps_the_errors(mooncake_client: Any) -> None:
    """The fused gather (planned by one Numba call, expanded from the registered buffer into ``out``) returns
    exactly the memory tier's rows: ids in some heads only, repeats, a full-table read that grows the buffer;
    bf16 rows (the generic path) and a cache's sorted-unique reads too; an id out of range is the base's error."""
    from engramlm.store.cache import CachedTable

    heads = [97, 5, 1, 131, 2]  # tiny heads, skipped by most gathers: cut points with nothing between them
    w = torch.randn(sum(heads), 24, generator=torch.Generator().manual_seed(21))
    table = MooncakeTable.populate(mooncake_client, 21, w, heads, FP)
    ref = MemoryTable(w, FP)
    g = torch.Generator().manual_seed(22)
    for ids in (
        torch.tensor([[100, 3, 3], [234, 235, 100]]),  # heads 1, 0, 3 and 4 (not 2), out of order, repeated
        torch.randint(97, 102, (40,), generator=g),  # head 1 alone (and head 3's first rows)
        torch.randint(0, sum(heads), (8, 1, 9), generator=g),
        torch.randint(0, sum(heads), (9, 8), generator=g).t(),  # not contiguous: the base's gather
        torch.arange(sum(heads)).flip(0).repeat(30),  # every row, 7080 ids: 170k floats, a bigger buffer
    ):
        out = torch.full((*ids.shape, 24), float("nan"))
        assert table.gather(ids, out=out) is out and torch.equal(out, ref.gather(ids))
        bf16 = table.gather(ids, out=torch.empty(*ids.shape, 24, dtype=torch.bfloat16))
        assert torch.equal(bf16, ref.gather(ids).to(torch.bfloat16))
    stats = table.stats
    assert stats.bytes_read == stats.bytes_used  # only the unique rows travel
    cached = CachedTable(table, budget_bytes=64 * 24 * 4)
    ids = torch.randint(0, sum(heads), (200,), generator=g)
    assert torch.equal(cached.gather(ids), w[ids]) and torch.equal(cached.gather(ids), w[ids])
    assert cached.stats.hits > 0
    for bad in (torch.tensor([0, sum(heads)]), torch.tensor([-1, 4])):
        with pytest.raises(IndexError, match=rf"row ids out of range: min {int(bad.min())}, max {int(bad.max())}"):
            table.gather(bad)
    assert table.remove() == len(heads)


def test_plan_ranges_matches_a_numpy_plan() -> None:
    """Each row's source offset in its head's object, its destination and the heads' cut points, as NumPy
    computes them with searchsorted, for sorted ids that skip heads."""
    import numpy as np

    from engramlm.store.mooncake import _plan_ranges

    rng = np.random.default_rng(3)
    sizes = np.array([50, 1, 0, 70, 3, 90])
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    for n in (1, 5, 40, int(offsets[-1])):
        unique = np.sort(rng.choice(int(offsets[-1]), n, replace=False)).astype(np.int64)
        src, dst, cut = _plan_ranges(unique, offsets, 96, 4096)
        head = np.searchsorted(offsets, unique, side="right") - 1
        assert np.array_equal(src, (unique - offsets[head]) * 96)
        assert np.array_equal(dst, 4096 + np.arange(n) * 96)
        assert np.array_equal(cut, np.searchsorted(head, np.arange(sizes.size + 1)))


def test_transport_threads_skip_exited_and_reused_ids() -> None:
    """A recorded setup thread counts only while the thread with its id is the one recorded (same start
    time): an id that no thread has now, or that a later thread reuses, is never reniced or pinned."""
    from engramlm.store import mooncake as mc

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("thread ids come from /proc (Linux)")
    me = threading.get_native_id()
    start = mc._thread_starts()[me]
    client = object()
    mc._TRANSPORT_THREADS[id(client)] = (client, {me: start, me + 1_000_000: start})
    try:
        assert mc.transport_threads(client) == [me]
        mc._TRANSPORT_THREADS[id(client)] = (client, {me: start - 1})  # as if a thread with this id had exited
        assert mc.transport_threads(client) == []
        assert mc.set_transport_affinity(client, None) == 0
    finally:
        mc._TRANSPORT_THREADS.pop(id(client))


def _cpus_of(tids: list[int]) -> list[set[int]]:
    """The CPU sets of those of ``tids`` still running (a setup thread may exit at any time)."""
    out = []
    for tid in tids:
        try:
            out.append(os.sched_getaffinity(tid))
        except ProcessLookupError:
            continue
    return out


def test_transport_threads_can_be_pinned(mooncake_client: Any) -> None:
    """set_transport_affinity pins the client's setup threads that still run and the given extra threads (a
    prefetch worker), never the caller; None allows every CPU again."""
    from engramlm.store import mooncake as mc
    from engramlm.store.prefetch import Prefetcher

    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        pytest.skip("thread affinity is Linux-only")
    every = set(range(os.cpu_count() or 1)) & os.sched_getaffinity(0)
    one = {max(every)}
    tids = mc.transport_threads(mooncake_client)
    assert tids and threading_ids_disjoint(tids)
    with Prefetcher({1: MemoryTable(torch.zeros(4, 2), FP)}, workers=1) as pf:
        (worker,) = pf.thread_ids
        try:
            pinned = mc.set_transport_affinity(mooncake_client, one, [worker])
            assert len(mc.transport_threads(mooncake_client)) + 1 <= pinned <= len(tids) + 1
            assert all(cpus == one for cpus in _cpus_of([*tids, worker]))
            assert os.sched_getaffinity(worker) == one and os.sched_getaffinity(0) == every  # not the caller
        finally:
            mc.set_transport_affinity(mooncake_client, None, [worker])
        assert all(cpus == every for cpus in _cpus_of([*tids, worker]))
        assert os.sched_getaffinity(worker) == every
    with pytest.raises(ConfigError, match="at least one CPU"):
        mc.set_transport_affinity(mooncake_client, [])
