"""benchmarks/_arms.run_arm: an interrupted arm resumes to the uninterrupted result bit for bit, a finished
arm is reused, and a changed config never silently reuses or resumes another config's run.

Why: the head-to-head, its why-sweep and the reproductions run for hours and are meant to be run in
pieces across sessions; a reused or resumed arm that differed from a fresh one would corrupt every table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import _arms as arms
from engramlm.data import prepare
from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ModelConfig(
    vocab_size=400, hidden_size=32, num_layers=2, n_heads=2, mlp_hidden=48, hc_mult=1, max_seq_len=64,
    engram=EngramConfig(hash=HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(101, 103),
                                      layer_ids=(1,), boundary_mode="reset"), head_dim=8),
)  # fmt: skip
BUDGET = {"batch": 2, "seq": 32, "warmup": 1, "steps": 8, "eval_tokens": 256}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("arms") / "stdlib"
    prepare("stdlib", out, 400, max_bytes=60_000, progress=False)
    return out


def test_interrupted_arm_resumes_exactly_and_finished_arm_is_reused(data: Path, tmp_path: Path) -> None:
    whole = arms.run_arm(MODEL, BUDGET, data, 0, tmp_path / "whole", 1)
    assert whole["resumed_from_step"] is None and "reused" not in whole

    part = tmp_path / "part"  # a run killed after its step-4 checkpoint
    assert arms.arm_status(MODEL, BUDGET, data, 0, part) == "new"
    tr = Trainer(arms.train_config(MODEL, BUDGET, data, 0, part, 1))
    for _ in range(4):
        tr.train_step()
    tr.save()
    assert arms.arm_status(MODEL, BUDGET, data, 0, part) == "at step 4"
    resumed = arms.run_arm(MODEL, BUDGET, data, 0, part, 1)
    assert arms.arm_status(MODEL, BUDGET, data, 0, part) == "done"
    assert arms.arm_status(MODEL, BUDGET, data, 0, part, optim={"engram_lr_mult": 1.0}) != "done"
    assert resumed["resumed_from_step"] == 4
    assert resumed["heldout"] == whole["heldout"] and resumed["final_train_loss"] == whole["final_train_loss"]
    # (the manual steps above logged nothing, so the resumed log holds steps 5-8 only)
    assert resumed["curve"] == whole["curve"][-len(resumed["curve"]) :] and len(resumed["curve"]) == 4

    again = arms.run_arm(MODEL, BUDGET, data, 0, part, 1)
    assert again["reused"] is True and again["heldout"] == whole["heldout"]
    # another config in the same directory: not reused, and its checkpoint is refused rather than resumed
    with pytest.raises(ConfigError, match="config differs"):
        arms.run_arm(MODEL, BUDGET, data, 0, part, 1, optim={"engram_lr_mult": 1.0})
    # a longer evaluation of the same training is recomputed from the final checkpoint, not reused
    longer = arms.run_arm(MODEL, {**BUDGET, "eval_tokens": 512}, data, 0, part, 1)
    assert "reused" not in longer and longer["heldout"]["tokens"] > whole["heldout"]["tokens"]


def test_training_seconds_adds_up_the_segments_of_a_resumed_run() -> None:
    rows = [{"elapsed_s": 1.0}, {"elapsed_s": 2.0}, {"elapsed_s": 0.5}, {"elapsed_s": 1.5}]
    assert arms.training_seconds(rows) == 3.5


def test_muon_numerics_version_is_part_of_the_result_key(data: Path, tmp_path: Path) -> None:
    from engramlm.train.muon import MUON_NUMERICS_VERSION

    muon = arms.train_config(MODEL, BUDGET, data, 0, tmp_path, 1)
    adamw = arms.train_config(MODEL, BUDGET, data, 0, tmp_path, 1, {"use_muon": False})
    assert arms._result_key(muon, BUDGET)["muon_numerics"] == MUON_NUMERICS_VERSION
    assert "muon_numerics" not in arms._result_key(adamw, BUDGET)  # AdamW-only arms keep their cached results
