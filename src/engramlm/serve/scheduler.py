"""Continuous batching: requests join the running decode batch at any step and leave when done.

One :class:`~engramlm.models.decode.DecodeCache` of ``max_batch`` *slots* holds every running
request's decode state: its KV cache, its ShortConv history and its own streaming-hasher history
(the last N-1 compressed ids), so a request that joins mid-batch hashes exactly as if it ran alone.
Running requests occupy slots ``0 .. n-1``; a decode step runs the first ``n`` slots as one batch
(:meth:`DecodeCache.head`, attention over the longest running sequence only) and retired slots are
compacted away by copying the later slots down (a copy of one sequence's state, rare next to the
per-step work). Chosen over stacking per-request caches every step, which copies every running
sequence's whole KV cache twice per step (see docs/architecture.md for the measurement).

Policy, one :meth:`Scheduler.step`:

1. admit waiting requests first come first served while slots are free and their prompts fit a
   prefill budget of ``prefill_tokens`` (always at least one), and prefill them together, right-padded,
   in a cache of their own (as :class:`~engramlm.infer.Engine` does for a batch): their first token
   (and, with ``echo``, the prompt's log-probabilities) comes out of this prefill;
2. copy each admitted request that needs more tokens into a free slot;
3. one decode step for every running request (the new ones included): hash, prefetch the rows of the
   whole batch (:meth:`RowTable.gather` deduplicates them), forward, commit; sample per request;
4. retire finished and cancelled requests.

So a long prompt delays the running requests by at most one prefill of ``prefill_tokens`` tokens per
step (no chunked prefill). Everything that touches the model runs on the scheduler's one thread; the
HTTP side talks to it only through :meth:`submit`, :meth:`cancel` and the request's ``on_event``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engramlm.errors import ConfigError, EngramError
from engramlm.infer.engine import Engine
from engramlm.infer.sampling import SamplingParams, sample
from engramlm.models.decode import DecodeCache


class QueueFull(EngramError):
    """The waiting queue is at its bound: retry later (HTTP 429)."""


class ShuttingDown(EngramError):
    """The server is draining: no new requests (HTTP 503)."""


@dataclass
class Event:
    """What the scheduler tells a request, in order: the prompt's log-probabilities (``echo``), then one
    event per new token, the last one with ``finish`` set ("stop", "length", "error"; "cancelled" for a
    request whose client went away). With ``finish == "stop"`` the token is the stop token, which ends
    the sequence and is not part of the output."""

    token: int | None = None
    logprob: float | None = None
    top: dict[int, float] | None = None  # the top-n alternatives (token id -> log-probability)
    finish: str | None = None
    prompt_logprobs: list[float | None] | None = None  # one per prompt token, None for the first
    prompt_top: list[dict[int, float] | None] | None = None
    error: str | None = None


@dataclass
class Request:
    """One sequence to continue. ``max_tokens`` 0 only scores the prompt (``echo``)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None  # top-n log-probabilities per generated token (None: none)
    echo_logprobs: bool = False  # log-probabilities of the prompt tokens
    on_event: Callable[[Event], None] = lambda event: None
    # set by the scheduler
    submitted: float = 0.0
    first_token: float | None = None
    generated: int = 0
    last: int = 0
    done: bool = False
    cancelled: bool = False
    generator: torch.Generator | None = None


