"""lm-evaluation-harness: the ``engramlm`` model, the offline tasks and ``engramlm eval --tasks``.

A prepared stdlib slice (real code, a 400-id project BPE) and a small saved engramlm model; every run
is offline (``HF_HUB_OFFLINE=1``, set by conftest) and scores the tasks this repository builds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from engramlm.cli import main as cli
from engramlm.data import prepare
from engramlm.data.tokenizer import BOS_ID, EOS_ID, load_tokenizer
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.hf.evaltasks import TASKS, build_tasks, cloze_examples, code_examples
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import load_pretrained, save_pretrained
from engramlm.models.model import EngramLM

SRC = str(Path(__file__).resolve().parents[1] / "src")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("harness")
    prep = root / "data"
    prepare("stdlib", prep, 400, max_bytes=60_000, progress=False, log=lambda s: None)
    cmap = CompressionMap.from_tokenizer(prep / "tokenizer.json")
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(257, 263), layer_ids=(1,), pad_id=2)
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size, hidden_size=32, num_layers=2, n_heads=2, mlp_hidden=48, hc_mult=2,
        max_seq_len=256, engram=EngramConfig(hash=spec, head_dim=8, conv_zero_init=False),
    )  # fmt: skip
    torch.manual_seed(0)
    save_pretrained(EngramLM(cfg, make_layout(spec, cmap)), root / "model")
    return {"root": root, "data": prep, "model": root / "model"}


def _direct_ll(model: EngramLM, context: list[int], target: list[int], max_length: int = 256) -> float:
    """log p(target | BOS, context) from one plain forward: the reference the harness must match (a row longer
    than max_length + 1 tokens keeps its last max_length + 1, as lm-eval's own HF model does)."""
    ids = torch.tensor([[BOS_ID, *context, *target][-(max_length + 1) :]])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
    n = min(len(target), ids.shape[1] - 1)
    return float(logp[-n:].gather(-1, ids[0, -n:, None]).sum())


def test_task_builders_are_deterministic_and_well_formed(setup: dict[str, Path], tmp_path: Path) -> None:
    a = build_tasks(setup["data"], tmp_path / "a", max_examples=20, split="test")
    b = build_tasks(setup["data"], tmp_path / "b", max_examples=20, split="test")
    assert a == b and set(a) == set(TASKS) and all(n > 0 for n in a.values())
    for task in TASKS:
        assert (tmp_path / "a" / f"{task}.jsonl").read_bytes() == (tmp_path / "b" / f"{task}.jsonl").read_bytes()
        assert str(tmp_path / "a" / f"{task}.jsonl") in (tmp_path / "a" / f"{task}.yaml").read_text()
    cloze = cloze_examples(["One two three. The cat sat on the mat. It was a sunny morning."])
    assert cloze == [{"context": "One two three. The cat sat on the mat. It was a sunny", "target": " morning"}]
    code = code_examples(['def f(x):\n    """Double x."""\n    y = 2 * x\n    return y\n'])
    assert code == [{"context": 'def f(x):\n    """Double x."""', "target": "\n    y = 2 * x\n    return y"}]


def test_harness_scores_match_a_direct_forward(setup: dict[str, Path], tmp_path: Path) -> None:
    from engramlm.hf.harness import EngramHarnessLM, evaluate_tasks

    tdir = tmp_path / "tasks"
    build_tasks(setup["data"], tdir, max_examples=5, split="test")  # this slice's val split holds no functions
    # Short documents (< 256 tokens) fit one window, so the rolling score is one forward after BOS.
    texts = [r["context"][:300] for r in map(json.loads, (tdir / "engram_cloze.jsonl").read_text().splitlines())]
    (tdir / "engram_bpb.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lm = EngramHarnessLM(run=str(setup["model"]), data=str(setup["data"]), batch_size=3)
    out = tmp_path / "results.json"
    doc = evaluate_tasks(lm, ["engramlm"], tdir, output=out)
    assert json.loads(out.read_text()) == doc
    res = doc["results"]
    model = load_pretrained(setup["model"])
    tok = load_tokenizer(setup["data"] / "tokenizer.json")

    nll = sum(-_direct_ll(model, [], tok.encode(t).ids) for t in texts)
    want_bpb = nll / (math.log(2) * sum(len(t.encode()) for t in texts))
    assert res["engram_bpb"]["bits_per_byte,none"] == pytest.approx(want_bpb, rel=1e-5)

    for task in ("engram_cloze", "engram_code"):
        rows = [json.loads(x) for x in (tdir / f"{task}.jsonl").read_text().splitlines()]
        lls = []
        for r in rows:  # lm-eval's split: encode the whole, the context's tokens are the prefix
            ctx, cont = r["context"], r["target"]
            whole, head = tok.encode(ctx + cont).ids, tok.encode(ctx).ids
            lls.append(_direct_ll(model, head, whole[len(head) :]))
        if task == "engram_cloze":
            assert res[task]["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-5)
        else:
            n_bytes = sum(len(r["target"].encode()) for r in rows)
            assert res[task]["bits_per_byte,none"] == pytest.approx(-sum(lls) / (math.log(2) * n_bytes), rel=1e-5)
        assert res[task]["sample_len"] == len(rows)


def test_rolling_windows_and_greedy_generation(setup: dict[str, Path]) -> None:
    from lm_eval.api.instance import Instance

    from engramlm.hf.harness import EngramHarnessLM
    from engramlm.infer import Engine, SamplingParams

    lm = EngramHarnessLM(run=str(setup["model"]), data=str(setup["data"]), max_length=16, batch_size=4)
    text = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
    n = len(lm.tok_encode(text))
    assert n > 40  # several 16-token windows
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    wide = EngramHarnessLM(run=str(setup["model"]), data=str(setup["data"]), max_length=256)
    (full,) = wide.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = lm.tok_encode(text)
    assert full == pytest.approx(_direct_ll(wide.model, [], ids), rel=1e-5)
    assert math.isfinite(rolled) and rolled != pytest.approx(full, rel=1e-6)  # 16-token windows lose context

    prompt = "import os\n"
    req = Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12}), 0)
    (got,) = wide.generate_until([req], disable_tqdm=True)
    with Engine(load_pretrained(setup["model"])) as eng:  # `engramlm generate`'s path: BOS + prompt, greedy
        toks = eng.generate([[BOS_ID, *lm.tok_encode(prompt)]], SamplingParams(12, stop_tokens=(EOS_ID,)))
    want = lm.tok_decode(toks.tokens[0])
    assert got == (want[: want.index("\n\n")] if "\n\n" in want else want)


