"""Re-sharding an SSD-trained run to another world size (issue 14): ``--resume`` of a checkpoint whose tables
are per-rank SSD tables, on 1 process (2 -> 1), 3 ranks (2 -> 3, rows split unevenly, each new shard spanning
parts of both old ones) and of a one-process SSD checkpoint on 2 ranks (1 -> 2).

Each new rank streams the records (row + Adam m, v, count) of its row range from the saved tables that overlap
it into a fresh base file (``SsdTables.resharded``); the saved tables are only read. The model and config are
``test_dist_train``'s, with the tables on SSD and a cache of ~80 records per rank. Compared with the
uninterrupted run of the saved world size, with ``test_dist_train``'s tolerances for its RAM re-shard (its
docstring says why: the new world sums the same gradients in another order, and Adam can flip the sign of a
near-cancelling coordinate's step): losses to 2e-6 relative, table coordinates within 2e-4 but for a few in
10^4 (at most one step), moments within 5e-3 (Frobenius); which rows have state and their update counts
exactly equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engramlm.cli import main as cli
from engramlm.data import prepare
from engramlm.store.trainable import checkpoint_table_docs, open_tables
from engramlm.train import Trainer, load_train_config
from test_dist_train import EVERY, STEPS, TOML, _assert_close_losses, _ckpt, _run, _train, torchrun

slow = pytest.mark.slow  # three torchrun jobs and two one-process runs: ~1 min on 2 shared cores

SSD = ["engram.table_tier=ssd", "engram.cache_mb=0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_ssd_reshard")
    prepare("stdlib", root / "prep", 400, max_bytes=80_000, progress=False)
    cfg = root / "run.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{root / "prep"}"'))
    out = {name: root / name for name in ("two", "single", "three", "one", "one_two")}
    out["cfg"] = cfg
    _run(torchrun(2, "--config", str(cfg), f"out_dir={out['two']}", *SSD))
    saved = _files(out["two"] / "engram_tables")
    assert cli.main(["train", "--config", str(cfg), f"out_dir={out['single']}", *SSD, "--resume",
                     str(_ckpt(out["two"], EVERY))]) == 0  # fmt: skip
    _run(torchrun(3, "--config", str(cfg), f"out_dir={out['three']}", *SSD, "--resume", str(_ckpt(out["two"], EVERY))))
    assert _files(out["two"] / "engram_tables") == saved  # the saved tables were only read
    torch.set_num_threads(1)
    Trainer(load_train_config(cfg, [f"out_dir={out['one']}", *SSD])).fit()
    _run(torchrun(2, "--config", str(cfg), f"out_dir={out['one_two']}", *SSD, "--resume",
                  str(_ckpt(out["one"], EVERY))))  # fmt: skip
    return out


def _files(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def _state(ckpt: Path) -> tuple[torch.Tensor, ...]:
    """(rows, m, v, count) of the whole table 1, over the checkpoint's SSD tables (one, or one per rank)."""
    fp = json.loads((ckpt / "model" / "config.json").read_text())["hash_fingerprint"]
    parts = []
    for doc in checkpoint_table_docs(ckpt):
        tables = open_tables(doc, fp)
        try:
            t = tables[1]
            parts.append(t.layout.unpack(t.read_records(0, t.num_rows)))
        finally:
            for t in tables.values():
                t.close()
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def _assert_close_state(got: Path, want: Path) -> None:
    (w1, m1, v1, n1), (w0, m0, v0, n0) = _state(got), _state(want)
    assert w1.shape == w0.shape == (8162, 8)
    assert torch.equal(n1, n0) and int((n0 > 0).sum()) > 100  # which rows have state, and their counts: exact
    diff = (w1 - w0).abs()
    assert float(diff.max()) <= 3e-3 * 5 and int((diff > 2e-4).sum()) <= max(2, diff.numel() // 10_000)
    for a, b in ((m1, m0), (v1, v0)):
        assert float((a - b).norm() / b.norm()) <= 5e-3
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(b.abs().max()))
    assert not (m1[n0 == 0].any() or v1[n0 == 0].any())


@slow
@pytest.mark.parametrize(("name", "ref", "world"), [("single", "two", 1), ("three", "two", 3), ("one_two", "one", 2)])
def test_resharded_resume_matches_the_uninterrupted_run(runs: dict[str, Any], name: str, ref: str, world: int) -> None:
    got, want = _train(runs[name]), _train(runs[ref])
    assert min(s for _, s in got) == EVERY + 1
    _assert_close_losses(got, want, range(EVERY + 1, STEPS + 1))
    final = _ckpt(runs[name], STEPS)
    _assert_close_state(final, _ckpt(runs[ref], STEPS))
    docs = checkpoint_table_docs(final)
    assert len(docs) == (1 if world == 1 else world)
    sizes = [json.loads(d.read_text())["layers"]["1"]["manifest"]["num_rows"] for d in docs]
    assert sum(sizes) == 8162 and (world != 3 or sizes == [2721, 2721, 2720])
    for d in docs:  # every new table lives in the resumed run's own directory
        rel = json.loads(d.read_text())["layers"]["1"]["dir"]
        assert (d.parent / rel).resolve().is_relative_to(runs[name].resolve())


@slow
def test_a_resharded_run_exports_like_the_original(runs: dict[str, Any], tmp_path: Path) -> None:
    """``store build`` reads a re-sharded run's three per-rank tables as one table: its final rows are the
    2-rank run's within the tolerance above."""
    from engramlm.store.storedir import open_store_dir

    for run in ("two", "three"):
        assert cli.main(["store", "build", str(runs[run]), "--out", str(tmp_path / run), "--no-progress"]) == 0
    a, b = open_store_dir(tmp_path / "two", "memory")[1], open_store_dir(tmp_path / "three", "memory")[1]
    ids = torch.arange(8162)
    assert float((a.gather(ids) - b.gather(ids)).abs().max()) <= 3e-3 * 5


@slow
def test_resharding_in_place_drops_the_old_worlds_tables_once_unnamed(runs: dict[str, Any], tmp_path: Path) -> None:
    """The 2-rank run resumed by one process in its own directory: the new table sits beside the per-rank ones,
    which stay while a retained checkpoint names them and go once the last such checkpoint is pruned."""
    import shutil

    run = tmp_path / "inplace"
    shutil.copytree(runs["two"], run)
    for c in (run / "checkpoints").glob("step_*"):
        if c.name != f"step_{EVERY:08d}":
            shutil.rmtree(c)
    (run / "summary.json").unlink()
    ranks = sorted(p.name for p in (run / "engram_tables").glob("rank*"))
    assert ranks == ["rank00000-of-00002", "rank00001-of-00002"]
    args = ["train", "--config", str(runs["cfg"]), f"out_dir={run}", *SSD, "keep_checkpoints=1"]
    assert cli.main([*args, "--resume"]) == 0
    assert sorted(p.name for p in (run / "engram_tables").iterdir()) == ["layer_001"]
    _assert_close_state(_ckpt(run, STEPS), _ckpt(runs["two"], STEPS))
