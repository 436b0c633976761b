"""``engramlm generate``: a saved model with a project BPE, tables in the model or in a store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engramlm.cli.main import main
from engramlm.data.tokenizer import BOS_ID, EOS_ID, save_tokenizer, train_tokenizer
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.infer import Engine, SamplingParams
from engramlm.infer.tables import export_model_tables
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import save_pretrained
from engramlm.models.model import EngramLM

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROMPT = "The hashed n-gram tables"


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(path: Path, texts: list[str], vocab: int) -> Path:
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab), path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run-like layout: data/tokenizer.json, run/model (save_pretrained), run/store (store dir)."""
    root = tmp_path_factory.mktemp("gen")
    texts = [p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))]
    (root / "data").mkdir()
    tok_path = _tokenizer(root / "data" / "tokenizer.json", texts, 400)
    other = _tokenizer(root / "other.json", texts[:1], 300)
    cmap = CompressionMap.from_tokenizer(tok_path)
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(257, 263), layer_ids=(1,), pad_id=2)
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size,
        hidden_size=32,
        num_layers=2,
        n_heads=2,
        mlp_hidden=48,
        hc_mult=2,
        engram=EngramConfig(hash=spec, head_dim=8, conv_zero_init=False),
    )
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(spec, cmap))
    save_pretrained(model, root / "run" / "model")
    export_model_tables(model, root / "run" / "store")
    return {"root": root, "model": root / "run" / "model", "store": root / "run" / "store", "tok": tok_path,
            "other": other}  # fmt: skip


def _generate(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["generate", "--json", "--max-new-tokens", "8", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_matches_engine_and_finds_the_training_tokenizer(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tokenizer sits with the data, not with the model: found via a copy next to the run.
    (saved["model"].parent / "tokenizer.json").write_bytes(saved["tok"].read_bytes())
    doc = _generate(capsys, str(saved["model"]), "--prompt", PROMPT)
    assert Path(doc["tokenizer"]) == saved["model"].parent / "tokenizer.json"
    from engramlm.data.tokenizer import load_tokenizer
    from engramlm.models.io import load_pretrained

    tok = load_tokenizer(saved["tok"])
    with Engine(load_pretrained(saved["model"])) as eng:
        want = eng.generate([[BOS_ID, *tok.encode(PROMPT).ids]], SamplingParams(8, stop_tokens=(EOS_ID,))).tokens[0]
    out = doc["outputs"][0]
    assert out["tokens"] == want and out["text"] == tok.decode(want) and len(want) > 0
    assert doc["stats"]["new_tokens"] == len(want)
    for tier in ("mmap", "direct"):
        stored = _generate(capsys, str(saved["model"]), "--prompt", PROMPT, "--store", str(saved["store"]),
                           "--tier", tier, "--cache-mb", "0.01")  # fmt: skip
        assert stored["outputs"][0]["tokens"] == want
        assert set(stored["stats"]["wait_seconds"]) == {"1"}


def test_generate_refuses_a_tokenizer_the_tables_were_not_hashed_with(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", str(saved["model"]), "--prompt", PROMPT, "--tokenizer", str(saved["other"])])
    assert code == 2
    assert "sha256" in capsys.readouterr().err


def test_generate_streams_text(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", str(saved["model"]), "--prompt", PROMPT, "--tokenizer", str(saved["tok"])]
    assert main([*args, "--max-new-tokens", "6", "--stream", "--no-echo", "--temperature", "0.8", "--seed", "1"]) == 0
    streamed = capsys.readouterr().out
    doc = _generate(capsys, *args[1:], "--temperature", "0.8", "--seed", "1", "--max-new-tokens", "6")
    text = doc["outputs"][0]["text"]
    assert len(doc["outputs"][0]["tokens"]) == 6 and streamed == text + "\n"


def test_find_tokenizer_skips_a_nearby_wrong_one_and_refuses_a_named_one(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    from engramlm.errors import ConfigError, HashSpecMismatch
    from engramlm.models.io import load_pretrained
    from engramlm.models.locate import find_tokenizer

    run = tmp_path / "run"
    shutil.copytree(saved["model"], run / "model")
    model = load_pretrained(run / "model")
    (run / "model" / "tokenizer.json").write_bytes(saved["other"].read_bytes())  # nearest, but not the one
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        find_tokenizer(run / "model", model)
    (run / "tokenizer.json").write_bytes(saved["tok"].read_bytes())
    assert find_tokenizer(run / "model", model) == run / "tokenizer.json"
    assert find_tokenizer(run / "model", model, explicit=saved["tok"]) == saved["tok"]
    wrong_data = tmp_path / "data"
    wrong_data.mkdir()
    (wrong_data / "tokenizer.json").write_bytes(saved["other"].read_bytes())
    with pytest.raises(HashSpecMismatch, match="compression map"):
        find_tokenizer(run / "model", model, data=wrong_data)
