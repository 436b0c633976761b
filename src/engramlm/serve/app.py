"""The HTTP face of a :class:`~engramlm.serve.scheduler.Scheduler`: an OpenAI-compatible FastAPI app.

Endpoints: ``/v1/models``, ``/v1/completions`` (``echo`` + ``logprobs`` as lm-evaluation-harness's
``local-completions`` scores log-likelihoods), ``/v1/chat/completions`` (plain template for base models),
both streamed as server-sent events with ``stream: true``; ``/tokenize``, ``/detokenize`` and
``/tokenizer_info`` (vLLM's shapes, which lm-eval's remote tokenizer reads), ``/health``, ``/metrics``.

Every failure is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
or unsupported parameter, 404 for an unknown model, 429 (queue full) and 503 (draining) with
``Retry-After``. The event loop never runs the model: requests go to the scheduler thread, tokens come
back through ``loop.call_soon_threadsafe`` into one asyncio queue per sequence.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engramlm.errors import ConfigError
from engramlm.serve.metrics import ServeMetrics
from engramlm.serve.protocol import (
    CHAT_KEYS,
    COMPLETION_KEYS,
    MAX_LOGPROBS,
    MAX_TOP_LOGPROBS,
    RETRY_AFTER_S,
    APIError,
    Params,
    check_keys,
    integer,
    max_tokens_of,
    parse_json,
    prompts_of,
    render_messages,
)
from engramlm.serve.scheduler import Event, QueueFull, Scheduler, ShuttingDown
from engramlm.serve.scheduler import Request as SeqRequest
from engramlm.serve.served import PLAIN_CHAT_JINJA, Served


def _error(status: int, message: str, **kw: Any) -> JSONResponse:
    exc = APIError(status, message, **kw)
    return _error_response(exc)


def _error_response(exc: APIError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


# ---- one sequence's events -> text ---------------------------------------------------------------


class _Sequence:
    """One submitted sequence: its events (an asyncio queue fed from the scheduler thread) and its text,
    detokenised incrementally (a partial UTF-8 character and a possible stop-string prefix held back)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, served: Served, stops: list[str]) -> None:
        self.loop, self.served, self.stops = loop, served, stops
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.ids: list[int] = []
        self.logprobs: list[tuple[int, float | None, dict[int, float] | None]] = []
        self.prompt_event: Event | None = None
        self.text, self.sent = "", 0
        self.finish: str | None = None
        self.error: str | None = None
        self.request: SeqRequest | None = None

    def __call__(self, event: Event) -> None:  # the scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _absorb(self, event: Event) -> None:
        if event.prompt_logprobs is not None:
            self.prompt_event = event
            return
        if event.token is not None:
            self.logprobs.append((event.token, event.logprob, event.top))
            if event.finish != "stop":
                self.ids.append(event.token)
                self.text = self.served.decode(self.ids)
        for stop in self.stops:  # a stop string ends the text; the caller then cancels the sequence
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
        if event.finish is not None and self.finish is None:
            self.finish = event.finish
            self.error = event.error

    async def next_delta(self) -> str | None:
        """The next piece of text (maybe empty), or None when the sequence has ended."""
        if self.finish is not None:
            return None
        event = await self.queue.get()
        self._absorb(event)
        if self.finish is not None:
            delta = self.text[self.sent :]
            self.sent = len(self.text)
            return delta
        safe = self.text
        while safe.endswith("\ufffd"):
            safe = safe[:-1]
        hold = max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(safe) - hold)
        delta = safe[self.sent : end]
        self.sent = end
        return delta

    async def run(self) -> None:
        while await self.next_delta() is not None:
            pass


# ---- the app -------------------------------------------------------------------------------------