class Scheduler:
    """Continuous batching over ``engine`` (its model, vocabulary and prefetcher)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_len: int | None = None,
        prefill_tokens: int = 1024,
        metrics: Any = None,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_tokens", prefill_tokens)):
            if value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        self.engine = engine
        self.max_len = max_len or engine.model.config.max_seq_len
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.cache = DecodeCache(engine.model, max_batch, self.max_len)
        self.running: list[Request] = []  # slot i holds running[i]
        self.waiting: deque[Request] = deque()
        self.metrics = metrics
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the HTTP side ----------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Refuse a request that can never run (the HTTP layer maps this to a 400)."""
        if not req.prompt:
            raise ConfigError("prompt: needs at least one token")
        if min(req.prompt) < 0 or max(req.prompt) >= self.engine.vocab_size:
            raise ConfigError(f"prompt: token ids must lie in [0, {self.engine.vocab_size})")
        if req.max_tokens < 0:
            raise ConfigError(f"max_tokens: must be >= 0, got {req.max_tokens}")
        if len(req.prompt) + req.max_tokens > self.max_len:
            raise ConfigError(
                f"This model's maximum context length is {self.max_len} tokens; the request has "
                f"{len(req.prompt)} prompt tokens and max_tokens {req.max_tokens}: "
                "shorten the prompt or lower max_tokens"
            )

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue ``requests`` (all or none): :class:`QueueFull` at the bound, :class:`ShuttingDown` when draining."""
        for req in requests:
            self.check(req)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue}); retry later")
            now = time.perf_counter()
            for req in requests:
                req.submitted = now
                if req.sampling.seed is not None:
                    req.generator = torch.Generator(self.engine.device).manual_seed(req.sampling.seed)
                self.waiting.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: free the slot at the next step boundary."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    # ---- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engramlm-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain`` finish every queued and running one, else cancel them."""
        with self._cond:
            self._stopping = True
            if not drain:
                for req in [*self.waiting, *self.running]:
                    req.cancelled = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.running and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self.waiting and not self.running:
                    return
            self.step()

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> None:
        """Admit + prefill, one decode step of the running batch, retire (see the module docstring)."""
        with self._cond:
            group = self._admit()
        try:
            with torch.no_grad():
                if group:
                    self._prefill(group)
                self._retire()
                if self.running:
                    self._decode()
                    self._retire()
        except Exception as exc:  # a failed fetch or forward fails the requests in it, not the server
            for req in [*group, *self.running]:
                if not req.done:
                    self._finish(req, "error", error=f"{type(exc).__name__}: {exc}")
            self.running.clear()

    def _admit(self) -> list[Request]:
        while self.waiting and self.waiting[0].cancelled:
            self._finish(self.waiting.popleft(), "cancelled")
        group: list[Request] = []
        tokens = 0
        free = self.max_batch - len(self.running)
        while self.waiting and len(group) < free:
            nxt = self.waiting[0]
            if nxt.cancelled:
                self._finish(self.waiting.popleft(), "cancelled")
                continue
            if group and tokens + len(nxt.prompt) > self.prefill_tokens:
                break
            group.append(self.waiting.popleft())
            tokens += len(nxt.prompt)
        return group

    def _prefill(self, group: list[Request]) -> None:
        t0 = time.perf_counter()
        k = len(group)
        lens = torch.tensor([len(r.prompt) for r in group], dtype=torch.long)
        ids = torch.full((k, int(lens.max())), self.engine.pad_id, dtype=torch.long)
        for i, r in enumerate(group):  # once per request
            ids[i, : len(r.prompt)] = torch.as_tensor(r.prompt, dtype=torch.long)
        cache = DecodeCache(self.engine.model, k, ids.shape[1])
        same = bool((lens == lens[0]).all())
        logits, waits = self.engine.forward_chunk(ids, cache, None if same else lens)
        logits = logits[..., : self.engine.vocab_size]
        for i, r in enumerate(group):
            if r.echo_logprobs:
                self._prompt_logprobs(r, logits[i, : len(r.prompt) - 1])
        last = logits[torch.arange(k, device=logits.device), lens.to(logits.device) - 1]
        live = [i for i, r in enumerate(group) if r.max_tokens > 0 and not r.cancelled]
        for r in group:
            if r.max_tokens == 0:
                self._finish(r, "length")
            elif r.cancelled:
                self._finish(r, "cancelled")
        if live:
            self._emit_tokens([group[i] for i in live], last[live])
        for i in live:
            r = group[i]
            if not r.done:
                self.cache.load_row(len(self.running), cache, i)
                self.running.append(r)
        if self.metrics is not None:
            self.metrics.prefill(int(lens.sum()), time.perf_counter() - t0, waits)

    def _prompt_logprobs(self, req: Request, logits: torch.Tensor) -> None:
        """Log-probability of each prompt token given the ones before it (``echo`` with ``logprobs``)."""
        lp = torch.log_softmax(logits.float(), dim=-1)  # [T-1, V]
        target = torch.as_tensor(req.prompt[1:], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, target[:, None])[:, 0].tolist()
        tops: list[dict[int, float] | None] = [None]
        if req.logprobs:
            values, index = lp.topk(min(req.logprobs, lp.shape[-1]), dim=-1)
            tops += [dict(zip(i, v, strict=True)) for i, v in zip(index.tolist(), values.tolist(), strict=True)]
        else:
            tops += [{}] * len(chosen)
        req.on_event(Event(prompt_logprobs=[None, *chosen], prompt_top=tops))

    def _decode(self) -> None:
        t0 = time.perf_counter()
        n = len(self.running)
        x = torch.tensor([r.last for r in self.running], dtype=torch.long)[:, None]
        view = self.cache.head(n)
        logits, waits = self.engine.forward_chunk(x, view)
        self.cache.absorb(view)
        self._emit_tokens(list(self.running), logits[:, -1, : self.engine.vocab_size])
        if self.metrics is not None:
            self.metrics.decode(n, time.perf_counter() - t0, waits)

    def _emit_tokens(self, reqs: list[Request], last: torch.Tensor) -> None:
        """Sample one token per request from ``last`` [n, V]: one argmax for the greedy ones, each other
        request with its own generator (so its output does not depend on who shares the batch)."""
        tokens = last.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            if not r.sampling.greedy:
                tokens[i] = int(sample(last[i : i + 1], r.sampling, r.generator)[0])
        want = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        lp_rows: dict[int, tuple[float, dict[int, float]]] = {}
        if want:
            lp = torch.log_softmax(last[want].float(), dim=-1)
            chosen = lp.gather(1, torch.tensor([tokens[i] for i in want], device=lp.device)[:, None])[:, 0].tolist()
            width = max(1, max(reqs[i].logprobs or 0 for i in want))
            values, index = lp.topk(min(width, lp.shape[-1]), dim=-1)
            for j, i in enumerate(want):
                top_n = reqs[i].logprobs or 0
                top = dict(zip(index[j, :top_n].tolist(), values[j, :top_n].tolist(), strict=True))
                lp_rows[i] = (chosen[j], top)
        now = time.perf_counter()
        for i, r in enumerate(reqs):
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            tok = tokens[i]
            r.generated += 1
            r.last = tok
            logprob, top = lp_rows.get(i, (None, None))
            if r.first_token is None:
                r.first_token = now
                if self.metrics is not None:
                    self.metrics.first_token(now - r.submitted)
            stop = tok in r.sampling.stop_tokens
            finish = "stop" if stop else ("length" if r.generated >= r.max_tokens else None)
            # a stop token ends the sequence and is not part of the output text (as Engine.generate); its
            # event still carries it and its log-probability (a scorer counts positions, as vLLM reports it)
            r.on_event(Event(tok, logprob, top, finish))
            if finish is not None:
                r.done = True
                if self.metrics is not None:
                    self.metrics.finished(finish, r.generated - int(stop))

    def _finish(self, req: Request, reason: str, *, error: str | None = None) -> None:
        req.done = True
        req.on_event(Event(finish=reason, error=error))
        if self.metrics is not None:
            self.metrics.finished(reason, req.generated)

    def _retire(self) -> None:
        """Drop finished and cancelled requests; copy the later slots down so running = slots 0..n-1."""
        for r in self.running:
            if r.cancelled and not r.done:
                self._finish(r, "cancelled")
        keep = [i for i, r in enumerate(self.running) if not r.done]
        if len(keep) == len(self.running):
            return
        for dst, src in enumerate(keep):
            if dst != src:
                self.cache.load_row(dst, self.cache, src)
        self.running = [self.running[i] for i in keep]
