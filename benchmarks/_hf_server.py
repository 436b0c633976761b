"""The baseline ``bench_serve`` compares against: what a user writes without a serving engine.

A HF transformers causal LM behind the same HTTP stack (FastAPI + uvicorn, OpenAI ``/v1/completions``
with SSE streaming), each request one ``model.generate()`` call in a worker thread, one at a time (a lock:
concurrent ``generate`` calls on one CPU model only fight over the cores), tokens streamed one by one
through a :class:`transformers.generation.streamers.BaseStreamer`.

Run: ``python -m benchmarks._hf_server --model DIR --tokenizer tokenizer.json --port 8001``.
"""

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Any

import torch


def build_app(model: Any, tok: Any, name: str, bos: list[int]) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    app = FastAPI()
    lock = threading.Lock()

    class Tokens(BaseStreamer):
        """Each new token id into an asyncio queue (the first ``put`` is the prompt)."""

        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, t)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def generate(ids: list[int], max_tokens: int, streamer: Tokens) -> None:
        with lock, torch.inference_mode():
            model.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                streamer=streamer, pad_token_id=0,
            )  # fmt: skip

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = json.loads(await request.body())
        ids = bos + tok.encode(body["prompt"]).ids
        max_tokens = int(body.get("max_tokens", 16))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        worker = loop.run_in_executor(None, generate, ids, max_tokens, Tokens(loop, queue))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        async def events() -> Any:
            out: list[int] = []
            sent = 0
            while (t := await queue.get()) is not None:
                out.append(t)
                text = tok.decode(out)
                if not text.endswith("\ufffd"):
                    chunk = {"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": [{"index": 0, "text": text[sent:], "finish_reason": None}]}  # fmt: skip
                    sent = len(text)
                    yield f"data: {json.dumps(chunk)}\n\n"
            await worker
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
            yield f"data: {json.dumps({'id': rid, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        chunks = [c async for c in events()]
        text = "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks[:-2])
        return JSONResponse({"id": rid, "object": "text_completion", "model": name,
                             "choices": [{"index": 0, "text": text, "finish_reason": "length"}]})  # fmt: skip

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a transformers save_pretrained directory")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="bench")
    ap.add_argument("--bos", type=int, default=0, help="prepended to every prompt (-1: none)")
    args = ap.parse_args()
    import uvicorn
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = Tokenizer.from_file(args.tokenizer)
    app = build_app(model, tok, args.name, [] if args.bos < 0 else [args.bos])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
