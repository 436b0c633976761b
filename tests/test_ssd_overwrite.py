"""An SSD-trained run moved aside by ``--overwrite`` stays a complete run (issue 14, the --overwrite hazard).

``engramlm train ... --overwrite`` moves the old run's entries to ``OUT_DIR.old-<time>/``. With
``engram.table_tier=ssd`` the checkpoints name table files (a base, dirty-row logs) by a path relative to the
checkpoint: those files must move with the checkpoints, and the new run's garbage collection (which deletes
table files no retained checkpoint names) must never touch them. Checked on real short runs: after the
overwrite, the moved-aside checkpoint loads (``load_trained_model``, ``store build`` reads rows equal to the
ones saved before the overwrite) and resumes (``--resume`` with the moved copy as the run directory,
reproducing the original run's losses bit for bit); the same after ``--resume --overwrite`` from an older
checkpoint, which moves only the newer checkpoints aside while both runs' checkpoints name the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engramlm.cli import main as cli
from engramlm.data import prepare
from engramlm.models.locate import list_checkpoints, load_trained_model
from engramlm.store.trainable import TABLES_FILE, open_tables, read_tables_doc
from engramlm.train import Trainer, load_train_config, read_metrics
from helpers import run_toml, tiny_model_toml

STEPS, EVERY = 8, 2
TOML = run_toml(STEPS, EVERY, keep=2, eval_every=100) + tiny_model_toml(hc_mult=1) + "[schedule]\nwarmup_steps = 2\n"
# ~80 cached records of ~16k rows, and compaction at every checkpoint: new bases and logs keep appearing,
# so the new run's garbage collection has files to delete
SSD = ["engram.table_tier=ssd", "engram.cache_mb=0.01", "engram.compact_ratio=0.01"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ssd_overwrite")
    prepare("stdlib", root / "prep", 400, max_bytes=40_000, progress=False)
    path = root / "run.toml"
    path.write_text(TOML.replace("[data]", f'[data]\ndir = "{root / "prep"}"'))
    return path


def _train(cfg: Path, run: Path, *extra: str, **kw) -> None:
    Trainer(load_train_config(cfg, [f"out_dir={run}", *SSD, *extra]), **kw).fit()


def _rows(ckpt: Path) -> dict[int, torch.Tensor]:
    fp = json.loads((ckpt / "model" / "config.json").read_text())["hash_fingerprint"]
    out = {}
    for lid, t in open_tables(ckpt / TABLES_FILE, fp).items():
        with t:
            out[lid] = t.layout.unpack(t.read_records(0, t.num_rows))[0]
    return out


def _losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run)]


def _check_aside(aside: Path, saved: dict[int, torch.Tensor], tmp: Path) -> None:
    """``aside``'s newest checkpoint holds exactly ``saved``: read by the store build and the model loader."""
    ckpt = list_checkpoints(aside)[-1]
    for _lid, (d, _) in read_tables_doc(ckpt / TABLES_FILE).items():
        assert d.is_relative_to(aside.resolve()), d  # the tables moved with the checkpoints
    got = _rows(ckpt)
    assert sorted(got) == sorted(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    assert load_trained_model(aside).model is not None  # every file's sha256 checked
    store = tmp / f"store-{aside.name}"
    assert cli.main(["store", "build", str(aside), "--out", str(store), "--no-progress"]) == 0
    from engramlm.store.storedir import open_store_dir

    for lid, t in open_store_dir(store, "memory").items():
        assert torch.equal(t.gather(torch.arange(t.num_rows)), saved[lid])


def test_overwrite_keeps_the_moved_run_usable(cfg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(cfg, run)
    want_losses = _losses(run)
    saved = _rows(list_checkpoints(run)[-1])
    # a different run into the same directory: its checkpoints and garbage collection happen there
    _train(cfg, run, "seed=5", overwrite=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert _losses(run) != want_losses and [c.name for c in list_checkpoints(aside)] == [
        "step_00000006",
        "step_00000008",
    ]
    _check_aside(aside, saved, tmp_path)
    # the new run's tables live in its own directory and name nothing of the old run's
    for d, _ in read_tables_doc(list_checkpoints(run)[-1] / TABLES_FILE).values():
        assert d.is_relative_to(run.resolve()) and not d.is_relative_to(aside.resolve())
    # the moved copy resumes as a run of its own: cut back to step 6, it reproduces the original's losses
    cut = tmp_path / "cut"
    aside.rename(cut)
    from engramlm.train.checkpoint import _remove

    _remove(list_checkpoints(cut)[-1], cut / "checkpoints")
    (cut / "summary.json").unlink()
    _train(cfg, cut, resume=True)
    assert _losses(cut) == want_losses


def test_resume_overwrite_from_an_older_checkpoint_keeps_the_newer_ones(cfg: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(cfg, run)
    saved = _rows(list_checkpoints(run)[-1])
    old = list_checkpoints(run)[0]  # step 6; step 8 is newer and moves aside
    _train(cfg, run, "keep_checkpoints=1", resume=old, overwrite=True)  # re-runs steps 7, 8: new files, GC
    (aside,) = tmp_path.glob("run.old-*")
    assert [c.name for c in list_checkpoints(aside)] == ["step_00000008"]
    _check_aside(aside, saved, tmp_path)


def test_resume_from_another_run_directory_writes_only_its_own(cfg: Path, tmp_path: Path) -> None:
    """``--resume OTHER/checkpoints/step_N`` into a new out_dir: the table files are linked into the new run,
    which writes its logs and collects garbage there; the other run's files stay exactly as they were."""
    a, b = tmp_path / "a", tmp_path / "b"
    _train(cfg, a)
    tables = a / "engram_tables"
    before = {p.relative_to(a): p.stat().st_size for p in tables.rglob("*") if p.is_file()}
    _train(cfg, b, resume=list_checkpoints(a)[0])
    assert _losses(b) == [r for r in _losses(a) if r[1] > 6]
    assert {p.relative_to(a): p.stat().st_size for p in tables.rglob("*") if p.is_file()} == before
    for d, _ in read_tables_doc(list_checkpoints(b)[-1] / TABLES_FILE).values():
        assert d.is_relative_to(b.resolve())
    assert torch.equal(_rows(list_checkpoints(b)[-1])[1], _rows(list_checkpoints(a)[-1])[1])
