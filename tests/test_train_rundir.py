"""The run directory is one run's, owned by one process: real `engramlm train` processes re-run into
a finished run (refused, or moved aside with --overwrite), run twice at once (the second fails fast),
killed with SIGKILL (no stale lock, orphans cleaned, --resume works), stopped with Ctrl-C (checkpoint,
exit 130); a diverging run stops without saving NaN; `data prepare` removes its own leftovers."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engramlm.cli.main import main
from engramlm.data import prepare
from engramlm.models.locate import list_checkpoints
from engramlm.train import Trainer, load_train_config, read_metrics
from engramlm.train.trainer import TrainingDiverged
from engramlm.utils.lock import DirLock, LockedError
from helpers import tiny_model_toml

TOML = """
steps = 6
checkpoint_every = 3
eval_every = 3
threads = 1
progress = false
tensorboard = false
[data]
batch_size = 4
seq_len = 32
eval_batch_size = 4
eval_max_batches = 1
""" + tiny_model_toml()
LONG = 400  # steps of a run that must outlive the start-up of a second process
SHORT = 100  # steps of a run that is signalled a few steps in
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rundir")
    prepare("stdlib", root / "prep", 400, max_bytes=40_000, progress=False)
    path = root / "c.toml"
    path.write_text(TOML.replace("[data]", f'[data]\ndir = "{root / "prep"}"'))
    return path


def _snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under ``d`` except the lock file."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engramlm", "train", *args]


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}; make it longer"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run) if r["kind"] == "train"]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("engramlm: error:")]


def test_rerun_is_refused_and_overwrite_moves_the_old_run_aside(cfg: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), f"out_dir={run}"]) == 0
    (run / "analysis" / "gates").mkdir(parents=True)  # what `analyze` writes about this run by default
    (run / "analysis" / "gates" / "gates.json").write_text("{}")
    before = _snapshot(run)
    capsys.readouterr()

    assert main(["train", "--config", str(cfg), f"out_dir={run}"]) == 2  # no --resume, no --overwrite
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "already holds a run" in err and "--overwrite" in err, err
    assert _snapshot(run) == before  # untouched: metrics not emptied, checkpoints not pruned

    assert main(["train", "--config", str(cfg), f"out_dir={run}", "--overwrite"]) == 0
    capsys.readouterr()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert _snapshot(aside) == before  # the old run, complete and unchanged, beside the new one
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    assert _train_steps(run) == list(range(1, 7))


def test_resume_from_an_older_checkpoint_does_not_mix_runs(cfg: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), f"out_dir={run}"]) == 0
    older = list_checkpoints(run)[0]
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), f"out_dir={run}", "--resume", str(older)]) == 2
    err = capsys.readouterr().err
    assert "newer than step_00000003" in err and len(_error_lines(err)) == 1, err
    assert _snapshot(run) == before

    assert main(["train", "--config", str(cfg), f"out_dir={run}", "--resume", str(older), "--overwrite"]) == 0
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert [p.name for p in list_checkpoints(aside)] == ["step_00000006"]
    assert _snapshot(aside)["metrics.jsonl"] == before["metrics.jsonl"]  # a copy: the record of the abandoned steps
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    assert _train_steps(run) == list(range(1, 7))


def test_two_concurrent_runs_the_second_fails_fast(cfg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--config", str(cfg), f"out_dir={run}", f"steps={LONG}", "checkpoint_every=100", "eval_every=0"]
    first = subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(read_metrics(run)) >= 2, first, "the first run logged")
        second = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=600)
        assert first.poll() is None, "the first run finished before the second started; make it longer"
        out, err = first.communicate(timeout=900)
    finally:
        first.kill()
    assert second.returncode == 2 and second.stdout == "", second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run) in lines[0] and f"pid {first.pid}" in lines[0], second.stderr
    assert first.returncode == 0, err
    assert json.loads(out)["steps"] == LONG
    assert _train_steps(run) == list(range(1, LONG + 1))
    assert [p.name for p in list_checkpoints(run)] == [f"step_{s:08d}" for s in (200, 300, LONG)]


def test_sigkill_leaves_no_stale_lock_and_orphans_are_cleaned(cfg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--config", str(cfg), f"out_dir={run}", f"steps={SHORT}", "checkpoint_every=20", "eval_every=0"]
    proc = subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: bool(list_checkpoints(run)) and len(read_metrics(run)) >= 25, proc, "a checkpoint")
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait()
    assert rc == -signal.SIGKILL
    # what interrupted writes leave: a half-built and a half-deleted checkpoint, an atomic-write temp file
    ck = run / "checkpoints"
    orphans = [ck / ".tmp-step_00000099-abc123", ck / ".trash-step_00000001-4242", run / ".metrics.jsonl.x1y2.tmp"]
    for p in orphans[:2]:
        (p / "model").mkdir(parents=True)
        (p / "model" / "model.safetensors").write_bytes(b"\0" * 1024)
    orphans[2].write_text("torn")
    keep = run / "notes.txt"  # not ours: left alone
    keep.write_text("mine")
    before = _snapshot(run)

    rerun = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 2 and "already holds a run" in rerun.stderr and "--resume" in rerun.stderr, rerun
    assert "in use" not in rerun.stderr  # the killed process's lock died with it
    assert len(_error_lines(rerun.stderr)) == 1, rerun.stderr
    assert {k: v for k, v in _snapshot(run).items() if "tmp" not in k and "trash" not in k} == {
        k: v for k, v in before.items() if "tmp" not in k and "trash" not in k
    }

    resumed = subprocess.run(_cli(*args, "--resume"), env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == SHORT
    assert not any(p.exists() for p in orphans) and keep.read_text() == "mine"
    assert _train_steps(run) == list(range(1, SHORT + 1))


def test_ctrl_c_saves_a_checkpoint_and_exits_130(cfg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--config", str(cfg), f"out_dir={run}", f"steps={SHORT}", "checkpoint_every=1000", "eval_every=0"]
    proc = subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(read_metrics(run)) >= 3, proc, "the run logged")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out == "", err
    (ckpt,) = list_checkpoints(run)
    step = int(ckpt.name[5:])
    assert 3 <= step < SHORT and f"engramlm train --resume {run}" in err.strip().splitlines()[-1], err
    assert _train_steps(run) == list(range(1, step + 1))  # nothing logged beyond the saved step, nothing lost

    resumed = subprocess.run(_cli("--resume", str(run)), env=ENV, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert _train_steps(run) == list(range(1, SHORT + 1))


def _nan_grad_at(tr: Trainer, step: int) -> None:
    """A NaN gradient in one parameter at ``step`` (1-based), as a blown-up batch would give."""
    p = next(iter(tr.model.parameters()))
    p.register_hook(lambda g: g * float("nan") if tr.step == step - 1 else g)


def test_divergence_stops_without_saving_nan_and_offers_the_remedies(cfg: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    tr = Trainer(load_train_config(cfg, [f"out_dir={run}", "checkpoint_every=2"]))
    _nan_grad_at(tr, 3)
    with pytest.raises(TrainingDiverged, match=r"step 3: training diverged .*step_00000002.*skip_nonfinite=N") as exc:
        tr.fit()
    assert "--allow-change optim.lr" in str(exc.value)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    text = (run / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text and _train_steps(run) == [1, 2]
    assert not (run / "summary.json").exists()
    # the remedies, through the CLI (the lock was released): a lower LR must be asked for explicitly
    assert main(["train", "--resume", str(run), "optim.lr=0.001"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "optim.lr=0.001", "--allow-change", "optim.lr"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["skipped_nonfinite"] == 0


MOE = ["model.overrides.moe.n_routed=4", "model.overrides.moe.top_k=2", "model.overrides.moe.expert_hidden=16"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_skip_nonfinite_skips_the_batch_and_goes_on(cfg: Path, tmp_path: Path, moe: bool) -> None:
    run = tmp_path / "run"
    extra = MOE if moe else []
    tr = Trainer(load_train_config(cfg, [f"out_dir={run}", "skip_nonfinite=1", "eval_every=0", *extra]))
    assert bool(tr.moes) == moe
    _nan_grad_at(tr, 3)
    for _ in range(2):
        tr.train_step()
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    summary = tr.fit()
    assert summary["steps"] == 6 and summary["skipped_nonfinite"] == 1 and summary["train_loss"] is not None
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["kind"] == "skipped"] == [3] and _train_steps(run) == [4, 5, 6]
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values() if v.is_floating_point())
    # the skipped step changed nothing: a fresh trainer stepped twice, then the same batch skipped, matches
    ref = Trainer(load_train_config(cfg, [f"out_dir={tmp_path / 'ref'}", "skip_nonfinite=1", *extra]))
    _nan_grad_at(ref, 3)
    for _ in range(3):
        ref.train_step()
    assert all(torch.equal(v, before[k]) for k, v in ref.model.state_dict().items())
    # a second one is over the limit
    tr2 = Trainer(load_train_config(cfg, [f"out_dir={tmp_path / 'two'}", "skip_nonfinite=1", *extra]))
    _nan_grad_at(tr2, 2)
    p = next(iter(tr2.model.parameters()))
    p.register_hook(lambda g: g * float("nan") if tr2.step == 3 else g)
    with pytest.raises(TrainingDiverged, match=r"step 4: .*1 batches skipped already"):
        tr2.fit()


def test_lock_is_exclusive_between_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    code = f"from engramlm.utils.lock import DirLock; DirLock({str(lock)!r}, 'x'); print('held', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(LockedError, match=rf"x is in use by another process \(pid {holder.pid}\)"):
            DirLock(lock, "x")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with DirLock(lock, "x") as mine:  # no stale lock after SIGKILL
            assert mine.held and lock.read_text().strip() == str(os.getpid())
            with DirLock(lock, "x") as again:  # shared within the process
                assert again.held
            assert mine.held
    finally:
        holder.kill()


def test_data_prepare_removes_only_its_own_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "prep"
    leftovers = [tmp_path / ".prep.build-ab12cd_3", tmp_path / ".prep.old-zz99yy00"]
    for p in leftovers:
        (p / "build").mkdir(parents=True)
    others = [tmp_path / ".other.build-ab12cd_3", tmp_path / ".prep.build-not-ours"]
    for p in others:
        p.mkdir()
    logs: list[str] = []
    prepare("stdlib", out, 400, max_bytes=20_000, progress=False, log=logs.append)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)
    assert sum("interrupted data prepare" in m for m in logs) == 2
    assert (out / "manifest.json").is_file()


def test_a_second_data_prepare_waits_for_the_first(tmp_path: Path) -> None:
    out = tmp_path / "prep"
    lock = tmp_path / ".prep.lock"
    code = (
        f"import time; from engramlm.utils.lock import DirLock; DirLock({str(lock)!r}, 'x'); "
        "print('held', flush=True); time.sleep(1.5)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        logs: list[str] = []
        prepare("stdlib", out, 400, max_bytes=20_000, progress=False, log=logs.append)
        assert holder.wait(timeout=60) == 0
        assert logs[0].startswith(f"waiting: data directory {out.resolve()} is in use by another process (pid")
    finally:
        holder.kill()
