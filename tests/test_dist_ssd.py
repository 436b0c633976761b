"""`torchrun -m engramlm train engram.table_tier=ssd`: each rank's row shard is an SSD table (issue 14 point 6).

The tiny model and config of ``test_dist_train``, 2 gloo ranks. Each rank keeps a ``TrainableTable`` over only
its row range (4081 of 8162 rows, local ids) with a cache of ~80 records, far fewer than the rows a step
touches, as the backend of its ``SparseRowAdam`` (the owner's read of the row exchange). With the same world
size the arithmetic is the RAM shards' exactly, so losses, final rows and Adam state are compared bit for bit.
Also: a resume from the step-4 checkpoint on 2 ranks (bit-exact; other world sizes re-shard, see
``test_dist_ssd_reshard``), the per-rank prefetch (a cache holding the whole shard: no owner-read misses after
step 1), and ``store build`` / ``eval`` reading the two ranks' tables as one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engramlm.cli import main as cli
from engramlm.data import prepare
from engramlm.store.trainable import open_checkpoint_tables, open_tables
from engramlm.train import read_metrics
from test_dist_train import EVERY, STEPS, TABLE, TOML, _ckpt, _run, _train, torchrun

slow = pytest.mark.slow  # four 2-rank torchrun jobs: ~40 s on 2 shared cores

# 0.01 MiB = 81 records of 128 bytes per rank, against ~4k rows per shard and hundreds touched per step
SSD = ["engram.table_tier=ssd", "engram.cache_mb=0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_ssd")
    prepare("stdlib", root / "prep", 400, max_bytes=80_000, progress=False)
    cfg = root / "run.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{root / "prep"}"'))
    out = {name: root / name for name in ("ram", "ssd", "resumed", "roomy")}
    out["cfg"] = cfg
    _run(torchrun(2, "--config", str(cfg), f"out_dir={out['ram']}"))
    _run(torchrun(2, "--config", str(cfg), f"out_dir={out['ssd']}", *SSD))
    # a cache that holds the whole shard: after step 1 the prefetch brings every row a step serves beforehand
    _run(torchrun(2, "--config", str(cfg), f"out_dir={out['roomy']}", "engram.table_tier=ssd", "engram.cache_mb=1"))
    # the same run resumed from its step-4 checkpoint: a copy of the run directory (table paths are relative)
    # cut back to that checkpoint, then continued by 2 new ranks
    shutil.copytree(out["ssd"], out["resumed"])
    for c in (out["resumed"] / "checkpoints").glob("step_*"):
        if c.name != f"step_{EVERY:08d}":
            shutil.rmtree(c)
    (out["resumed"] / "summary.json").unlink()
    _run(torchrun(2, "--config", str(cfg), f"out_dir={out['resumed']}", *SSD, "--resume"))
    return out


def _ssd_state(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, m, v, count) of the whole table, concatenated over the ranks' SSD tables in rank order."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    parts = []
    for rel in state["shards"]["tables_files"]:
        tables = open_tables(ckpt / rel, _fingerprint(ckpt))
        try:
            t = tables[1]
            parts.append(t.layout.unpack(t.read_records(0, t.num_rows)))
        finally:
            for t in tables.values():
                t.close()
    return tuple(torch.cat([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


def _fingerprint(ckpt: Path) -> str:
    return json.loads((ckpt / "model" / "config.json").read_text())["hash_fingerprint"]


@slow
def test_ssd_shards_equal_ram_shards(runs: dict[str, Any]) -> None:
    ram, ssd = _train(runs["ram"]), _train(runs["ssd"])
    assert len(ram) == STEPS + 2 and ssd == ram  # every train and eval loss, bit for bit

    final_ram, final_ssd = _ckpt(runs["ram"], STEPS), _ckpt(runs["ssd"], STEPS)
    w_ram, w_ssd = load_file(final_ram / "model/model.safetensors"), load_file(final_ssd / "model/model.safetensors")
    assert w_ssd[TABLE].shape == (0, 8)  # the saved model keeps the placeholder; the rows are on SSD
    assert all(torch.equal(w_ssd[k], w_ram[k]) for k in w_ram if k != TABLE)
    rows, m, v, count = _ssd_state(final_ssd)
    assert torch.equal(rows, w_ram[TABLE])
    # the RAM shards' row-optimiser state (global ids): the SSD records of those rows, zeros for all others
    state = json.loads((final_ram / "trainer_state.json").read_text())
    touched = []
    for rel in state["shards"]["files"]:
        with safe_open(str(final_ram / rel), framework="pt") as f:
            ids = f.get_tensor("layer1.rows")
            touched.append(ids)
            assert torch.equal(m[ids], f.get_tensor("layer1.exp_avg"))
            assert torch.equal(v[ids], f.get_tensor("layer1.exp_avg_sq"))
            assert torch.equal(count[ids], f.get_tensor("layer1.count"))
    rest = torch.ones(len(count), dtype=torch.bool)
    rest[torch.cat(touched)] = False
    assert int(rest.sum()) < len(count) and not count[rest].any() and not m[rest].any() and not v[rest].any()

    # each rank's table covers only its row range, with a cache far smaller than that range
    ssd_state = json.loads((final_ssd / "trainer_state.json").read_text())
    assert ssd_state["shards"]["bounds"]["1"] == [0, 4081, 8162]
    for r, rel in enumerate(ssd_state["shards"]["tables_files"]):
        doc = json.loads((final_ssd / rel).read_text())
        assert doc["layers"]["1"]["manifest"]["num_rows"] == 4081
        assert f"rank{r:05d}-of-00002" in doc["layers"]["1"]["dir"]
    recs = [r for r in (json.loads(x) for x in (runs["ssd"] / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]  # fmt: skip
    assert all(r["ssd_cache_misses"] > 0 and min(r["ranks_ssd_cache_misses"]) > 0 for r in recs)
    assert all(r["ssd_wait_ms"] >= 0 for r in recs) and recs[-1]["ssd_rows_read"] > 0


@slow
def test_each_rank_prefetches_the_rows_it_serves_next(runs: dict[str, Any]) -> None:
    assert _train(runs["roomy"]) == _train(runs["ram"])
    recs = {r["step"]: r for r in read_metrics(runs["roomy"]) if r["kind"] == "train"}
    # cumulative misses of the owners' reads: step 1's (nothing prefetched yet), then none until the eval after
    # step 6 reads its rows; the prefetch read the rest (rows_read grows while misses do not)
    first = recs[1]["ranks_ssd_cache_misses"]
    assert min(first) > 0 and all(recs[s]["ranks_ssd_cache_misses"] == first for s in range(2, 7))
    assert recs[6]["ssd_rows_read"] > recs[1]["ssd_rows_read"]


@slow
def test_ssd_resume_reproduces_the_run(runs: dict[str, Any]) -> None:
    got, want = _train(runs["resumed"]), _train(runs["ssd"])
    assert got == want
    for a, b in zip(_ssd_state(_ckpt(runs["resumed"], STEPS)), _ssd_state(_ckpt(runs["ssd"], STEPS)), strict=True):
        assert torch.equal(a, b)


@slow
def test_store_build_and_eval_read_the_ranks_tables(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engramlm.store.storedir import open_store_dir

    ram_store, ssd_store = tmp_path / "ram", tmp_path / "ssd"
    for run, store in ((runs["ram"], ram_store), (runs["ssd"], ssd_store)):
        assert cli.main(["store", "build", str(run), "--out", str(store), "--no-progress"]) == 0
    ram_t, ssd_t = open_store_dir(ram_store, "memory"), open_store_dir(ssd_store, "memory")
    ids = torch.tensor([0, 4080, 4081, 8161, 17, 5000])  # both sides of the rank boundary
    assert torch.equal(ssd_t[1].gather(ids), ram_t[1].gather(ids))
    tables = open_checkpoint_tables(_ckpt(runs["ssd"], STEPS), _fingerprint(_ckpt(runs["ssd"], STEPS)))
    try:
        assert tables[1].num_rows == 8162
        assert torch.equal(tables[1].gather(ids.reshape(2, 3)), ram_t[1].gather(ids).reshape(2, 3, 8))
    finally:
        tables[1].close()
    # `engramlm eval` scores the SSD run from its ranks' table files: the RAM run's figures exactly
    scores = []
    for run in (runs["ram"], runs["ssd"]):
        capsys.readouterr()
        data = str(runs["cfg"].parent / "prep")
        assert cli.main(["eval", str(run), "--data", data, "--max-batches", "3", "--batch-size", "4"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["loss"] == scores[1]["loss"] and scores[0]["tokens"] == scores[1]["tokens"] > 0
