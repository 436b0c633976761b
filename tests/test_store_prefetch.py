"""Prefetcher: rows equal the reference whatever the timing; backpressure; errors reach wait()."""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np
import pytest
import torch

from engramlm.errors import ConfigError
from engramlm.store.base import RowTable
from engramlm.store.cache import CachedTable
from engramlm.store.memory import MemoryTable
from engramlm.store.prefetch import Prefetcher, PrefetchHandle

FP = hashlib.sha256(b"prefetch-spec").hexdigest()
ROWS, DIM, HEADS = 2003, 32, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(seed))


def _zipf_ids(rng: np.random.Generator, b: int = 2, t: int = 40) -> torch.Tensor:
    return torch.from_numpy((rng.zipf(1.2, (b, t, HEADS)) - 1) % ROWS)


class _SlowTable(MemoryTable):
    """A MemoryTable whose fetch sleeps a random few hundred µs: widens every race window."""

    def __init__(self, weights: torch.Tensor, seed: int) -> None:
        super().__init__(weights, FP)
        self._rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        with self._rng_lock:
            delay = float(self._rng.uniform(0, 6e-4))
        time.sleep(delay)
        return super()._fetch_unique(ids)


class _GatedTable(MemoryTable):
    """Blocks every fetch until ``gate`` is set: lets tests hold a worker busy deterministically."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__(weights, FP)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        return super()._fetch_unique(ids)


@pytest.mark.parametrize("workers", [2, 0])
def test_prefetch_matches_reference_and_reports_waits(workers: int) -> None:
    w1, w14 = _weights(1), _weights(14)
    ref = {1: MemoryTable(w1, FP), 14: MemoryTable(w14, FP)}
    tables: dict[int, RowTable] = {1: CachedTable(MemoryTable(w1, FP), 40 * DIM * 4, "lfu"), 14: MemoryTable(w14, FP)}
    rng = np.random.default_rng(0)
    with Prefetcher(tables, workers=workers, dtype=torch.bfloat16) as pf:
        for _ in range(5):
            ids = {1: _zipf_ids(rng), 14: _zipf_ids(rng)}
            handle = pf.start(ids)
            assert isinstance(handle, PrefetchHandle) and sorted(handle) == [1, 14] and len(handle) == 2
            for layer in (14, 1):  # any order
                rows = handle[layer]
                assert rows.shape == (2, 40, HEADS, DIM) and rows.dtype == torch.bfloat16
                assert torch.equal(rows, ref[layer].gather(ids[layer]).to(torch.bfloat16))
                assert handle.wait(layer) is rows  # second wait: same tensor, no refetch
            assert set(handle.wait_seconds) == {1, 14} and all(v >= 0 for v in handle.wait_seconds.values())
        assert pf.metrics[1]["waits"] == 5 and pf.metrics[14]["fetch_s"] > 0
        assert tables[1].stats.hits > 0
        with pytest.raises(KeyError, match=r"not prefetched; prefetched layers are \[1, 14\]"):
            handle.wait(3)
        only = pf.fetch({14: ids[14][:1]})
        assert set(only) == {14} and torch.equal(only[14], ref[14].gather(ids[14][:1]).to(torch.bfloat16))


def test_each_layer_waits_only_for_its_own() -> None:
    slow = _GatedTable(_weights(1))
    fast = MemoryTable(_weights(2), FP)
    ids = {1: torch.randint(0, ROWS, (1, 8, HEADS)), 2: torch.randint(0, ROWS, (1, 8, HEADS))}
    with Prefetcher({1: slow, 2: fast}, workers=2) as pf:
        handle = pf.start(ids)
        assert torch.equal(handle[2], fast.gather(ids[2]))  # layer 1 is still blocked
        assert not handle.done(1)
        slow.gate.set()
        assert torch.equal(handle[1], MemoryTable(_weights(1), FP).gather(ids[1]))


def test_ids_are_snapshotted_when_queued() -> None:
    """A caller may refill its int64 CPU id tensor as soon as ``start`` returns (no copy would alias it)."""
    gated = _GatedTable(_weights(1))
    plain = MemoryTable(_weights(2), FP)
    ids = {1: torch.randint(0, ROWS, (1, 8, HEADS)), 2: torch.randint(0, ROWS, (1, 8, HEADS))}
    want = plain.gather(ids[2].clone())
    with Prefetcher({1: gated, 2: plain}, workers=1) as pf:
        handle = pf.start(ids)  # the one worker blocks in layer 1, layer 2 waits in the queue
        assert gated.entered.wait(10)
        ids[2].fill_(0)  # the caller reuses its buffer for the next step
        gated.gate.set()
        assert torch.equal(handle[2], want)


def test_default_worker_count_is_the_tiers_choice() -> None:
    """``workers=None``: inline (0) when every tier wants it (the memory tier does), else the most cautious pool
    among the tiers that want one (Mooncake's client brings its own threads), seen through a cache in front of
    it; an explicit count wins."""

    class _OneThreadTier(MemoryTable):
        prefetch_workers = 1

    class _TwoThreadTier(MemoryTable):
        prefetch_workers = 2

    plain, single, two = MemoryTable(_weights(1), FP), _OneThreadTier(_weights(2), FP), _TwoThreadTier(_weights(3), FP)
    assert MemoryTable.prefetch_workers == 0 and CachedTable(single, 1 << 16).prefetch_workers == 1
    cases = (
        ({1: plain}, 0),
        ({1: plain, 2: CachedTable(single, 1 << 16)}, 1),
        ({1: single}, 1),
        ({1: plain, 2: two}, 2),
        ({1: two, 2: single}, 1),
    )
    for tables, want in cases:
        with Prefetcher(tables) as pf:
            assert pf.workers == want
    with Prefetcher({1: single}, workers=3) as pf:
        assert pf.workers == 3


def test_bounded_queue_applies_backpressure() -> None:
    gated = _GatedTable(_weights(3))
    ids = {0: torch.randint(0, ROWS, (1, 4, HEADS))}
    pf = Prefetcher({0: gated}, workers=1, queue_size=1)
    h1 = pf.start(ids)  # taken by the only worker, which blocks on the gate
    assert gated.entered.wait(5)
    h2 = pf.start(ids)  # fills the queue (size 1)
    returned = threading.Event()
    holder: list[PrefetchHandle] = []

    def producer() -> None:
        holder.append(pf.start(ids))
        returned.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not returned.wait(0.3), "start() should block while the bounded queue is full"
    gated.gate.set()
    assert returned.wait(5)
    t.join()
    want = MemoryTable(_weights(3), FP).gather(ids[0])
    for h in (h1, h2, holder[0]):
        assert torch.equal(h[0], want)
    pf.close()
    pf.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pf.start(ids)


@pytest.mark.parametrize("workers", [2, 0])
def test_exceptions_propagate_to_wait(workers: int) -> None:
    good = MemoryTable(_weights(4), FP)
    with Prefetcher({0: MemoryTable(_weights(5), FP), 1: good}, workers=workers) as pf:
        bad = torch.tensor([[[0, ROWS + 7]]])
        handle = pf.start({0: bad, 1: torch.tensor([[[1, 2]]])})
        with pytest.raises(IndexError, match=rf"max {ROWS + 7}, table has {ROWS} rows"):
            handle.wait(0)
        assert torch.equal(handle[1], good.gather(torch.tensor([[[1, 2]]])))
        # The pool survives a failed job.
        assert pf.fetch({0: torch.tensor([[[3]]])})[0].shape == (1, 1, 1, DIM)
        with pytest.raises(KeyError, match=r"no table for layer\(s\) \[9\]"):
            pf.start({9: bad})
        with pytest.raises(TypeError, match="integer"):
            pf.start({0: torch.zeros(1, 1, 1)})


def test_bad_configuration() -> None:
    t = {0: MemoryTable(_weights(6), FP)}
    with pytest.raises(ConfigError, match=r"workers must be >= 0 \(0: inline, no thread\), got -1"):
        Prefetcher(t, workers=-1)
    with pytest.raises(ConfigError, match="floating-point"):
        Prefetcher(t, dtype=torch.int32)
    with pytest.raises(ConfigError, match="at least one"):
        Prefetcher({})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Prefetcher(t, device="cuda")


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_concurrent_prefetch_against_evicting_cache(policy: str) -> None:
    """Many threads share one prefetcher over a tiny cache in front of a slow tier: every
    batch must equal the reference even though slots are evicted while other fetches are in flight."""
    w = _weights(7)
    ref = MemoryTable(w, FP)
    cache = CachedTable(_SlowTable(w, seed=0), 12 * DIM * 4, policy)  # 12 rows: constant eviction
    errors: list[str] = []
    with Prefetcher({0: cache, 1: cache}, workers=3, queue_size=4) as pf:

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(12):
                ids = {0: _zipf_ids(rng, 1, 16), 1: torch.from_numpy(rng.integers(0, ROWS, (1, 16, HEADS)))}
                handle = pf.start(ids)
                for layer in (1, 0):
                    if not torch.equal(handle[layer], ref.gather(ids[layer])):
                        errors.append(f"client {seed} layer {layer}: wrong rows")

        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert cache.stats.requests == 4 * 12 * 2 and cache.stats.hits > 0 and cache.stats.misses > 0
    assert cache.cached_rows == cache.capacity == 12
    assert np.array_equal(cache._slot_id[cache._key_slot], cache._keys)
    assert bool(np.all(np.diff(cache._keys) > 0))


def test_concurrent_raw_gathers_with_preload_race() -> None:
    """Threads gather, and one keeps preloading, against a 6-row static+lfu pair: no torn rows."""
    w = _weights(8)
    ref = MemoryTable(w, FP)
    caches = [CachedTable(_SlowTable(w, seed=s), 6 * DIM * 4, p) for s, p in enumerate(("lfu", "static"))]
    errors: list[str] = []
    stop = threading.Event()

    def gatherer(cache: CachedTable, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            ids = _zipf_ids(rng, 1, 8)
            if not torch.equal(cache.gather(ids), ref.gather(ids)):
                errors.append(f"{cache.policy} thread {seed}: wrong rows")

    def preloader(cache: CachedTable) -> None:
        rng = np.random.default_rng(99)
        while not stop.is_set():
            cache.preload(torch.from_numpy(rng.integers(0, ROWS, 5)))

    threads = [threading.Thread(target=gatherer, args=(c, s)) for c in caches for s in range(3)]
    loaders = [threading.Thread(target=preloader, args=(c,)) for c in caches]
    for t in threads + loaders:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in loaders:
        t.join()
    assert not errors, errors[:3]
    for c in caches:
        assert np.array_equal(c._slot_id[c._key_slot], c._keys)
        assert torch.equal(c._slots[c._key_slot], w[torch.from_numpy(c._keys)])  # every slot holds its id's row
