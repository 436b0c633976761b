"""Exact resume: a real `engramlm train` process killed with SIGKILL mid-run, then resumed, must
reproduce the uninterrupted run's per-step losses bit for bit; and clear errors for corrupt
checkpoints, a different hash spec, missing data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engramlm.data import prepare
from engramlm.errors import ConfigError, CorruptFileError, HashSpecMismatch
from engramlm.models.locate import list_checkpoints
from engramlm.train import Trainer, load_train_config, read_metrics
from helpers import run_toml

STEPS, EVERY = 60, 15
TOML = (
    run_toml(STEPS, EVERY, keep=2, eval_every=20, seed=5, eval_max_batches=2)
    + """[model]
preset = "tiny"
[model.overrides]
vocab_size = 400
hidden_size = 64
num_layers = 3
n_heads = 2
mlp_hidden = 96
hc_mult = 1
"engram.hash.engram_vocab_size" = [1500, 1500]
"engram.head_dim" = 16
[model.overrides.moe]
n_routed = 4
top_k = 2
expert_hidden = 32
n_dense_layers = 1
[schedule]
warmup_steps = 10
"""
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    prepare("stdlib", root / "prep", 400, max_bytes=80_000, progress=False)
    cfg = root / "run.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{root / "prep"}"'))
    return root, cfg


def _losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engramlm", *args]


def test_sigkill_then_resume_is_bitwise_identical(setup: tuple[Path, Path]) -> None:
    root, cfg = setup
    torch.set_num_threads(1)
    ref_dir, run_dir = root / "ref", root / "killed"
    Trainer(load_train_config(cfg, [f"out_dir={ref_dir}"])).fit()
    ref = _losses(ref_dir)
    assert len([r for r in ref if r[0] == "train"]) == STEPS

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(_cli("train", "--config", str(cfg), f"out_dir={run_dir}"), env=env)
    try:
        deadline = time.monotonic() + 900  # generous: loaded machines are slow
        while time.monotonic() < deadline and proc.poll() is None:
            done = [int(p.name[5:]) for p in list_checkpoints(run_dir)]
            recs = read_metrics(run_dir)
            if done and recs and recs[-1]["step"] >= done[-1] + 4:  # a checkpoint and some steps after it
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait()
    assert rc == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    killed_at = read_metrics(run_dir)[-1]["step"]
    last_ckpt = int(list_checkpoints(run_dir)[-1].name[5:])
    assert last_ckpt < killed_at < STEPS

    resumed = Trainer(load_train_config(cfg, [f"out_dir={run_dir}"]), resume=True)  # (the CLI path: test_train_cli)
    assert resumed.step == last_ckpt
    assert resumed.fit()["steps"] == STEPS
    assert _losses(run_dir) == ref  # every train and eval loss, bit for bit, no duplicates
    final = f"checkpoints/step_{STEPS:08d}/model/model.safetensors"
    got, want = load_file(run_dir / final), load_file(ref_dir / final)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert len(list_checkpoints(run_dir)) == 2  # keep_checkpoints


def test_resume_refuses_other_hash_spec_config_and_corruption(setup: tuple[Path, Path]) -> None:
    root, cfg = setup
    run = root / "short"
    Trainer(load_train_config(cfg, [f"out_dir={run}", "steps=3", "checkpoint_every=3"])).fit()
    base = [f"out_dir={run}", "steps=3", "checkpoint_every=3"]
    with pytest.raises(HashSpecMismatch):
        Trainer(load_train_config(cfg, [*base, "model.overrides.engram.hash.seed=7"]), resume=True)
    with pytest.raises(ConfigError, match=r"resume: .*optim\.lr"):
        Trainer(load_train_config(cfg, [*base, "optim.lr=0.01"]), resume=True)
    with pytest.raises(CorruptFileError):
        Trainer(load_train_config(cfg, [f"out_dir={root / 'nothing'}", "steps=3"]), resume=True)
    ckpt = list_checkpoints(run)[-1]
    blob = ckpt / "optimizer.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="sha256"):
        Trainer(load_train_config(cfg, base), resume=True)


def test_missing_data_and_vocab_errors(setup: tuple[Path, Path], tmp_path: Path) -> None:
    _, cfg = setup
    with pytest.raises(ConfigError, match=r"^data\.dir"):
        Trainer(load_train_config(cfg, [f"data.dir={tmp_path}", f"out_dir={tmp_path / 'r'}"]))
    with pytest.raises(ConfigError, match="vocab_size"):
        Trainer(load_train_config(cfg, ["model.overrides.vocab_size=300", f"out_dir={tmp_path / 'r'}"]))


def test_checkpoint_that_predates_a_config_field_resumes_as_it_ran(setup: tuple[Path, Path]) -> None:
    """A checkpoint written before ``optim.muon_ns_*`` existed has no such keys in its stored config: resume
    must fill them with the values it trained with (not refuse it as "differs", not take a newer default)."""
    import json
    import shutil

    root, cfg = setup
    ref, old = root / "legacy_ref", root / "legacy"
    base = ["steps=4", "checkpoint_every=2", "keep_checkpoints=2"]
    before = ["optim.muon_ns_schedule=quintic", "optim.muon_ns_dtype=fp32", "optim.muon_ns_steps=5"]  # old defaults
    Trainer(load_train_config(cfg, [*base, *before, f"out_dir={ref}"])).fit()
    shutil.copytree(ref, old)
    shutil.rmtree(old / "checkpoints" / "step_00000004")
    state_file = old / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("muon_ns_dtype", "muon_ns_schedule"):
        del state["config"]["optim"][key]
    state_file.write_text(json.dumps(state))

    # today's defaults (4 polar_express steps in bf16) would change the trajectory: refused, naming what it ran with
    with pytest.raises(ConfigError, match=r"optim\.muon_ns_schedule='quintic' \(now 'polar_express'\)"):
        Trainer(load_train_config(cfg, [*base, f"out_dir={old}"]), resume=True)
    resumed = Trainer(load_train_config(cfg, [*base, *before, f"out_dir={old}"]), resume=True)
    assert resumed.step == 2
    resumed.fit()
    assert _losses(old) == _losses(ref)
    # the CLI's `--resume PATH` without --config builds the config from the stored one the same way
    ckpt, cli_run = old / "checkpoints" / "step_00000002", root / "legacy_cli"
    proc = subprocess.run(
        _cli("train", "--resume", str(ckpt), f"out_dir={cli_run}", "--no-progress"),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r for r in _losses(cli_run) if r[1] > 2] == [r for r in _losses(ref) if r[1] > 2]


def test_every_config_field_added_since_the_first_format_says_how_old_checkpoints_resume() -> None:
    """A field added to TrainConfig must either not change the trajectory (RESUME_FREE) or name the value old
    checkpoints trained with (ADDED_LATER); otherwise every older checkpoint would be refused or changed."""
    from engramlm.train.config import ADDED_LATER
    from engramlm.train.trainer import RESUME_FREE

    first_format = {  # the top-level fields and sections of the config the first checkpoints stored
        "data", "model", "optim", "schedule", "steps", "tokens", "seed", "out_dir", "checkpoint_every",
        "keep_checkpoints", "eval_every", "log_every", "threads", "tensorboard", "progress",
    }  # fmt: skip
    first_optim = {"lr", "weight_decay", "betas", "eps", "use_muon", "muon_momentum", "muon_ns_steps",
                   "engram_lr_mult", "engram_weight_decay", "engram_eps", "clip"}  # fmt: skip
    now = load_train_config(None, ["data.dir=x", "steps=1"]).to_dict()
    added = [k for k in now if k not in first_format and k != "engram"]  # engram: the trainer's own default
    added += [f"optim.{k}" for k in now["optim"] if k not in first_optim]
    assert added, "the guard must see the fields added since (muon_ns_*, skip_nonfinite)"
    unexplained = [k for k in added if k not in ADDED_LATER and k not in RESUME_FREE]
    assert not unexplained, f"say in train.config.ADDED_LATER what older checkpoints used for {unexplained}"
