"""models.locate: resolving runs / checkpoints / saved models, and one tokenizer check with distinct errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from engramlm.data.tokenizer import save_tokenizer, train_tokenizer
from engramlm.errors import (
    ConfigError,
    CorruptFileError,
    CorruptModelFileError,
    ForeignTokenizerError,
    HashSpecMismatch,
    ModelNotFoundError,
    TokenizerNotFoundError,
)
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import save_pretrained
from engramlm.models.locate import (
    find_tokenizer,
    list_checkpoints,
    load_trained_model,
    locate_model,
    resolve_checkpoint,
    verify_tokenizer,
)
from engramlm.models.model import EngramLM
from engramlm.train.checkpoint import save_checkpoint

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _model(tok_path: Path, compression: bool = True) -> EngramLM:
    cmap = CompressionMap.from_tokenizer(tok_path, enabled=compression)
    spec = HashSpec(
        max_ngram_size=2,
        n_head_per_ngram=1,
        engram_vocab_size=(257,),
        layer_ids=(1,),
        pad_id=2,
        compression=compression,
    )
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size,
        hidden_size=16,
        num_layers=2,
        n_heads=2,
        mlp_hidden=32,
        hc_mult=1,
        engram=EngramConfig(hash=spec, head_dim=8),
    )
    torch.manual_seed(0)
    return EngramLM(cfg, make_layout(spec, cmap))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """data/tokenizer.json; saved/ (a bare saved model); run/ with two checkpoints naming data/ as their data."""
    root = tmp_path_factory.mktemp("locate")
    texts = [p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))]
    (root / "data").mkdir()
    tok = root / "data" / "tokenizer.json"
    save_tokenizer(train_tokenizer(texts, vocab_size=320), tok)
    other = root / "other.json"
    save_tokenizer(train_tokenizer(texts[:1], vocab_size=280), other)
    model = _model(tok)
    save_pretrained(model, root / "saved")
    state = {"config": {"data": {"dir": str(root / "data")}}}
    for step in (3, 6):
        save_checkpoint(root / "run", step, model, {}, state, keep=5)
    return {"root": root, "tok": tok, "other": other, "saved": root / "saved", "run": root / "run"}


def _copy_run(env: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(env["run"], dest)
    return dest


# ------------------------------------------------------------------------------------ resolving


def test_resolves_a_run_a_step_dir_and_a_saved_model(env: dict[str, Path]) -> None:
    run = env["run"]
    steps = list_checkpoints(run)
    assert [p.name for p in steps] == ["step_00000003", "step_00000006"]
    latest = steps[-1]
    for given in (run, latest):
        files = locate_model(given)
        assert files.model_dir == latest / "model" and files.checkpoint == latest and files.given == given
    older = locate_model(steps[0] / "model")  # a checkpoint's model/ still knows its checkpoint
    assert older.model_dir == steps[0] / "model" and older.checkpoint == steps[0]
    assert older.trainer_state()["step"] == 3
    saved = locate_model(env["saved"])
    assert saved.model_dir == env["saved"] and saved.checkpoint is None and saved.trainer_state() is None
    assert resolve_checkpoint(run) == latest and resolve_checkpoint(steps[0]) == steps[0]
    trained = load_trained_model(run)
    assert trained.step == 6 and not trained.model.training
    assert all(not p.requires_grad for p in trained.model.parameters())
    assert load_trained_model(env["saved"]).step is None


def test_not_a_model_is_its_own_error(env: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for p in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ModelNotFoundError, match=re.escape(str(p))):
            locate_model(p)
    with pytest.raises(ModelNotFoundError, match="neither a training checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------------ the three errors


def test_corrupt_missing_and_foreign_are_three_errors_naming_the_file(env: dict[str, Path], tmp_path: Path) -> None:
    model = load_trained_model(env["run"]).model
    errors = (CorruptModelFileError, TokenizerNotFoundError, ForeignTokenizerError)
    assert all(not issubclass(a, b) for a in errors for b in errors if a is not b)

    # corrupt: the trainer state the search reads is reported as corrupt, not as "no tokenizer"
    run = _copy_run(env, tmp_path / "corrupt_state")
    state = list_checkpoints(run)[-1] / "trainer_state.json"
    state.write_text(state.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    with pytest.raises(CorruptModelFileError, match=re.escape(str(state))):
        find_tokenizer(run, model)
    # corrupt: a tokenizer.json in the search path that does not parse
    run = _copy_run(env, tmp_path / "corrupt_tok")
    bad = run / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CorruptModelFileError, match=re.escape(str(bad))):
        find_tokenizer(run, model)

    # missing: a saved model far from any tokenizer
    lone = tmp_path / "lone" / "a" / "b" / "c" / "saved"
    shutil.copytree(env["saved"], lone)
    with pytest.raises(TokenizerNotFoundError, match=re.escape(str(lone))) as missing:
        find_tokenizer(lone, model)
    assert "mismatch" not in str(missing.value)
    # ... or only foreign ones near it: still missing, and they are listed
    (lone / "tokenizer.json").write_bytes(env["other"].read_bytes())
    with pytest.raises(TokenizerNotFoundError, match=re.escape(str(lone / "tokenizer.json"))):
        find_tokenizer(lone, model)

    # foreign: a tokenizer the caller names
    with pytest.raises(ForeignTokenizerError, match=re.escape(str(env["other"]))) as foreign:
        find_tokenizer(lone, model, explicit=env["other"])
    assert "compression map" in str(foreign.value)

    # and all three stay in the families callers already catch
    assert issubclass(CorruptModelFileError, CorruptFileError)
    assert issubclass(TokenizerNotFoundError, ConfigError)
    assert issubclass(ForeignTokenizerError, HashSpecMismatch)


def test_corrupt_weights_are_reported_with_their_file(env: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(env, tmp_path / "run")
    weights = list_checkpoints(run)[-1] / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CorruptModelFileError, match=re.escape(f"{weights}: sha256 does not match")):
        load_trained_model(run)
    saved = tmp_path / "saved"
    shutil.copytree(env["saved"], saved)
    (saved / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CorruptModelFileError, match=re.escape(str(saved / "model.safetensors"))):
        load_trained_model(saved)


# ------------------------------------------------------------------------------------ the one check


def test_found_via_the_checkpoint_data_and_checked_by_compression_map(env: dict[str, Path], tmp_path: Path) -> None:
    model = load_trained_model(env["run"]).model
    # the run holds no tokenizer: found through trainer_state.json's data.dir
    assert find_tokenizer(env["run"], model) == env["tok"]
    assert find_tokenizer(env["saved"], model, data=env["tok"].parent) == env["tok"]
    # the same tokenizer serialised differently (other bytes, other sha256) is the same tokenizer
    from tokenizers import Tokenizer

    compact = tmp_path / "compact.json"
    compact.write_text(Tokenizer.from_file(str(env["tok"])).to_str(pretty=False), encoding="utf-8")
    assert compact.read_bytes() != env["tok"].read_bytes()
    verify_tokenizer(model, compact)
    with pytest.raises(ForeignTokenizerError, match="fingerprint"):
        verify_tokenizer(model, env["other"])
    # a map without compression (P = id) hashes identically under any tokenizer whose ids fit
    plain = _model(env["tok"], compression=False)
    verify_tokenizer(plain, env["other"])


def test_checkpoint_state_is_read_by_the_resolver(env: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(env, tmp_path / "run")
    state_path = list_checkpoints(run)[-1] / "trainer_state.json"
    doc = json.loads(state_path.read_text(encoding="utf-8"))
    state_path.write_text(json.dumps({**doc, "format": "something else"}), encoding="utf-8")
    with pytest.raises(CorruptModelFileError, match=re.escape(str(state_path))):
        load_trained_model(run)
