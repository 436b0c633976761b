"""Background compaction of an SSD trainable table (issue 14): base + logs rewritten into a new base by a
thread while rows keep being read and written; the switch to it (at a checkpoint) keeps every row's newest
record, every older manifest still opens at its own state, and a kill -9 (a real SIGKILL of a process whose
compaction is writing its base) or a cancel leaves the last manifest valid; the training run with it equals
the one compacting synchronously, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.errors import ConfigError
from engramlm.models.locate import list_checkpoints
from engramlm.store.trainable import TABLES_FILE, TrainableTable, collect_garbage, manifest_files, read_tables_doc
from engramlm.train import Trainer, load_train_config, read_metrics
from engramlm.train.config import EngramTableConfig
from helpers import run_toml, tiny_model_toml

FP = "ab" * 32


def _make(d: Path, w: torch.Tensor, cache_rows: int) -> TrainableTable:
    def init(write):
        for s in range(0, w.shape[0], 4096):
            write(s, w[s : s + 4096])

    return TrainableTable.create(d, w.shape[0], w.shape[1], FP, init, cache_bytes=cache_rows * 256)


def _step(t: TrainableTable, ref: list[torch.Tensor], rng: np.random.Generator, tick: int) -> None:
    """One optimizer-like step: read 200 rows (checked against ``ref``), write them back changed."""
    ids = np.unique(rng.integers(0, ref[0].shape[0], 200))
    got = t.layout.unpack(t.read(ids, tick))
    i = torch.from_numpy(ids)
    for a, r in zip(got, ref, strict=True):
        assert torch.equal(a, r[i]), tick
    new = (got[0] + 1, got[1] + 0.5, got[2] + 0.25, got[3] + 1)
    for r, x in zip(ref, new, strict=True):
        r[i] = x
    t.write(ids, t.layout.pack(*new), tick)


def _records(t: TrainableTable) -> list[torch.Tensor]:
    return list(t.layout.unpack(t.read_records(0, t.num_rows)))


def test_background_compaction_switches_without_losing_a_row(tmp_path: Path) -> None:
    rows = 5000
    w = torch.randn(rows, 16)
    t = _make(tmp_path, w, cache_rows=50)  # evictions every step: logs grow while the thread reads
    ref = [w.clone(), torch.zeros(rows, 16), torch.zeros(rows, 16), torch.zeros(rows, dtype=torch.int64)]
    rng = np.random.default_rng(0)
    for tick in range(10):
        _step(t, ref, rng, tick)
    before = t.flush()
    at_before = [r.clone() for r in ref]
    assert t.start_compaction() and not t.start_compaction()  # one at a time
    job = t._compaction
    assert job is not None and job.name in t.files()  # the base being written is never garbage
    for tick in range(10, 20):  # training goes on while it runs; none of these rows may be lost by the switch
        _step(t, ref, rng, tick)
    job.thread.join()
    assert t.finish_compaction() and t._compaction is None and not t.finish_compaction()
    for tick in range(20, 25):
        _step(t, ref, rng, tick)
    after = t.flush()
    assert after["base"]["file"] == job.name != before["base"]["file"]
    # the logs written before the compaction started are absorbed: only the newer one(s) remain
    assert {g["file"] for g in after["logs"]}.isdisjoint(g["file"] for g in before["logs"])
    assert all(torch.equal(a, b) for a, b in zip(_records(t), ref, strict=True))
    t.close()
    for man, want in ((before, at_before), (after, ref)):  # both manifests open at their own state
        with TrainableTable.open(tmp_path, man, FP, cache_bytes=1 << 16, writable=False) as r:
            assert all(torch.equal(a, b) for a, b in zip(_records(r), want, strict=True))
    removed = collect_garbage(tmp_path, manifest_files(after))
    assert before["base"]["file"] in removed


def test_a_cancelled_compaction_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    w = torch.randn(20000, 16)
    t = _make(tmp_path, w, cache_rows=50)
    man = t.flush()
    names = set(os.listdir(tmp_path))
    assert t.start_compaction()
    t.close()  # cancels and waits: the partial base is removed, nothing else changes but the new (empty) log
    new = set(os.listdir(tmp_path)) - names
    assert all(n.startswith("log-") for n in new)
    with TrainableTable.open(tmp_path, man, FP, cache_bytes=1 << 16, writable=False) as r:
        assert torch.equal(r.read_block(0, 20000), w)


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    from engramlm.store.trainable import TrainableTable
    d = sys.argv[1]
    torch.manual_seed(0)
    rows, dim = 150_000, 32  # 512-byte records: a 73 MiB base, long enough to be killed while it is rewritten
    def init(write):
        for s in range(0, rows, 8192):
            write(s, torch.randn(min(8192, rows - s), dim))
    t = TrainableTable.create(d, rows, dim, "ab" * 32, init, cache_bytes=1 << 20, direct=False)
    rng = np.random.default_rng(1)
    for tick in range(5):
        ids = np.unique(rng.integers(0, rows, 5000))
        w, m, v, n = t.layout.unpack(t.read(ids, tick))
        t.write(ids, t.layout.pack(w + 1, m + 1, v + 1, n + 1), tick)
    man = t.flush()
    np.save(d + "/../want.npy", t.read_records(0, rows))
    with open(d + "/../manifest.json", "w") as f:
        json.dump(man, f)
    print("ready", flush=True)
    sys.stdin.readline()
    t.start_compaction()
    t._compaction.thread.join()
    print("done", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_sigkill_during_a_compaction_leaves_the_checkpoint_valid(tmp_path: Path) -> None:
    d = tmp_path / "table"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(d)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        man = json.loads((tmp_path / "manifest.json").read_text())
        new = d / "base-000001.bin"
        full = man["base"]["size"]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not (new.exists() and new.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    size = new.stat().st_size if new.exists() else 0
    assert 0 < size < full and not new.with_suffix(".crc").exists()  # killed mid-write: a partial base
    want = np.load(tmp_path / "want.npy")
    with TrainableTable.open(d, man, FP, cache_bytes=1 << 16, writable=False) as r:
        assert np.array_equal(r.read_records(0, r.num_rows), want)
    # the partial base is garbage (no manifest names it); a new session compacts again and lands the same rows
    assert new.name in collect_garbage(d, manifest_files(man))
    with TrainableTable.open(d, man, FP, cache_bytes=1 << 20, direct=False) as t:
        assert t.start_compaction()
        t._compaction.thread.join()
        assert t.finish_compaction()
        assert np.array_equal(t.read_records(0, t.num_rows), want)
        with TrainableTable.open(d, t.flush(), FP, cache_bytes=1 << 16, writable=False) as r:
            assert r.manifest()["base"]["file"] != man["base"]["file"]
            assert np.array_equal(r.read_records(0, r.num_rows), want)


def test_compaction_settings_are_validated() -> None:
    from engramlm.train.config import TrainConfig

    assert EngramTableConfig().compact_background is False and EngramTableConfig().compact_ratio == 1.0
    with pytest.raises(ConfigError, match=r"engram\.compact_background: expected bool, got 'maybe'"):
        TrainConfig.from_dict({"data": {"dir": "x"}, "engram": {"compact_background": "maybe"}})
    with pytest.raises(ConfigError, match=r"engram\.compact_ratio: must be > 0"):
        EngramTableConfig(compact_ratio=0)


TOML = run_toml(8, 2, keep=4, eval_every=100) + tiny_model_toml(hc_mult=1) + "[schedule]\nwarmup_steps = 2\n"


def test_training_with_background_compaction_equals_synchronous(tmp_path: Path) -> None:
    from engramlm.data import prepare

    torch.set_num_threads(1)
    prepare("stdlib", tmp_path / "prep", 400, max_bytes=40_000, progress=False)
    cfg = tmp_path / "run.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{tmp_path / "prep"}"'))
    ssd = ["engram.table_tier=ssd", "engram.cache_mb=0.01", "engram.compact_ratio=0.01"]
    runs = {}
    for how in ("true", "false"):
        run = tmp_path / how
        Trainer(load_train_config(cfg, [f"out_dir={run}", *ssd, f"engram.compact_background={how}"])).fit()
        runs[how] = run
    losses = [[(r["kind"], r["step"], r["loss"]) for r in read_metrics(r)] for r in runs.values()]
    assert losses[0] == losses[1]
    states = []
    for run in runs.values():
        ckpts = list_checkpoints(run)
        bases = [read_tables_doc(c / TABLES_FILE)[1][1]["base"]["file"] for c in ckpts]
        assert len(set(bases)) > 1, bases  # compactions happened and were switched to
        fp = json.loads((ckpts[-1] / "model" / "config.json").read_text())["hash_fingerprint"]
        ((d, man),) = read_tables_doc(ckpts[-1] / TABLES_FILE).values()
        with TrainableTable.open(d, man, fp, cache_bytes=1 << 16, writable=False) as t:
            states.append(t.read_records(0, t.num_rows))
        # a compaction still in flight (or done, not switched to) at the end was cancelled and its base removed
        named = set().union(*(manifest_files(m) for c in ckpts for _, m in read_tables_doc(c / TABLES_FILE).values()))
        assert {p.name for p in d.iterdir()} <= named | {p.name for p in d.glob("log-*.bin")}
    assert np.array_equal(states[0], states[1])


@pytest.mark.slow
def test_training_killed_during_a_background_compaction_resumes_exactly(tmp_path: Path) -> None:
    """``engramlm train`` SIGKILLed while a background compaction is writing its base (a new base file without its
    CRC file yet), then ``--resume``: the losses of the uninterrupted run, bit for bit."""
    from engramlm.data import prepare

    torch.set_num_threads(1)
    prepare("stdlib", tmp_path / "prep", 400, max_bytes=40_000, progress=False)
    cfg = tmp_path / "run.toml"
    big = TOML.replace("[997, 997]", "[12000, 12000]").replace("steps = 8", "steps = 16")  # ~48k rows: 6 MiB a table
    cfg.write_text(big.replace("[data]", f'[data]\ndir = "{tmp_path / "prep"}"'))
    ssd = ["engram.table_tier=ssd", "engram.cache_mb=0.05", "engram.compact_ratio=0.01"]
    Trainer(load_train_config(cfg, [f"out_dir={tmp_path / 'ref'}", *ssd])).fit()
    run = tmp_path / "killed"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "engramlm", "train", "--config", str(cfg), f"out_dir={run}", *ssd]
    tables = run / "engram_tables" / "layer_001"

    def compacting() -> bool:
        try:
            names = {p.name for p in tables.iterdir()}
        except FileNotFoundError:
            return False
        return any(n.startswith("base-") and n.endswith(".bin") and n != "base-000000.bin"
                   and n[:-4] + ".crc" not in names for n in names)  # fmt: skip

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (compacting() and list_checkpoints(run)):
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before a compaction could be caught"
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = {p.name for p in tables.iterdir()}
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [[(x["kind"], x["step"], x["loss"]) for x in read_metrics(d)] for d in (run, tmp_path / "ref")]
    assert losses[0] == losses[1]
    # what the killed compaction left is collected once no checkpoint names it
    left = {p.name for p in tables.iterdir()}
    named = set().union(*(manifest_files(m) for c in list_checkpoints(run) for _, m in
                          read_tables_doc(c / TABLES_FILE).values()))  # fmt: skip
    stale = {n for n in partial - named if n.startswith("base-")}
    assert stale and not (stale & left)
