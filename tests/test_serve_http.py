"""``engramlm serve`` with real clients: the ``openai`` package and plain HTTP against real uvicorn on a free
localhost port (a thread here; a subprocess for SIGTERM), a saved model with a project BPE."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import pytest
import torch

from engramlm.data.tokenizer import BOS_ID, EOS_ID, save_tokenizer, train_tokenizer
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.infer import Engine, SamplingParams
from engramlm.infer.tables import export_model_tables
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import load_pretrained, save_pretrained
from engramlm.models.locate import locate_model
from engramlm.models.model import EngramLM

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from engramlm.serve.app import create_app  # noqa: E402
from engramlm.serve.served import load_served  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPTS = [
    "The hashed n-gram tables",
    "Engram",
    "A store directory holds one file per layer and the rows of every table",
    "decode",
    "The scheduler admits new requests",
    "Prefetch",
    "Rows come from any tier: memory, mmap, direct",
    "tokens",
]
MAX_LEN = 160

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    texts = [p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))]
    (root / "run").mkdir()
    tok_path = root / "run" / "tokenizer.json"
    save_tokenizer(train_tokenizer(texts, vocab_size=400), tok_path)
    cmap = CompressionMap.from_tokenizer(tok_path)
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(257, 263), layer_ids=(1,), pad_id=2)
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size, hidden_size=32, num_layers=2, n_heads=2, mlp_hidden=48, hc_mult=2,
        max_seq_len=MAX_LEN, engram=EngramConfig(hash=spec, head_dim=8, conv_zero_init=False),
    )  # fmt: skip
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(spec, cmap))
    with torch.no_grad():
        model.engram_layers[1].embed.weight.mul_(4.0)  # rows that matter for the argmax
    save_pretrained(model, root / "run" / "model")
    sha = locate_model(root / "run" / "model").weights_sha256()
    export_model_tables(model, root / "run" / "store", model_sha256=sha)
    return {"model": root / "run" / "model", "store": root / "run" / "store", "tok": tok_path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """Real uvicorn on a free localhost port, in a thread; stopped (gracefully) on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def server(saved: dict[str, Path]) -> Iterator[tuple[str, object]]:
    served = load_served(saved["model"], name="tiny")
    app = create_app(served, max_batch=8, max_queue=16)
    with serving(app) as url:
        yield url, served
    served.close()


@pytest.fixture(scope="module")
def reference(saved: dict[str, Path]) -> dict[str, list[int]]:
    """What ``engramlm generate --max-new-tokens 12`` computes for each prompt (BOS + text, EOS stops)."""
    from engramlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(saved["tok"])
    with Engine(load_pretrained(saved["model"])) as eng:
        params = SamplingParams(12, stop_tokens=(EOS_ID,))
        return {p: eng.generate([[BOS_ID, *tok.encode(p).ids]], params).tokens[0] for p in PROMPTS}


def full_logprobs(saved: dict[str, Path], ids: list[int]) -> torch.Tensor:
    model = load_pretrained(saved["model"]).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_openai_client_completions_equal_generate_alone_and_in_a_concurrent_batch(server, reference) -> None:
    url, served = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for p in PROMPTS[:2]:
        out = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0)
        assert out.choices[0].text == served.decode(reference[p])
        assert out.usage.completion_tokens == len(reference[p])

    async def concurrent() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none")

        async def one(p: str, delay: float) -> str:
            await asyncio.sleep(delay)  # staggered: later requests join a running batch
            stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        return await asyncio.gather(*(one(p, 0.01 * i) for i, p in enumerate(PROMPTS)))

    texts = asyncio.run(concurrent())
    assert texts == [served.decode(reference[p]) for p in PROMPTS]
    # a stop string ends the text before it (and frees the sequence)
    full = served.decode(reference[PROMPTS[2]])
    stop = full[len(full) // 2 :][:3]
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_chat_streaming_equals_non_streaming_with_the_plain_template(server) -> None:
    url, served = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a hashed table?"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and full.usage.completion_tokens > 0
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # the plain template: what /tokenize renders is what the model saw, and jinja renders the same text
    tokenized = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert full.usage.prompt_tokens == len(tokenized)
    jinja2 = pytest.importorskip("jinja2")
    info = httpx.get(f"{url}/tokenizer_info").json()
    rendered = jinja2.Template(info["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert tokenized == served.encode(rendered)
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens


def test_echo_logprobs_score_the_prompt_like_one_forward(server, saved) -> None:
    url, served = server
    ids = served.encode(PROMPTS[2])
    body = {"model": "tiny", "prompt": [ids, ids[:5]], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    doc = httpx.post(f"{url}/v1/completions", json=body).json()
    want = full_logprobs(saved, ids)
    first, second = sorted(doc["choices"], key=lambda c: c["index"])
    lps = first["logprobs"]["token_logprobs"]
    assert len(lps) == len(ids) + 1 and lps[0] is None  # prompt tokens, then the one generated
    torch.testing.assert_close(torch.tensor(lps[1 : len(ids)]), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(second["logprobs"]["token_logprobs"][1:5]), want[:4], atol=1e-4, rtol=1e-4)
    for lp, top in zip(lps[1:], first["logprobs"]["top_logprobs"][1:], strict=True):
        assert len(top) == 1 and max(top.values()) >= lp - 1e-6
    only = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ids, "max_tokens": 0}).json()
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lps[: len(ids)]
    assert only["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": "x " * MAX_LEN, "max_tokens": 4}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"model": "tiny", "prompt": "x", "tools": []}, 400, "tools"),
        ({"model": "tiny", "prompt": "x", "temperature": 9}, 400, "temperature"),
        ({"model": "tiny", "prompt": [[1, 99999]]}, 400, "prompt"),
        ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_endpoints(server) -> None:
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={
        "content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": ""}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="none").completions.create(model="gpt-4", prompt="x")


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_disconnect_mid_stream_frees_the_slot(server) -> None:
    url, _ = server
    before = _metric(httpx.get(f"{url}/metrics").text, 'engramlm_finished_requests_total{reason="cancelled"}')
    body = {"model": "tiny", "prompt": "x", "max_tokens": MAX_LEN - 10, "stream": True, "temperature": 1, "seed": 3}
    with httpx.Client(timeout=10) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in got)
        assert httpx.get(f"{url}/health").json()["running"] == 1
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["running"] != 0:
        assert time.monotonic() < deadline, "the slot of a closed stream was not freed"
        time.sleep(0.05)
    after = _metric(httpx.get(f"{url}/metrics").text, 'engramlm_finished_requests_total{reason="cancelled"}')
    assert after == before + 1


