"""What a user meets in the first hour, through the real ``engramlm`` command line (issue 15, item 10).

``eval`` shows progress; the training summary's held-out figure says it covers only the first
``data.eval_max_batches`` batches, ``eval``'s says it covers the whole split; ``generate --stream``
prints the prompt as the plain output does; ``analyze`` writes next to the run, never into the current
directory; published files follow the umask (not ``tempfile``'s 0600/0700); ``train`` says whether it
starts a run or resumes one, and from which step.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from engramlm.cli.main import main
from engramlm.models.locate import list_checkpoints
from engramlm.utils.io import atomic_write_json, current_umask, make_temp_dir
from helpers import tiny_model_toml

SRC = Path(__file__).resolve().parents[1] / "src"
TOML = """
steps = 4
checkpoint_every = 2
eval_every = 2
threads = 1
progress = false
[data]
dir = "{data}"
batch_size = 4
seq_len = 32
eval_batch_size = 2
eval_max_batches = 2
""" + tiny_model_toml()


def cli(*args: str, cwd: Path | None = None, umask: int = 0o022, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "engramlm", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        cwd=cwd,
        umask=umask,
        timeout=600,
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Under umask 022: prepare a corpus, train 4 steps (evals on 2 batches), build a store; all by the CLI."""
    root = tmp_path_factory.mktemp("first_hour")
    data, run, store = root / "data", root / "run", root / "store"
    prep = cli("data", "prepare", "--source", "stdlib", "--out", str(data), "--vocab-size", "400",
               "--max-bytes", "40000", "--no-progress")  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    cfg = root / "c.toml"
    cfg.write_text(TOML.format(data=data))
    train = cli("train", "--config", str(cfg), f"out_dir={run}")
    assert train.returncode == 0, train.stderr
    built = cli("store", "build", str(run), "--out", str(store), "--format", "bf16", "--no-progress")
    assert built.returncode == 0, built.stderr
    return {"root": root, "data": data, "run": run, "store": store, "cfg": cfg, "train": train}


def _modes(top: Path) -> dict[str, set[str]]:
    """{"files": {modes}, "dirs": {modes}} of everything under ``top`` (itself included)."""
    out: dict[str, set[str]] = {"files": set(), "dirs": {oct(stat.S_IMODE(top.stat().st_mode))}}
    for p in top.rglob("*"):
        out["dirs" if p.is_dir() else "files"].add(oct(stat.S_IMODE(p.stat().st_mode)))
    return out


def test_published_files_follow_the_umask(job: dict[str, object]) -> None:
    """A saved model, checkpoints, metrics, the store and the prepared data come out 0644/0755 under umask 022."""
    run = job["run"]
    assert isinstance(run, Path)
    ckpt = list_checkpoints(run)[-1]
    for top in (ckpt / "model", ckpt, run, job["store"], job["data"]):
        assert _modes(top) == {"files": {"0o644"}, "dirs": {"0o755"}}, top
    assert oct(stat.S_IMODE((run / "metrics.jsonl").stat().st_mode)) == "0o644"


def test_atomic_writes_and_temp_dirs_honour_another_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write_json(tmp_path / "a" / "x.json", {"a": 1})
        d = make_temp_dir(tmp_path, ".build-")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "x.json").stat().st_mode) == 0o640
    assert stat.S_IMODE(d.stat().st_mode) == 0o750


def test_train_says_new_run_or_resume_and_names_both_heldout_figures(job: dict[str, object], tmp_path: Path) -> None:
    run, data = job["run"], job["data"]
    assert isinstance(run, Path)
    train = job["train"]
    assert isinstance(train, subprocess.CompletedProcess)
    assert f"starting a new run in {run}" in train.stderr
    summary = json.loads(train.stdout)
    assert summary["eval_scope"].startswith("first 2 of ") and summary["eval_scope"].endswith(" batches of val")
    assert summary["eval_bpb"] == summary["eval"]["bpb"] and summary["eval_loss"] == summary["eval"]["loss"]
    assert f"`engramlm eval {run} --data {data}` scores the full split" in train.stderr

    # eval: the whole split by default, and says so; on the same 2 batches it gives the summary's figure
    full = cli("eval", str(run), "--data", str(data))
    assert full.returncode == 0, full.stderr
    doc = json.loads(full.stdout)
    assert doc["full_sweep"] and doc["scope"] == f"full val split ({doc['batches']} batches)" and doc["batches"] > 2
    part = json.loads(cli("eval", str(run), "--data", str(data), "--batch-size", "2", "--max-batches", "2").stdout)
    assert part["scope"] == summary["eval_scope"] and part["bpb"] == pytest.approx(summary["eval_bpb"], rel=1e-9)

    # resume after losing the last checkpoint (a copy of the run: the other tests keep theirs)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(list_checkpoints(copy)[-1])
    resumed = cli("train", "--resume", str(copy), f"out_dir={copy}")
    assert resumed.returncode == 0, resumed.stderr
    first = resumed.stderr.splitlines()[0]
    assert first == f"resuming from step 2 (checkpoint {copy / 'checkpoints' / 'step_00000002'})", resumed.stderr


