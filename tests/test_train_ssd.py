"""Training with the Engram tables on SSD (``engram.table_tier=ssd``): bit-identical to the tables in RAM
(losses, final rows, Adam state) with a cache far smaller than the table, exact resume after SIGKILL at
several moments (mid-step write-back, mid-checkpoint), refusal of corrupt or truncated log segments, and a
trained SSD table exported to an inference store by streaming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engramlm.data import prepare
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.models.locate import list_checkpoints
from engramlm.store.trainable import TABLES_FILE, open_tables, read_tables_doc
from engramlm.train import Trainer, load_train_config, read_metrics
from helpers import run_toml

STEPS, EVERY = 24, 6
TOML = (
    run_toml(STEPS, EVERY, keep=2, eval_every=12)
    + """[model]
preset = "tiny"
[model.overrides]
vocab_size = 400
hidden_size = 64
num_layers = 3
n_heads = 2
mlp_hidden = 96
hc_mult = 1
"engram.hash.engram_vocab_size" = [6000, 6000]
"engram.hash.layer_ids" = [1, 2]
"engram.head_dim" = 16
[schedule]
warmup_steps = 4
"""
)
# 0.25 MiB of cache for two tables of ~24k rows x 256-byte records (~12 MiB): ~1k cached rows for ~1k rows a step
SSD = ["engram.table_tier=ssd", "engram.cache_mb=0.25"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ssd")
    prepare("stdlib", root / "prep", 400, max_bytes=60_000, progress=False)
    cfg = root / "run.toml"
    cfg.write_text(TOML.replace("[data]", f'[data]\ndir = "{root / "prep"}"'))
    return root, cfg


@pytest.fixture(scope="module")
def ram_run(setup: tuple[Path, Path]) -> Path:
    root, cfg = setup
    torch.set_num_threads(1)
    Trainer(load_train_config(cfg, [f"out_dir={root / 'ram'}"])).fit()
    return root / "ram"


def _losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["kind"], r["step"], r["loss"]) for r in read_metrics(run)]


def _ssd_state(run: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """Final rows and Adam state of every SSD table (rows never updated: zero state, count 0)."""
    ckpt = list_checkpoints(run)[-1]
    out = {}
    for lid, t in open_tables(ckpt / TABLES_FILE, fingerprint).items():
        with t:
            w, m, v, n = t.layout.unpack(t.read_records(0, t.num_rows))
        out.update({f"{lid}.rows": w, f"{lid}.m": m, f"{lid}.v": v, f"{lid}.n": n})
    return out


def _ram_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = list_checkpoints(run)[-1]
    model = load_file(ckpt / "model" / "model.safetensors")
    opt = load_file(ckpt / "optimizer.safetensors")
    out = {}
    for lid in (1, 2):
        w = model[f"layers.{lid}.engram.embed.weight"]
        rows = opt[f"sparse/layer{lid}.rows"].long()
        m, v, n = torch.zeros_like(w), torch.zeros_like(w), torch.zeros(w.shape[0], dtype=torch.int64)
        m[rows], v[rows], n[rows] = (
            opt[f"sparse/layer{lid}.exp_avg"],
            opt[f"sparse/layer{lid}.exp_avg_sq"],
            opt[f"sparse/layer{lid}.count"],
        )
        out.update({f"{lid}.rows": w, f"{lid}.m": m, f"{lid}.v": v, f"{lid}.n": n})
    return out


def _fingerprint(run: Path) -> str:
    ckpt = list_checkpoints(run)[-1]
    return json.loads((ckpt / "model" / "config.json").read_text())["hash_fingerprint"]


def test_ssd_training_is_bit_identical_to_ram(setup: tuple[Path, Path], ram_run: Path) -> None:
    root, cfg = setup
    run = root / "ssd"
    with Trainer(load_train_config(cfg, [f"out_dir={run}", *SSD])) as tr:
        table = tr.ssd.tables[1]
        assert table.capacity * 4 < table.num_rows  # the cache is far smaller than the table
        tr.fit()
    assert _losses(run) == _losses(ram_run)
    recs = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert recs[-1]["ssd_rows_written"] > 0 and recs[-1]["ssd_log_chunks"] > STEPS  # evicted and written back
    assert all("ssd_wait_ms" in r for r in recs)
    got, want = _ssd_state(run, _fingerprint(run)), _ram_state(ram_run)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert int(want["1.n"].max()) > 1  # rows were updated more than once: moments carried across evictions
    # dense weights equal too; the model file holds [0, d] placeholders for the tables
    a = load_file(list_checkpoints(run)[-1] / "model" / "model.safetensors")
    b = load_file(list_checkpoints(ram_run)[-1] / "model" / "model.safetensors")
    assert a["layers.1.engram.embed.weight"].shape[0] == 0
    for k in b:
        if "engram.embed" not in k:
            assert torch.equal(a[k], b[k]), k
    # a checkpoint does not copy the table: it is a small JSON manifest next to the model
    assert (list_checkpoints(run)[-1] / TABLES_FILE).stat().st_size < 4096


def test_prefetch_off_and_compaction_give_the_same_run(setup: tuple[Path, Path], ram_run: Path) -> None:
    root, cfg = setup
    run = root / "ssd_compact"
    # compaction at the checkpoint itself (the background one: test_ssd_compaction.py)
    extra = ["engram.prefetch=false", "engram.compact_ratio=0.05", "engram.compact_background=false"]
    extra.append(f"steps={EVERY * 2}")
    Trainer(load_train_config(cfg, [f"out_dir={run}", *SSD, *extra])).fit()
    # the LR schedule's milestones are fractions of the run: equal to the longer run's up to 0.8 x 12 steps
    same = int(0.8 * EVERY * 2)
    ref = [r for r in _losses(ram_run) if r[0] == "train" and r[1] <= same]
    assert [r for r in _losses(run) if r[0] == "train" and r[1] <= same] == ref
    doc = read_tables_doc(list_checkpoints(run)[-1] / TABLES_FILE)
    for d, man in doc.values():
        assert man["base"]["file"] != "base-000000.bin"  # compacted into a new base
        names = {p.name for p in d.iterdir()}
        assert "base-000000.bin" not in names  # and the old base collected once no checkpoint names it


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engramlm", *args]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.slow
def test_sigkill_at_several_moments_then_resume_is_bitwise_identical(setup: tuple[Path, Path], ram_run: Path) -> None:
    """Kill -9 (1) right after a checkpoint starts being written, (2) mid-run between checkpoints (write-back
    in progress) and (3) again after resuming; every resume reproduces the RAM run bit for bit."""
    root, cfg = setup
    run = root / "killed"
    ref = _losses(ram_run)

    log = (root / "killed.log").open("ab")

    def start(resume: bool) -> subprocess.Popen:
        args = ["train", "--config", str(cfg), f"out_dir={run}", *SSD]
        # resume when a checkpoint exists; else start over (a kill before the first one left no run to resume)
        how = ["--resume"] if resume else (["--overwrite"] if run.exists() else [])
        return subprocess.Popen(_cli(*args, *how), env=_env(), stdout=subprocess.DEVNULL, stderr=log)

    def kill_when(proc: subprocess.Popen, ready) -> bool:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        return proc.wait() == -signal.SIGKILL

    ckdir = run / "checkpoints"
    # (1) the moment a checkpoint's temp directory appears (flush and manifest being written)
    proc = start(False)
    assert kill_when(proc, lambda: ckdir.is_dir() and any(p.name.startswith(".tmp-") for p in ckdir.iterdir()))
    # (2) a few steps after a checkpoint: dirty rows are being evicted to the log
    proc = start(bool(list_checkpoints(run)))
    done = list_checkpoints(run)

    def after_ckpt() -> bool:
        try:  # read while the trainer writes: a file can vanish between a check and the read (moved aside)
            c = list_checkpoints(run)
            recs = read_metrics(run)
        except FileNotFoundError:
            return False
        return len(c) > len(done) and recs and recs[-1]["step"] >= int(c[-1].name[5:]) + 3

    assert kill_when(proc, after_ckpt)
    # (3) resume, kill again mid-checkpoint-or-step at a random small delay, resume to the end
    proc = start(True)
    assert kill_when(proc, lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) > 2 + EVERY)
    proc = start(True)
    assert proc.wait() == 0, (root / "killed.log").read_text()[-2000:]
    assert _losses(run) == ref
    got, want = _ssd_state(run, _fingerprint(run)), _ram_state(ram_run)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_corrupt_or_truncated_log_segments_are_refused(setup: tuple[Path, Path]) -> None:
    root, cfg = setup
    run = root / "corrupt"
    base = [f"out_dir={run}", *SSD, f"steps={EVERY}"]
    Trainer(load_train_config(cfg, base)).fit()
    ckpt = list_checkpoints(run)[-1]
    (d, man), *_ = read_tables_doc(ckpt / TABLES_FILE).values()
    log = d / man["logs"][-1]["file"]
    good = log.read_bytes()
    assert len(good) == man["logs"][-1]["length"]
    log.write_bytes(good[: len(good) - 4096])  # truncated
    with pytest.raises(CorruptFileError, match="truncated"):
        Trainer(load_train_config(cfg, base), resume=True)
    bad = bytearray(good)
    bad[len(bad) - 100] ^= 0x40  # one flipped bit inside a record
    log.write_bytes(bytes(bad))
    with pytest.raises(CorruptFileError, match="CRC32"):
        Trainer(load_train_config(cfg, base), resume=True)
    log.write_bytes(good)
    base_file = d / man["base"]["file"]
    raw = bytearray(base_file.read_bytes())
    raw[4096 + 10] ^= 0x01  # a base page: caught by its page CRC when read
    base_file.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="CRC32"):
        t = open_tables(ckpt / TABLES_FILE, _fingerprint(run))[1]
        t.read_records(0, t.num_rows)
    raw[4096 + 10] ^= 0x01
    base_file.write_bytes(bytes(raw))
    tr = Trainer(load_train_config(cfg, base), resume=True)  # intact again: resumes
    assert tr.step == EVERY
    tr.close()


def test_resume_refuses_a_tier_change(setup: tuple[Path, Path], ram_run: Path) -> None:
    _, cfg = setup
    with pytest.raises(ConfigError, match=r"engram\.table_tier"):
        Trainer(load_train_config(cfg, [f"out_dir={ram_run}", *SSD]), resume=True)


@pytest.mark.slow
def test_trained_ssd_table_exports_to_a_store_by_streaming(
    setup: tuple[Path, Path], ram_run: Path, tmp_path: Path
) -> None:
    root, cfg = setup
    run = root / "ssd"  # from the bit-exactness test (module order), else train it
    if not list_checkpoints(run) if run.exists() else True:
        Trainer(load_train_config(cfg, [f"out_dir={run}", *SSD])).fit()
    out = tmp_path / "store"
    env = _env()
    r = subprocess.run(_cli("store", "build", str(run), "--out", str(out), "--no-progress"), env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    from engramlm.store.storedir import open_store_dir

    want = _ssd_state(run, _fingerprint(run))
    tables = open_store_dir(out, "mmap")
    for lid, t in tables.items():
        ids = torch.from_numpy(np.arange(t.num_rows))
        assert torch.equal(t.gather(ids), want[f"{lid}.rows"])
    # and `generate` serves the SSD-trained model from that store; without one it names the remedy
    gen = _cli("generate", str(run), "--prompt", "def f(x):", "--max-new-tokens", "4", "--json")
    r = subprocess.run([*gen, "--store", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(gen, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "engram.table_tier=ssd" in r.stderr and "store build" in r.stderr
    # `eval` reads an SSD-trained checkpoint's rows from its table files: the same result as the RAM run's
    ev = [_cli("eval", str(r), "--data", str(root / "prep"), "--max-batches", "2") for r in (run, ram_run)]
    got, want = (json.loads(subprocess.run(c, env=env, capture_output=True, text=True, check=True).stdout) for c in ev)
    assert got["loss"] == want["loss"] and got["tokens"] == want["tokens"] > 0
