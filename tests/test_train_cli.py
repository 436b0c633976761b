"""`engramlm train` / `eval` / `plot` end to end on a tiny real corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engramlm.cli.main import main
from engramlm.data import TokenDataset, prepare
from engramlm.models.locate import list_checkpoints, locate_model
from engramlm.train import read_metrics
from helpers import tiny_model_toml

TOML = """
steps = 6
checkpoint_every = 3
eval_every = 3
threads = 1
progress = false
[data]
batch_size = 4
seq_len = 32
""" + tiny_model_toml()


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "prep"
    prepare("stdlib", out, 400, max_bytes=40_000, progress=False)
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_train_resume_eval_plot(prep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{prep}"'))
    run = tmp_path / "run"
    rc, out, err = _run(capsys, "train", "--config", str(cfg), f"out_dir={run}")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 6 and summary["params"]["engram_tables"] > 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    assert any((run / "tb").iterdir())  # TensorBoard event file
    ref = read_metrics(run)

    # resume from the stored config alone (no --config), after losing the last checkpoint
    shutil.rmtree(list_checkpoints(run)[-1])
    rc, out, err = _run(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert [(r["kind"], r["loss"]) for r in read_metrics(run)] == [(r["kind"], r["loss"]) for r in ref]

    rc, out, err = _run(capsys, "eval", str(run), "--data", str(prep))
    assert rc == 0, err
    res = json.loads(out)
    final_eval = [r for r in ref if r["kind"] == "eval"][-1]
    assert res["full_sweep"] and res["step"] == 6 and res["seq_len"] == 32
    assert res["bytes"] == TokenDataset(prep, "val").n_bytes  # bpb over every byte of the split
    assert res["loss"] == pytest.approx(final_eval["loss"], rel=1e-9)
    assert res["bpb"] == pytest.approx(final_eval["bpb"], rel=1e-9)

    png = tmp_path / "plots" / "loss.png"
    rc, out, err = _run(capsys, "plot", str(run), str(run), "-o", str(png))
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # every downstream command takes the run directory itself (its latest checkpoint)
    assert locate_model(run).model_dir == list_checkpoints(run)[-1] / "model"
    rc, out, err = _run(capsys, "analyze", "gates", str(run), "--text", "import os", "--data", str(prep),
                        "--out", str(tmp_path / "an"))  # fmt: skip
    assert rc == 0, err
    assert (tmp_path / "an" / "gates.html").is_file()
    rc, out, err = _run(capsys, "store", "build", str(run), "--out", str(tmp_path / "store"), "--format", "bf16")
    assert rc == 0, err
    rc, out, err = _run(capsys, "generate", str(run), "--prompt", "import", "--max-new-tokens", "4",
                        "--store", str(tmp_path / "store"), "--tier", "mmap", "--json")  # fmt: skip
    rc2, out2, err2 = _run(capsys, "generate", str(run), "--prompt", "import", "--max-new-tokens", "4", "--json")
    assert rc == 0 and rc2 == 0, err + err2
    got, want = json.loads(out), json.loads(out2)
    assert got["tier"] == "mmap" and got["outputs"][0]["tokens"] == want["outputs"][0]["tokens"]

    # errors: data hashed with another tokenizer, a directory without runs, a corrupt model file
    other = tmp_path / "other"
    prepare("stdlib", other, 300, max_bytes=40_000, progress=False)
    rc, _, err = _run(capsys, "eval", str(run), "--data", str(other))
    assert rc == 2 and "fingerprint" in err
    rc, _, err = _run(capsys, "plot", str(tmp_path), "-o", str(png))
    assert rc == 2 and "no training records" in err
    weights = list_checkpoints(run)[-1] / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    rc, _, err = _run(capsys, "eval", str(run), "--data", str(prep))
    assert rc == 2 and "corrupt" in err


def test_train_config_errors(prep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "train", f"data.dir={prep}")
    assert rc == 2 and "--config" in err
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{prep}"'))
    rc, _, err = _run(capsys, "train", "--config", str(cfg), "optim.lr=0")
    assert rc == 2 and "optim.lr" in err


def test_data_source_prepares_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config with ``data.source`` is a whole job: the corpus is prepared on first use, then reused."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 40)
    cfg = tmp_path / "c.toml"
    data = tmp_path / "data"
    toml = TOML.replace("steps = 6", "steps = 2").replace("eval_every = 3", "eval_every = 2")
    cfg.write_text(toml.replace("[data]", f'[data]\ndir = "{data}"\nsource = "dir:{corpus}"\nvocab_size = 400'))
    rc, out, err = _run(capsys, "train", "--config", str(cfg), f"out_dir={tmp_path / 'run'}")
    assert rc == 0, err
    manifest = json.loads((data / "manifest.json").read_text())
    rc, out, err = _run(capsys, "train", "--config", str(cfg), f"out_dir={tmp_path / 'run2'}")
    assert rc == 0, err
    assert json.loads((data / "manifest.json").read_text()) == manifest  # reused, not rebuilt
    assert json.loads(out)["train_loss"] > 0


def test_bad_data_source_names_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{tmp_path}"\nsource = "ftp:x"'))
    rc, _out, err = _run(capsys, "train", "--config", str(cfg))
    assert rc != 0 and "data.source" in err
