"""Offline lm-evaluation-harness tasks built from a prepared corpus (local JSONL + YAML, no hub).

lm-eval 0.4.13 ships task YAMLs but no data, and every standard task points at the hub. These three
run from files this module writes (``dataset_path: json``, absolute ``data_files``), so they work with
``HF_HUB_OFFLINE=1``:

* ``engram_bpb`` (``loglikelihood_rolling``): whole held-out documents of the prepared corpus, decoded from
  its token shards; metrics bits per byte, byte and word perplexity (the harness's own aggregation).
* ``engram_cloze`` (``loglikelihood``, LAMBADA-style, data.md §5.2): passages of three sentences from the
  held-out documents; the target is the last word of the last sentence (alphabetic, at least 3 letters),
  the context the text before it; metrics accuracy of the greedy whole word and perplexity.
* ``engram_code`` (``loglikelihood``): held-out Python functions with a docstring; the context is the
  signature and docstring, the target the body; metrics bits per byte of the body and greedy accuracy.
  From the corpus's held-out documents when they hold such functions (the stdlib corpus), else from the
  installed stdlib's own held-out split (:func:`engramlm.data.corpora.load_corpus`, same split rule; ~9 s).

Everything is deterministic (sorted documents, evenly spaced picks), so two builds of the same corpus
write the same files. The tag ``engramlm`` runs all three.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.utils.io import atomic_write_text

__all__ = ["TASKS", "build_tasks", "code_results", "held_out_documents"]

TASKS = ("engram_bpb", "engram_cloze", "engram_code")
TAG = "engramlm"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?]$", re.S)


def held_out_documents(data: str | Path, split: str = "val") -> list[str]:
    """The texts of ``split``'s documents in a prepared corpus, decoded from its tokens (byte-level BPE
    round-trips, so this is the text the model was evaluated on; checked against the stored byte counts)."""
    import numpy as np

    from engramlm.data.dataset import TokenDataset
    from engramlm.data.tokenizer import load_tokenizer

    ds = TokenDataset(data, split)
    tok = load_tokenizer(Path(data) / "tokenizer.json")
    starts = [int(s) for s in np.asarray(ds.doc_offsets)] + [ds.n_tokens]
    tokens = np.asarray(ds.tokens)
    specials = {ds.bos_id, ds.eos_id, ds.pad_id}
    docs = []
    for i in range(len(starts) - 1):
        ids = [int(t) for t in tokens[starts[i] : starts[i + 1]] if int(t) not in specials]
        text = tok.decode(ids, skip_special_tokens=False)
        if len(text.encode("utf-8")) != int(ds.doc_bytes[i]):
            raise ConfigError(f"data: document {i} of {data} ({split}) does not decode to its recorded byte count")
        docs.append(text)
    return docs


def _spread(items: list[Any], limit: int | None) -> list[Any]:
    """``limit`` items evenly spaced over ``items`` (all when limit is None or larger)."""
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def cloze_examples(docs: Iterable[str], sentences: int = 3) -> list[dict[str, str]]:
    """LAMBADA-style examples: ``{"context", "target"}`` with target = " " + the passage's last word."""
    out = []
    for doc in docs:
        sents = [s.strip() for s in _SENTENCE.split(" ".join(doc.split())) if s.strip()]
        for i in range(sentences - 1, len(sents)):
            m = _LAST_WORD.match(sents[i])
            if m is None:
                continue
            context = " ".join([*sents[i - sentences + 1 : i], m.group(1)])
            out.append({"context": context, "target": " " + m.group(2)})
    return out


def code_examples(docs: Iterable[str], max_body_chars: int = 1500) -> list[dict[str, str]]:
    """``{"context", "target"}`` per function with a docstring: signature + docstring, then the body."""
    out = []
    for src in docs:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            doc_end = node.body[0].end_lineno
            if len(node.body) < 2 or doc_end is None or node.end_lineno is None:
                continue
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            context = "\n".join(lines[start - 1 : doc_end])
            body = "\n" + "\n".join(lines[doc_end : node.end_lineno])
            if body.strip() and len(body) <= max_body_chars:
                out.append({"context": context, "target": body})
    return out


def code_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    """process_results of ``engram_code``: bits per byte of the body (weighted over the task) and greedy match."""
    ll, greedy = results[0]
    return {"bits_per_byte": (ll, len(doc["target"].encode("utf-8"))), "acc": int(greedy)}


def _code_rows(data: Path, split: str, docs: list[str] | None) -> list[dict[str, str]]:
    """Code examples from the corpus's own held-out documents, else from the stdlib's held-out split."""
    rows = code_examples(docs if docs is not None else held_out_documents(data, split))
    if rows:
        return rows
    from engramlm.data.corpora import SourceSpec, load_corpus

    return code_examples(load_corpus(SourceSpec(kind="stdlib")).texts(split))


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


_YAML = {
    "engram_bpb": """task: engram_bpb
tag: [{tag}]
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
metadata:
  version: 1.0
""",
    "engram_cloze": """task: engram_cloze
tag: [{tag}]
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
""",
    "engram_code": """task: engram_code
tag: [{tag}]
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
process_results: !function engram_task_utils.code_results
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}
_UTILS = '''"""Written by engramlm.hf.evaltasks: the task functions lm-eval loads by file (``!function``)."""

from engramlm.hf.evaltasks import code_results  # noqa: F401
'''


def build_tasks(
    data: str | Path,
    out: str | Path,
    *,
    split: str = "val",
    tasks: Iterable[str] = TASKS,
    max_docs: int | None = None,
    max_examples: int | None = 500,
) -> dict[str, int]:
    """Write the JSONL and YAML of ``tasks`` for the prepared corpus ``data`` into ``out``; returns
    ``{task: examples}``. Pass ``out`` to lm-eval as ``--include_path`` (or ``TaskManager(include_path=)``)."""
    data, out = Path(data), Path(out)
    if not (data / "manifest.json").is_file():
        raise ConfigError(f"--data: {data} is not a prepared corpus (no manifest.json); run `engramlm data prepare`")
    wanted = list(dict.fromkeys(tasks))
    unknown = [t for t in wanted if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown task {unknown[0]!r}; allowed: {list(TASKS)} (or the tag {TAG!r})")
    out.mkdir(parents=True, exist_ok=True)
    docs = held_out_documents(data, split)
    counts: dict[str, int] = {}
    for task in wanted:
        if task == "engram_bpb":
            rows = [{"text": d} for d in _spread(docs, max_docs)]
        elif task == "engram_cloze":
            rows = _spread(cloze_examples(docs), max_examples)
        else:
            rows = _spread(_code_rows(data, split, docs), max_examples)
        if not rows:
            raise ConfigError(f"--tasks: {task} has no examples in the {split} split of {data}")
        _write_jsonl(out / f"{task}.jsonl", rows)
        atomic_write_text(
            out / f"{task}.yaml", _YAML[task].format(tag=TAG, data=json.dumps(str(out / f"{task}.jsonl")))
        )
        counts[task] = len(rows)
    atomic_write_text(out / "engram_task_utils.py", _UTILS)
    return counts


def bits_per_byte(loglikelihood: float, n_bytes: int) -> float:
    """-loglikelihood / (ln 2 * bytes): the harness's bits-per-byte for one scored text."""
    return -loglikelihood / (math.log(2) * n_bytes)
