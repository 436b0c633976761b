"""Parsing and validating OpenAI request bodies: one :class:`APIError` (status, message, param, code) for
anything the server refuses, before anything reaches the scheduler. No web framework here."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from engramlm.infer.sampling import SamplingParams
from engramlm.serve.served import Served, render_plain_chat

RETRY_AFTER_S = 1
MAX_LOGPROBS = 5  # legacy completions: top-n per token (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat completions


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type, param, code, headers,
        )  # fmt: skip


# ---- request parsing ------------------------------------------------------------------------------

COMMON = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options", "stop", "n",
    "user", "presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos",
}  # fmt: skip
COMPLETION_KEYS = COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_KEYS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 ``invalid_json``."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    return body


def check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise APIError(400, f"Unsupported parameter: '{key}' is not supported by this server", param=key,
                           code="unsupported_parameter")  # fmt: skip


def number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"'{key}' must be a number, got {value!r}", param=key, code="invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise APIError(400, f"'{key}' must lie in {bound}, got {value!r}", param=key, code="invalid_value")
    return float(value)


def integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer, got {value!r}", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{key}' must lie in [{lo}, {hi}], got {value}", param=key, code="invalid_value")
    return value


def only_default(body: dict, key: str, ok: Callable[[Any], bool], what: str) -> None:
    if key in body and body[key] is not None and not ok(body[key]):
        raise APIError(400, f"Unsupported value: '{key}' supports only {what}", param=key, code="unsupported_value")


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return stops


class Params:
    """The parameters both endpoints share, validated."""

    def __init__(self, body: dict, served: Served, max_len: int) -> None:
        model = body.get("model")
        if model != served.name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{served.name}'",
                           param="model", code="model_not_found")  # fmt: skip
        only_default(body, "n", lambda v: v == 1, "n = 1")
        only_default(body, "best_of", lambda v: v == 1, "best_of = 1")
        only_default(body, "presence_penalty", lambda v: v == 0, "0")
        only_default(body, "frequency_penalty", lambda v: v == 0, "0")
        only_default(body, "logit_bias", lambda v: v == {}, "an empty map")
        only_default(body, "suffix", lambda v: v == "", "none")
        self.temperature = number(body, "temperature", 1.0, 0.0, 2.0)
        self.top_p = number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        self.top_k = integer(body, "top_k", 0, 0, 1 << 30)
        self.seed = integer(body, "seed", None, -(1 << 63), (1 << 63) - 1)
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise APIError(400, "'stream' must be a boolean", param="stream")
        self.stream = bool(stream)
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        self.include_usage = bool(opts.get("include_usage", False))
        self.stops = stop_strings(body)
        self.max_len = max_len
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: always generate max_tokens (benchmarks)
        if not isinstance(ignore_eos, bool):
            raise APIError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
        self.ignore_eos = ignore_eos

    def sampling(self, served: Served, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max(1, max_tokens), temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            stop_tokens=() if self.ignore_eos else served.eos, seed=self.seed,
        )  # fmt: skip


def max_tokens_of(body: dict, key: str, default: int, lo: int, max_len: int) -> int:
    return integer(body, key, default, lo, max_len - 1)


def prompts_of(body: dict, served: Served) -> tuple[list[list[int]], list[str | None]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of such lists."""
    prompt = body.get("prompt")
    bad = APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   param="prompt")  # fmt: skip
    if isinstance(prompt, str):
        return [served.encode(prompt)], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(isinstance(p, str) for p in prompt):
        return [served.encode(p) for p in prompt], list(prompt)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)], [None]
    if all(
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt
    ):
        return [list(p) for p in prompt], [None] * len(prompt)
    raise bad


def render_messages(messages: Any, add_generation_prompt: bool = True) -> str:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}]: needs a role of system, developer, user or assistant",
                           param=f"messages.{i}.role")  # fmt: skip
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content
            ):
                raise APIError(400, f"messages[{i}]: only text content parts are supported",
                               param=f"messages.{i}.content")  # fmt: skip
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}]: content must be a string", param=f"messages.{i}.content")
        flat.append({"role": m["role"], "content": content})
    return render_plain_chat(flat, add_generation_prompt)