def test_eval_progress_bar_on_a_terminal_or_on_request(job: dict[str, object]) -> None:
    run, data = str(job["run"]), str(job["data"])
    quiet = cli("eval", run, "--data", data)  # stderr is a pipe: no bar
    assert quiet.returncode == 0 and "batch" not in quiet.stderr
    forced = cli("eval", run, "--data", data, "--progress")
    n = json.loads(forced.stdout)["batches"]
    assert forced.returncode == 0 and f"{n}/{n}" in forced.stderr and "eval val" in forced.stderr

    # stderr a terminal: the bar by default, --no-progress turns it off
    def on_tty(*extra: str) -> tuple[subprocess.CompletedProcess, str]:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    b = os.read(master, 4096)
                except OSError:  # the slave side closed
                    return
                if not b:
                    return
                chunks.append(b)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            res = cli("eval", run, "--data", data, *extra, stderr=slave)
        finally:
            os.close(slave)
        reader.join(timeout=30)
        os.close(master)
        return res, b"".join(chunks).decode("utf-8", "replace")

    res, err = on_tty()
    assert res.returncode == 0 and f"{n}/{n}" in err
    res, err = on_tty("--no-progress")
    assert res.returncode == 0 and f"{n}/{n}" not in err


def test_generate_stream_prints_the_prompt_like_the_plain_output(job: dict[str, object]) -> None:
    args = ("generate", str(job["run"]), "--prompt", "import os", "--max-new-tokens", "5")
    plain, streamed, bare = cli(*args), cli(*args, "--stream"), cli(*args, "--stream", "--no-echo")
    assert plain.returncode == streamed.returncode == bare.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout.startswith("import os") and streamed.stdout == plain.stdout
    assert bare.stdout == plain.stdout[len("import os") :]


def test_analyze_writes_next_to_the_run_not_into_the_cwd(job: dict[str, object], tmp_path: Path) -> None:
    run, data = job["run"], job["data"]
    assert isinstance(run, Path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = cli("analyze", "gates", str(run), "--text", "import os", "--data", str(data), cwd=cwd)
    assert res.returncode == 0, res.stderr
    where = run / "analysis" / "gates"
    assert {p.name for p in where.iterdir()} == {"gates.json", "gates.png", "gates.html"}
    assert f"wrote gates.json, gates.png, gates.html to {where}/" in res.stderr
    assert json.loads(res.stdout)["files"]["html"] == str(where / "gates.html")
    plan = cli("analyze", "plan", "tiny", cwd=cwd)  # prints the plan; plan.json only into an --out given
    assert plan.returncode == 0 and "Engram table plan" in plan.stdout, plan.stderr
    assert list(cwd.iterdir()) == []


def test_every_analyze_instrument_defaults_under_the_run(
    job: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = job["run"], str(job["data"])
    assert isinstance(run, Path)
    monkeypatch.chdir(tmp_path)
    ckpt = str(list_checkpoints(run)[0])  # a checkpoint of the run: its run directory
    sweep = ["--data", data, "--no-progress", "--batch-size", "2", "--seq-len", "32", "--max-batches", "1"]
    runs = {
        "fired": ["analyze", "fired", ckpt, "--text", "import os", "--data", data],
        "knockout": ["analyze", "knockout", str(run), *sweep, "--no-per-layer"],
        "rows": ["analyze", "rows", str(run), *sweep, "--max-tokens", "500"],
        "logit-lens": ["analyze", "logit-lens", str(run), ckpt, *sweep],
        "cka": ["analyze", "cka", ckpt, str(run), *sweep, "--max-tokens", "64", "--positions", "all",
                "--minibatch", "16"],
    }  # fmt: skip
    for name, argv in runs.items():
        assert main(argv) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        stem = name.replace("-", "_")
        assert (run / "analysis" / name / f"{stem}.json").is_file() and f"to {run / 'analysis' / name}/" in err
    # a bare saved model: its own directory
    model = tmp_path / "model"
    shutil.copytree(list_checkpoints(run)[-1] / "model", model)
    assert main(["analyze", "fired", str(model), "--text", "import os", "--data", data]) == 0
    assert (model / "analysis" / "fired" / "fired.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a default directory that cannot be made: refused up front, naming --out
    shutil.rmtree(model / "analysis")
    (model / "analysis").write_text("in the way")
    capsys.readouterr()
    assert main(["analyze", "fired", str(model), "--text", "import os", "--data", data]) == 2
    assert f"--out: cannot create {model / 'analysis' / 'fired'}" in capsys.readouterr().err
