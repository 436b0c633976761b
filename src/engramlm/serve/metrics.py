"""Prometheus metrics of a server: one registry per app (so tests can run several in one process).

Counters are updated by the scheduler thread (prometheus_client's metrics are thread-safe); the queue,
the batch, the tokens/s of the last steps and the tables' counters (rows read, bytes read, cache hits,
per tier and layer) are read at scrape time by a collector, so the hot path does no extra work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """What ``/metrics`` shows; the scheduler calls :meth:`prefill`, :meth:`decode`, :meth:`first_token`
    and :meth:`finished`, the HTTP layer :meth:`request`."""

    def __init__(self, tables: Mapping[int, Any] | None = None, tier: str = "model") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "engramlm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("engramlm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("engramlm_generation_tokens", "tokens generated", registry=r)
        self.finished_requests = Counter(
            "engramlm_finished_requests", "sequences ended, by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "engramlm_time_to_first_token_seconds", "submit to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "engramlm_decode_step_seconds", "one decode step of the running batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prefill_seconds = Histogram(
            "engramlm_prefill_seconds", "one prefill of admitted requests", buckets=LATENCY_BUCKETS, registry=r
        )
        self.row_wait = Counter(
            "engramlm_row_fetch_wait_seconds", "time the forward blocked on Engram rows", ["layer"], registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s of steps
        self._lock = threading.Lock()
        self.tables = dict(tables or {})
        self.tier = tier
        self.queue_length: Callable[[], int] = lambda: 0
        self.batch_size: Callable[[], int] = lambda: 0
        r.register(_Collector(self))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def prefill(self, tokens: int, seconds: float, waits: Mapping[int, float]) -> None:
        self.prompt_tokens.inc(tokens)
        self.prefill_seconds.observe(seconds)
        self._waits(waits)

    def decode(self, tokens: int, seconds: float, waits: Mapping[int, float]) -> None:
        self.step_seconds.observe(seconds)
        self._waits(waits)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, reason: str, tokens: int) -> None:
        self.finished_requests.labels(reason).inc()
        self.generation_tokens.inc(tokens)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds of decode steps."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - window:
                self._recent.popleft()
            return sum(t for _, t in self._recent) / window

    def _waits(self, waits: Mapping[int, float]) -> None:
        for layer, seconds in waits.items():
            self.row_wait.labels(str(layer)).inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """Values read at scrape time."""

    def __init__(self, m: ServeMetrics) -> None:
        self.m = m

    def describe(self) -> list:
        return []

    def collect(self):
        m = self.m
        yield GaugeMetricFamily("engramlm_queue_length", "requests waiting for a slot", value=m.queue_length())
        yield GaugeMetricFamily("engramlm_running_requests", "requests in the decode batch", value=m.batch_size())
        yield GaugeMetricFamily(
            "engramlm_generation_tokens_per_second",
            "tokens generated per second, last 10 s",
            value=m.tokens_per_second(),
        )
        if not m.tables:
            return
        labels = ["tier", "layer"]
        rows = CounterMetricFamily("engramlm_table_rows_read", "unique rows read from the tier", labels=labels)
        read = CounterMetricFamily("engramlm_table_bytes_read", "bytes read from the tier", labels=labels)
        hits = CounterMetricFamily("engramlm_table_cache_hits", "hot-row cache hits", labels=labels)
        misses = CounterMetricFamily("engramlm_table_cache_misses", "hot-row cache misses", labels=labels)
        rate = GaugeMetricFamily("engramlm_table_cache_hit_rate", "hits / (hits + misses)", labels=labels)
        for layer, table in sorted(m.tables.items()):
            s, lab = table.stats, [m.tier, str(layer)]
            tier_bytes, t = 0, table
            while t is not None:  # a hot-row cache counts hits; the tier under it counts the bytes it read
                tier_bytes += t.stats.bytes_read
                t = getattr(t, "inner", None)
            rows.add_metric(lab, float(s.rows_unique))
            read.add_metric(lab, float(tier_bytes))
            hits.add_metric(lab, float(s.hits))
            misses.add_metric(lab, float(s.misses))
            rate.add_metric(lab, float(s.hit_rate))
        yield from (rows, read, hits, misses, rate)