def create_app(
    served: Served,
    *,
    max_batch: int = 16,
    max_queue: int = 64,
    prefill_tokens: int = 1024,
    max_len: int | None = None,
) -> FastAPI:
    """An app serving ``served``; the scheduler thread starts and drains with the app's lifespan."""
    max_len = max_len or served.max_len
    metrics = ServeMetrics(served.tables, served.tier)
    scheduler = Scheduler(
        served.engine, max_batch=max_batch, max_queue=max_queue, max_len=max_len, prefill_tokens=prefill_tokens,
        metrics=metrics,
    )  # fmt: skip
    metrics.queue_length = lambda: scheduler.queue_length
    metrics.batch_size = lambda: scheduler.batch_size
    state = {"draining": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight responses (SIGTERM: graceful shutdown) by now
            state["draining"] = True
            await asyncio.to_thread(scheduler.shutdown, drain=True)

    app = FastAPI(title="engramlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.served = scheduler, metrics, served

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(404)
    async def on_not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, f"Unknown endpoint {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def on_bad_method(request: Request, exc: Exception) -> JSONResponse:
        return _error(405, f"Method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    def submit(reqs: list[SeqRequest]) -> None:
        if state["draining"]:
            raise APIError(503, "The server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        try:
            scheduler.submit(reqs)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        except ShuttingDown as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        except ConfigError as exc:
            param = "max_tokens" if "context length" in str(exc) else "prompt"
            raise APIError(400, str(exc), param=param, code="context_length_exceeded"
                           if param == "max_tokens" else "invalid_prompt") from None  # fmt: skip

    async def collect(request: Request, seqs: list[_Sequence]) -> None:
        """Wait for every sequence; cancel them all if the client goes away."""
        tasks = [asyncio.ensure_future(s.run()) for s in seqs]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.5)
                if await request.is_disconnected():
                    raise asyncio.CancelledError
        finally:
            for s, t in zip(seqs, tasks, strict=True):
                t.cancel()
                if s.request is not None and not s.request.done:
                    scheduler.cancel(s.request)

    def stream(seq: _Sequence, chunks: AsyncIterator[str], usage: Callable[[], dict] | None) -> StreamingResponse:
        """SSE framing shared by completions and chat: the chunks, the usage chunk when asked for, ``[DONE]``; an
        error mid-stream becomes an error event, and a finished or abandoned stream frees the sequence's slot."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
                if usage is not None:
                    yield _sse(usage())
                yield "data: [DONE]\n\n"
            except APIError as exc:
                yield _sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}})
            finally:
                if seq.request is not None and not seq.request.done:
                    scheduler.cancel(seq.request)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def start(seqs_prompts: list[tuple[list[int], int]], p: Params, *, logprobs: int | None, echo_lp: bool,
              stops: list[str]) -> list[_Sequence]:  # fmt: skip
        loop = asyncio.get_running_loop()
        seqs, reqs = [], []
        for ids, max_tokens in seqs_prompts:
            seq = _Sequence(loop, served, stops)
            seq.request = SeqRequest(ids, max_tokens, p.sampling(served, max_tokens), logprobs=logprobs,
                                     echo_logprobs=echo_lp, on_event=seq)  # fmt: skip
            seqs.append(seq)
            reqs.append(seq.request)
        submit(reqs)
        return seqs

    def raise_if_failed(seqs: list[_Sequence]) -> None:
        for s in seqs:
            if s.finish == "error":
                raise APIError(500, f"generation failed: {s.error}", type="server_error", code="internal_error")

    # ---- /v1/completions ----

    def completion_logprobs(seq: _Sequence, entries: list, echo_ids: list[int] | None) -> dict[str, Any]:
        tokens: list[int] = []
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if echo_ids is not None:
            ev = seq.prompt_event
            tokens += echo_ids
            lps += ev.prompt_logprobs if ev else [None] * len(echo_ids)
            tops += [None if t is None else {served.token_text(k): v for k, v in t.items()}
                     for t in (ev.prompt_top if ev else [None] * len(echo_ids))]  # fmt: skip
        for tok, lp, top in entries:
            tokens.append(tok)
            lps.append(lp)
            tops.append({served.token_text(k): v for k, v in (top or {}).items()})
        texts = [served.token_text(t) for t in tokens]
        offsets, at = [], 0
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_json(await request.body())
        check_keys(body, COMPLETION_KEYS)
        p = Params(body, served, max_len)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise APIError(400, "'echo' must be a boolean", param="echo")
        logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        max_tokens = max_tokens_of(body, "max_tokens", 16, 0, max_len)
        if max_tokens == 0 and not echo:
            raise APIError(400, "'max_tokens' must be >= 1 (0 only with echo, to score the prompt)", param="max_tokens")
        prompts, texts = prompts_of(body, served)
        if p.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        seqs = start([(ids, max_tokens) for ids in prompts], p, logprobs=logprobs,
                     echo_lp=echo and logprobs is not None, stops=p.stops)  # fmt: skip
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage_prompt = sum(len(ids) for ids in prompts)

        def echo_text(i: int) -> str:
            return texts[i] if texts[i] is not None else served.decode(prompts[i])

        if p.stream:
            seq = seqs[0]

            async def chunks() -> AsyncIterator[str]:
                if echo:
                    yield _sse(_completion_chunk(rid, created, served.name, echo_text(0), None))
                seen = 0
                while (delta := await seq.next_delta()) is not None:
                    if seq.finish is not None:
                        raise_if_failed([seq])
                    lp = None
                    if logprobs is not None and (delta or seq.finish is not None):
                        lp = completion_logprobs(seq, seq.logprobs[seen:], None)
                        seen = len(seq.logprobs)
                    if delta or seq.finish is not None:
                        yield _sse(_completion_chunk(rid, created, served.name, delta, seq.finish, lp))

            def usage() -> dict:
                return _usage_chunk(rid, created, served.name, "text_completion", usage_prompt, seqs)

            return stream(seq, chunks(), usage if p.include_usage else None)

        await collect(request, seqs)
        raise_if_failed(seqs)
        choices = []
        for i, s in enumerate(seqs):
            text = (echo_text(i) if echo else "") + s.text
            lp = completion_logprobs(s, s.logprobs, prompts[i] if echo else None) if logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": s.finish})
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": served.name, "choices": choices,
            "usage": _usage(usage_prompt, seqs),
        })  # fmt: skip

    # ---- /v1/chat/completions ----

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = parse_json(await request.body())
        check_keys(body, CHAT_KEYS)
        p = Params(body, served, max_len)
        prompt = render_messages(body.get("messages"))
        ids = served.encode(prompt)
        want_lp = body.get("logprobs", False)
        if not isinstance(want_lp, bool):
            raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
        top = integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        default = max(1, min(256, max_len - len(ids)))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = max_tokens_of(body, key, default, 1, max_len)
        seqs = start([(ids, max_tokens)], p, logprobs=top if want_lp else None, echo_lp=False, stops=p.stops)
        seq, rid, created = seqs[0], f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chat_logprobs(entries: list) -> dict[str, Any] | None:
            if not want_lp:
                return None
            content = []
            for tok, lp, alt in entries:
                text = served.token_text(tok)
                content.append({
                    "token": text, "logprob": lp, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": served.token_text(k), "logprob": v,
                                      "bytes": list(served.token_text(k).encode())} for k, v in (alt or {}).items()],
                })  # fmt: skip
            return {"content": content}

        if p.stream:

            async def chunks() -> AsyncIterator[str]:
                yield _sse(_chat_chunk(rid, created, served.name, {"role": "assistant", "content": ""}, None))
                seen = 0
                while (delta := await seq.next_delta()) is not None:
                    if seq.finish is not None:
                        raise_if_failed([seq])
                    lp = chat_logprobs(seq.logprobs[seen:])
                    seen = len(seq.logprobs)
                    if delta:
                        yield _sse(_chat_chunk(rid, created, served.name, {"content": delta}, None, lp))
                    if seq.finish is not None:
                        yield _sse(_chat_chunk(rid, created, served.name, {}, seq.finish))

            def usage() -> dict:
                return _usage_chunk(rid, created, served.name, "chat.completion.chunk", len(ids), seqs)

            return stream(seq, chunks(), usage if p.include_usage else None)

        await collect(request, seqs)
        raise_if_failed(seqs)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": served.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": seq.text},
                         "logprobs": chat_logprobs(seq.logprobs), "finish_reason": seq.finish}],
            "usage": _usage(len(ids), seqs),
        })  # fmt: skip

    # ---- the rest ----

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "engramlm",
                                            "max_model_len": max_len, "tier": served.tier}]}  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_json(await request.body())
        check_keys(body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"})
        special = body.get("add_special_tokens", True)
        if "messages" in body:
            text = render_messages(body["messages"], bool(body.get("add_generation_prompt", True)))
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise APIError(400, "'prompt' must be a string", param="prompt")
        tokens = served.encode(text, special=bool(special))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_json(await request.body())
        check_keys(body, {"model", "tokens"})
        tokens = body.get("tokens")
        vocab = served.engine.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
        return {"prompt": served.decode(tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        eos = served.eos[0] if served.eos else None
        return {
            "tokenizer_class": "tokenizers.Tokenizer", "model_max_length": max_len,
            "bos_token": served.special(served.bos[0] if served.bos else None), "eos_token": served.special(eos),
            "pad_token": served.special(served.engine.pad_id), "chat_template": PLAIN_CHAT_JINJA,
            "vocab_size": served.engine.vocab_size,
        }  # fmt: skip

    @app.get("/health")
    async def health() -> Response:
        if state["draining"]:
            return _error(503, "draining", type="server_error", code="shutting_down")
        return JSONResponse({"status": "ok", "running": scheduler.batch_size, "waiting": scheduler.queue_length})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(_CountRequests, metrics=metrics, known={r.path for r in app.routes})
    return app


class _CountRequests:
    """Count requests by endpoint and status (plain ASGI: a BaseHTTPMiddleware would buffer streamed
    responses and hide client disconnects from them)."""

    def __init__(self, app: Any, metrics: ServeMetrics, known: set[str]) -> None:
        self.app, self.metrics, self.known = app, metrics, known

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.known else "other"

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(path, message["status"])
            await send(message)

        await self.app(scope, receive, send_counted)


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc)}\n\n"


def _usage(prompt_tokens: int, seqs: list[_Sequence]) -> dict[str, int]:
    done = sum(len(s.ids) for s in seqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


def _usage_chunk(rid: str, created: int, model: str, obj: str, prompt_tokens: int, seqs: list[_Sequence]) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": _usage(prompt_tokens, seqs)}  # fmt: skip


def _completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None, lp: Any = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}  # fmt: skip


def _chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None, lp: Any = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}  # fmt: skip