def test_eval_cli_runs_the_tasks_and_writes_the_harness_json(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lm_eval.json"
    argv = ["eval", str(setup["model"]), "--data", str(setup["data"]), "--tasks", "engramlm", "--limit", "2",
            "--max-examples", "4", "--seq-len", "64", "--split", "test", "--task-dir", str(tmp_path / "t"),
            "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed == saved and set(saved["results"]) >= set(TASKS)
    assert saved["results"]["engram_cloze"]["sample_len"] == 2
    assert 0 < saved["results"]["engram_bpb"]["bits_per_byte,none"] < 20
    assert saved["config"]["model_source"] == "engramlm"


@pytest.mark.slow
def test_lm_eval_cli_with_the_engramlm_model(setup: dict[str, Path], tmp_path: Path) -> None:
    """``python -m engramlm.hf.harness`` is lm-eval's own CLI with ``--model engramlm`` registered."""
    tdir = tmp_path / "tasks"
    build_tasks(setup["data"], tdir, tasks=["engram_cloze"], max_examples=3)
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "engramlm.hf.harness", "run", "--model", "engramlm", "--model_args",
           f"run={setup['model']},data={setup['data']}", "--tasks", "engram_cloze", "--include_path", str(tdir),
           "--output_path", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())["results"]["engram_cloze"]
    assert res["sample_len"] == 3 and math.isfinite(res["perplexity,none"])
