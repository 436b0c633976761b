"""lm-evaluation-harness model ``engramlm``: a trained engramlm model scored by lm-eval 0.4.13.

``EngramHarnessLM`` (a ``TemplateLM``) loads a run directory, checkpoint or saved model through
:func:`engramlm.models.locate.load_trained_model` and the tokenizer it was trained with
(:func:`find_tokenizer`, the compression-map check), and implements:

* ``loglikelihood``: every context is conditioned on BOS, as the model saw each training document
  start; batches of right-padded rows (a causal model never reads the padding);
* ``loglikelihood_rolling``: the harness's disjoint rolling windows of ``max_length`` tokens, first
  window after BOS;
* ``generate_until``: greedy decoding through :class:`engramlm.infer.Engine` (the project's decode path,
  KV and Engram history cached), cut at the first stop string.

**Registration.** lm-eval 0.4.13 discovers no plugins: its registry holds the models it ships and
whatever is registered by an import in the same process (no entry-point group is scanned). Importing
this module registers ``engramlm``; from a shell, ``python -m engramlm.hf.harness`` is the lm-eval CLI
with it registered (``python -m engramlm.hf.harness run --model engramlm --model_args run=RUN ...``),
and ``engramlm eval RUN --tasks ...`` runs ``simple_evaluate`` in-process. The plain ``lm_eval`` script
cannot see it.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  # lm-eval imports its own models only while its registry is empty: ours must not hide them
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from engramlm.errors import ConfigError
from engramlm.utils.io import atomic_write_json

__all__ = ["EngramHarnessLM", "evaluate_tasks", "main"]


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("engramlm")
class EngramHarnessLM(TemplateLM):
    """``--model_args run=PATH[,tokenizer=PATH|NAME][,data=DIR][,max_length=N][,batch_size=N][,device=cpu]``."""

    def __init__(
        self,
        run: str | None = None,
        tokenizer: str | None = None,
        data: str | None = None,
        max_length: int | str | None = None,
        batch_size: int | str | None = 8,
        device: str | None = "cpu",
        threads: int | str | None = None,
        max_gen_toks: int | str = 64,
        **_: Any,
    ) -> None:
        super().__init__()
        from engramlm.data.tokenizer import BOS_ID, EOS_ID
        from engramlm.models.locate import find_tokenizer, load_trained_model, read_tokenizer

        if not run:
            raise ConfigError("run: --model_args run=PATH is required (run directory, checkpoint or saved model)")
        if threads is not None:
            torch.set_num_threads(int(threads))
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda:0
            warnings.warn(f"device {device!r}: no CUDA device here; scoring on the CPU", RuntimeWarning, stacklevel=2)
            device = "cpu"
        self.trained = load_trained_model(run, map_location=device)
        self.model = self.trained.model
        tok_path = find_tokenizer(self.trained.files, self.model, explicit=tokenizer, data=data)
        self.tok = read_tokenizer(tok_path)
        self.tokenizer_path = tok_path
        self._device = torch.device(device)
        self.bos_id, self.eos_id = BOS_ID, EOS_ID
        self.max_length = int(max_length) if max_length else int(self.model.config.max_seq_len)
        self.batch_size = int(batch_size) if batch_size not in (None, "auto") else 8
        self.max_gen_toks = int(max_gen_toks)
        self.vocab = self.tok.get_vocab_size(with_added_tokens=True)

    # ---- TemplateLM ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_source": "engramlm",
            "model_name": str(self.trained.files.model_dir),
            "model_step": self.trained.step,
            "tokenizer": str(self.tokenizer_path),
            "hash_fingerprint": self.model.layout.fingerprint if self.model.layout is not None else None,
        }

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Per row (tokens, n): log-probability of the last n tokens given the ones before, and whether each
        of them is the argmax; rows of at most max_length + 1 tokens."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for at in range(0, len(order), self.batch_size):
            idx = order[at : at + self.batch_size]
            width = max(len(rows[i][0]) for i in idx) - 1
            x = torch.full((len(idx), width), self.eos_id, dtype=torch.long)
            for r, i in enumerate(idx):
                toks = rows[i][0]
                x[r, : len(toks) - 1] = torch.tensor(toks[:-1])
            logits = self.model(x.to(self._device)).logits.float()[..., : self.vocab]
            logp = F.log_softmax(logits, dim=-1).cpu()
            for r, i in enumerate(idx):
                toks, n = rows[i]
                end = len(toks) - 1
                target = torch.tensor(toks[end - n + 1 :])
                lp = logp[r, end - n : end]
                ll = float(lp.gather(-1, target[:, None]).sum())
                out[i] = (ll, bool((lp.argmax(-1) == target).all()))
        return out

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ConfigError("continuation: lm-eval asked to score an empty continuation")
            if not context or context[0] != self.bos_id:
                context = [self.bos_id, *context]
            toks = (context + continuation)[-(self.max_length + 1) :]
            rows.append((toks, min(len(continuation), len(toks) - 1)))  # a continuation past max_length: its tail
        results = []
        for at in tqdm(range(0, len(rows), 256), disable=disable_tqdm, desc="engramlm loglikelihood", unit="chunk"):
            part = self._score(rows[at : at + 256])
            for req, res in zip(requests[at : at + 256], part, strict=True):
                self.cache_hook.add_partial("loglikelihood", req[0], res)
            results.extend(part)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="engramlm rolling", unit="doc"):
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
                )
            ]
            scored = self._score([(ctx + cont, len(cont)) for ctx, cont in windows])
            total = sum(ll for ll, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from engramlm.infer import Engine, SamplingParams

        out = []
        with Engine(self.model) as engine:
            for req in tqdm(requests, disable=disable_tqdm, desc="engramlm generate", unit="req"):
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
                prompt = [self.bos_id, *self.tok_encode(context)]
                prompt = prompt[-max(1, self.max_length - max_new) :]
                params = SamplingParams(max_new_tokens=max_new, stop_tokens=(self.eos_id,))
                text = self.tok_decode(engine.generate([prompt], params).tokens[0])
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
                out.append(text)
        return out


def evaluate_tasks(
    run: str | Path | EngramHarnessLM,
    tasks: list[str],
    task_dir: str | Path,
    *,
    tokenizer: str | None = None,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    threads: int | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``run`` (a path, or a loaded :class:`EngramHarnessLM`) on ``tasks`` (names or
    tags found under ``task_dir``); the harness's result dict (samples dropped), also written atomically as JSON
    to ``output``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = run if isinstance(run, EngramHarnessLM) else EngramHarnessLM(
        run=str(run), tokenizer=tokenizer, data=None if data is None else str(data), max_length=max_length,
        batch_size=batch_size, threads=threads,
    )  # fmt: skip
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )  # fmt: skip
    if results is None:
        raise ConfigError("--tasks: lm-eval returned no results")
    results.pop("samples", None)
    doc = json.loads(json.dumps(results, default=str))
    if output is not None:
        atomic_write_json(output, doc)
    return doc


def main(argv: list[str] | None = None) -> None:
    """The lm-eval CLI with the ``engramlm`` model registered (this module is imported first)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