def test_metrics_and_tokenizer_endpoints(server) -> None:
    url, served = server
    text = httpx.get(f"{url}/metrics").text
    for name in ("engramlm_requests_total", "engramlm_generation_tokens_total", "engramlm_queue_length",
                 "engramlm_time_to_first_token_seconds_bucket", "engramlm_generation_tokens_per_second",
                 "engramlm_decode_step_seconds_count"):  # fmt: skip
        assert name in text
    assert _metric(text, "engramlm_generation_tokens_total") > 0
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "Engram rows", "add_special_tokens": False}).json()["tokens"]
    assert ids == served.tokenizer.encode("Engram rows", add_special_tokens=False).ids
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "Engram rows"
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["model_max_length"] == MAX_LEN


def test_full_queue_gets_429_with_retry_after_and_store_tier_serves_the_same(saved, reference) -> None:
    served = load_served(saved["model"], name="tiny", store=saved["store"], tier="mmap", cache_bytes=1 << 14)
    app = create_app(served, max_batch=1, max_queue=1)
    with serving(app) as url:
        out = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12,
                                                         "temperature": 0}).json()  # fmt: skip
        assert out["choices"][0]["text"] == served.decode(reference[PROMPTS[0]])

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"model": "tiny", "prompt": "x", "max_tokens": 100, "temperature": 1, "seed": 1}
                return await asyncio.gather(*(c.post(f"{url}/v1/completions", json=body) for _ in range(6)))

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        # capacity is one running + one queued: at most 2 of the 6 are served (1 when all arrive before the
        # first is admitted, as on a loaded machine), the rest are refused at once
        assert 1 <= codes.count(200) <= 2 and 429 in codes and set(codes) <= {200, 429}
        limited = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["code"] == "queue_full"
        metrics = httpx.get(f"{url}/metrics").text
        assert _metric(metrics, 'engramlm_table_bytes_read_total{layer="1",tier="mmap"}') > 0
        assert 'engramlm_table_cache_hit_rate{layer="1",tier="mmap"}' in metrics
    served.close()


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits(saved) -> None:
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engramlm", "serve", str(saved["model"]), "--port", str(port), "--threads", "1",
         "--served-model-name", "tiny"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "x", "max_tokens": 60, "stream": True, "temperature": 1, "seed": 5}
        chunks = []
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    if len(chunks) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert chunks[-1] == "[DONE]"
        last = json.loads(chunks[-2])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


LMEVAL_DOCS = [
    {"question": "The hashed n-gram", "choices": ["tables", "rows", "store"], "answer": 0},
    {"question": "Engram layers read rows from", "choices": ["a store", "the tokenizer"], "answer": 0},
    {"question": "The decode cache keeps", "choices": ["keys and values", "prefill", "tier"], "answer": 1},
]


@pytest.mark.slow
def test_lm_eval_local_completions_scores_loglikelihoods_offline(server, saved, tmp_path) -> None:
    """lm-evaluation-harness's ``local-completions`` (remote tokenizer: /tokenizer_info, /tokenize) scores a
    local multiple-choice task through /v1/completions echo + logprobs; each log-likelihood equals one forward."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    url, served = server
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in LMEVAL_DOCS), encoding="utf-8")
    (tmp_path / "tiny.yaml").write_text(
        f"task: engram_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{url}/v1/completions",
            "model": "tiny",
            "tokenizer_backend": "remote",
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=["engram_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    model = load_pretrained(saved["model"]).eval()
    right = 0
    for sample in out["samples"]["engram_tiny_mc"]:
        doc = sample["doc"]
        scores = []
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            ctx = served.encode(context, special=False)  # lm-eval's split: encode the whole, cut at the context
            whole = served.encode(context + continuation, special=False)
            ids = ctx + whole[len(ctx) :]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            want = float(lp[torch.arange(len(ctx) - 1, len(ids) - 1), torch.tensor(ids[len(ctx) :])].sum())
            assert resp[0][0] == pytest.approx(want, abs=1e-3)
            scores.append(want)
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert out["results"]["engram_tiny_mc"]["acc,none"] == pytest.approx(right / len(LMEVAL_DOCS))
