"""Every subcommand against a table of bad inputs and damaged files: one clear line, never a traceback.

Each row runs one ``engramlm`` command line and asserts: a non-zero exit, exactly one error line on
stderr (argparse usage errors: its usage text plus one ``error:`` line) naming the file or option,
no traceback, no output left behind, and no earlier file changed (the shared corpus, run and store
are hashed before and after). Rows run in-process through ``cli.main.main`` (the same code path as
the ``engramlm`` script, minus the interpreter start); the ones that need a real process (a full
disk via RLIMIT_FSIZE, a non-UTF-8 file read by a real command, an unreachable Mooncake master) run
``python -m engramlm``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engramlm.cli import main as cli
from engramlm.data import prepare
from helpers import tiny_model_toml

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")

TOML = """
steps = 4
checkpoint_every = 2
eval_every = 2
threads = 1
progress = false
[data]
dir = "{prep}"
batch_size = 4
seq_len = 32
eval_max_batches = 2
""" + tiny_model_toml(hc_mult=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A prepared corpus, a 4-step run (checkpoints 2 and 4), a store built from it, and a foreign corpus."""
    root = tmp_path_factory.mktemp("faults")
    prep, other, run, store = root / "prep", root / "other", root / "run", root / "store"
    prepare("stdlib", prep, 400, max_bytes=40_000, progress=False)
    prepare("stdlib", other, 300, max_bytes=20_000, progress=False)  # another run's data and tokenizer
    (root / "c.toml").write_text(TOML.format(prep=prep))
    assert cli.main(["train", "--config", str(root / "c.toml"), f"out_dir={run}"]) == 0
    assert cli.main(["store", "build", str(run), "--out", str(store), "--no-progress"]) == 0
    (root / "a_file").write_text("not a directory\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "garbage.toml").write_text("steps = [\n")
    return {k: str(v) for k, v in dict(root=root, prep=prep, other=other, run=run, store=store).items()} | {
        "config": str(root / "c.toml"),
        "file": str(root / "a_file"),
        "latin1": str(root / "latin1.txt"),
        "garbage": str(root / "garbage.toml"),
    }


def _snapshot(root: str | Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")  # flock files persist by design (utils.lock)
    }


# ------------------------------------------------------------------------------------ damage


def _copy_run(base: dict[str, str], tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(base["run"], dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _latest_model(run: Path) -> Path:
    return run / "checkpoints" / "step_00000004" / "model" / "model.safetensors"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def damaged(how: Callable[[Path], None], which: Callable[[Path], Path] = _latest_model) -> Callable:
    def setup(base: dict[str, str], tmp: Path) -> dict[str, str]:
        run = _copy_run(base, tmp)
        how(which(run))
        return {"drun": str(run)}

    return setup


def damaged_data(how: Callable[[Path], None], name: str) -> Callable:
    def setup(base: dict[str, str], tmp: Path) -> dict[str, str]:
        data = tmp / "data"
        shutil.copytree(base["prep"], data)
        how(data / name)
        return {"ddata": str(data)}

    return setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    names: str  # the error line must contain this (after placeholder substitution)
    setup: Callable[[dict[str, str], Path], dict[str, str]] | None = None
    usage: bool = False  # an argparse usage error (usage text + one error line)
    process: bool = False  # run as a real `python -m engramlm` process
    fsize_limit: int | None = None  # RLIMIT_FSIZE in bytes (implies process): a full disk
    may_change: tuple[str, ...] = ()  # files under tmp/ the command may legitimately update (a resumed run's logs)


TRAIN = ("train", "--config", "{config}")
ROWS = [
    # train
    Row("train-config-missing", ("train", "--config", "{tmp}/nope.toml"), "nope.toml"),
    Row("train-config-is-dir", ("train", "--config", "{prep}"), "directory"),
    Row("train-config-garbage", ("train", "--config", "{garbage}"), "garbage.toml"),
    Row("train-config-latin1", ("train", "--config", "{latin1}"), "latin1.txt", process=True),
    Row("train-bad-override", (*TRAIN, "out_dir={tmp}/out", "model.overrides.hidden_size=33"), "hidden_size"),
    Row("train-unknown-key", (*TRAIN, "out_dir={tmp}/out", "bogus.key=3"), "bogus"),
    Row("train-bad-table-tier", (*TRAIN, "out_dir={tmp}/out", "engram.table_tier=disk"), "engram.table_tier"),
    Row("train-bad-cache-mb", (*TRAIN, "out_dir={tmp}/out", "engram.cache_mb=0"), "engram.cache_mb"),
    Row("train-bad-compact-background", (*TRAIN, "out_dir={tmp}/out", "engram.compact_background=maybe"),
        "engram.compact_background"),
    Row("train-out-under-file", (*TRAIN, "out_dir={file}/run"), "a_file"),
    Row("train-resume-missing", ("train", "--resume", "{tmp}/nope"), "nope"),
    Row("train-resume-flipped-data", (*TRAIN, "out_dir={drun}", "--resume"), "model.safetensors",
        setup=damaged(lambda p: _flip(p, -5))),
    Row("train-resume-truncated-state", (*TRAIN, "out_dir={drun}", "--resume"), "trainer_state.json",
        setup=damaged(_truncate, lambda r: r / "checkpoints" / "step_00000004" / "trainer_state.json")),
    Row("train-full-disk", (*TRAIN, "out_dir={drun}", "steps=6", "--resume", "--allow-change", "steps"),
        "step_00000006", setup=damaged(lambda p: None), fsize_limit=20_000,
        may_change=("run/config.json", "run/metrics.jsonl", "run/tb/")),
    # data prepare
    Row("data-dir-missing", ("data", "prepare", "--source", "dir:{tmp}/nope", "--out", "{tmp}/out"), "nope"),
    Row("data-dir-no-path", ("data", "prepare", "--source", "dir", "--out", "{tmp}/out"), "--source"),
    Row("data-bad-kind", ("data", "prepare", "--source", "ftp", "--out", "{tmp}/out"), "--source", usage=True),
    Row("data-out-is-file", ("data", "prepare", "--source", "stdlib", "--out", "{file}", "--max-bytes", "9000"),
        "a_file"),
    Row("data-vocab-zero", ("data", "prepare", "--source", "stdlib", "--out", "{tmp}/out", "--vocab-size", "0"),
        "--vocab-size", usage=True),
    Row("data-full-disk", ("data", "prepare", "--source", "stdlib", "--out", "{tmp}/out", "--vocab-size", "400",
                           "--max-bytes", "40000", "--no-progress"), "tokenizer.json", fsize_limit=8_000),
    # eval
    Row("eval-data-missing", ("eval", "{run}", "--data", "{tmp}/nope"), "--data"),
    Row("eval-threads-zero", ("eval", "{run}", "--data", "{prep}", "--threads", "0"), "--threads", usage=True),
    Row("eval-checkpoint-missing", ("eval", "{tmp}/nope", "--data", "{prep}"), "nope"),
    Row("eval-truncated-model", ("eval", "{drun}", "--data", "{prep}"), "model.safetensors",
        setup=damaged(_truncate)),
    Row("eval-flipped-data-shard", ("eval", "{run}", "--data", "{ddata}"), "val.tokens.npy",
        setup=damaged_data(lambda p: _flip(p, -3), "val.tokens.npy")),
    Row("eval-truncated-data-shard", ("eval", "{run}", "--data", "{ddata}"), "val.tokens.npy",
        setup=damaged_data(_truncate, "val.tokens.npy")),
    Row("eval-garbage-manifest", ("eval", "{run}", "--data", "{ddata}"), "manifest.json",
        setup=damaged_data(lambda p: p.write_text("{x"), "manifest.json")),
    Row("eval-foreign-data", ("eval", "{run}", "--data", "{other}"), "tokenizer.json"),
    Row("eval-tasks-unknown", ("eval", "{run}", "--data", "{prep}", "--tasks", "hellaswag"), "--tasks"),
    Row("eval-tasks-empty", ("eval", "{run}", "--data", "{prep}", "--tasks", ","), "--tasks"),
    Row("eval-tasks-limit-zero", ("eval", "{run}", "--data", "{prep}", "--tasks", "engram_bpb", "--limit", "0"),
        "--limit", usage=True),
    Row("eval-tasks-data-missing", ("eval", "{run}", "--data", "{tmp}/nope", "--tasks", "engram_bpb"), "--data"),
    Row("eval-tasks-foreign-tokenizer", ("eval", "{run}", "--data", "{prep}", "--tasks", "engram_cloze",
                                         "--tokenizer", "{other}/tokenizer.json", "--max-examples", "3"),
        "tokenizer.json"),
    # generate
    Row("generate-tier-without-store", ("generate", "{run}", "--prompt", "x", "--tier", "mmap"), "--store"),
    Row("generate-no-verify-without-store", ("generate", "{run}", "--prompt", "x", "--no-verify-store"), "--store"),
    Row("generate-store-missing", ("generate", "{run}", "--prompt", "x", "--store", "{tmp}/nope"), "nope"),
    Row("generate-tokenizer-missing", ("generate", "{run}", "--prompt", "x", "--tokenizer", "{tmp}/t.json"),
        "t.json"),
    Row("generate-foreign-tokenizer", ("generate", "{run}", "--prompt", "x", "--tokenizer", "{other}/tokenizer.json"),
        "tokenizer.json"),
    Row("generate-emptied-model", ("generate", "{drun}", "--prompt", "x"), "model.safetensors",
        setup=damaged(lambda p: p.write_bytes(b""))),
    Row("generate-flipped-header", ("generate", "{drun}", "--prompt", "x"), "model.safetensors",
        setup=damaged(lambda p: _flip(p, 3))),
    Row("generate-device-unknown", ("generate", "{run}", "--prompt", "x", "--device", "nope"), "--device"),
    Row("generate-device-unavailable", ("generate", "{run}", "--prompt", "x", "--device", "mtia"), "--device"),
    Row("generate-threads-zero", ("generate", "{run}", "--prompt", "x", "--threads", "0"), "--threads", usage=True),
    Row("generate-mooncake-no-master", ("generate", "{run}", "--prompt", "x", "--store", "{store}", "--tier",
                                        "mooncake", "--mooncake-master", "127.0.0.1:{port}"), "127.0.0.1:{port}",
        process=True),
    # export-hf
    Row("export-hf-missing", ("export-hf", "{tmp}/nope", "{tmp}/out"), "nope"),
    Row("export-hf-out-not-empty", ("export-hf", "{run}", "{prep}"), "{prep}"),
    Row("export-hf-out-is-file", ("export-hf", "{run}", "{file}"), "a_file"),
    Row("export-hf-foreign-tokenizer", ("export-hf", "{run}", "{tmp}/out", "--tokenizer", "{other}/tokenizer.json"),
        "tokenizer.json"),
    Row("export-hf-flipped-model", ("export-hf", "{drun}", "{tmp}/out"), "model.safetensors",
        setup=damaged(lambda p: _flip(p, 3))),
    Row("export-hf-full-disk", ("export-hf", "{run}", "{tmp}/out"), "model.safetensors", fsize_limit=20_000),
    # serve (every row fails before the server would bind)
    Row("serve-tier-without-store", ("serve", "{run}", "--tier", "mmap"), "--store"),
    Row("serve-store-missing", ("serve", "{run}", "--store", "{tmp}/nope"), "nope"),
    Row("serve-checkpoint-missing", ("serve", "{tmp}/nope"), "nope"),
    Row("serve-port-negative", ("serve", "{run}", "--port", "-1"), "--port", usage=True),
    Row("serve-port-too-large", ("serve", "{run}", "--port", "70000"), "--port"),
    Row("serve-max-batch-zero", ("serve", "{run}", "--max-batch", "0"), "--max-batch", usage=True),
    Row("serve-max-len-past-the-model", ("serve", "{run}", "--max-len", "100000"), "--max-len"),
    Row("serve-flipped-model", ("serve", "{drun}"), "model.safetensors", setup=damaged(lambda p: _flip(p, 3))),
    # store build
    Row("store-build-out-is-file", ("store", "build", "{run}", "--out", "{file}"), "a_file"),
    Row("store-build-missing", ("store", "build", "{tmp}/nope", "--out", "{tmp}/out"), "nope"),
    Row("store-build-flipped-model", ("store", "build", "{drun}", "--out", "{tmp}/out"), "model.safetensors",
        setup=damaged(lambda p: _flip(p, 3))),
    Row("store-build-full-disk", ("store", "build", "{run}", "--out", "{tmp}/out", "--no-progress"), "layer_",
        fsize_limit=20_000),
    # analyze
    Row("analyze-text-file-latin1", ("analyze", "gates", "{run}", "--text-file", "{latin1}", "--data", "{prep}",
                                     "--out", "{tmp}/out"), "latin1.txt", process=True),
    Row("analyze-text-file-missing", ("analyze", "gates", "{run}", "--text-file", "{tmp}/nope.txt", "--data",
                                      "{prep}", "--out", "{tmp}/out"), "nope.txt"),
    Row("analyze-out-is-file", ("analyze", "gates", "{run}", "--text", "x", "--data", "{prep}", "--out", "{file}"),
        "a_file"),
    Row("analyze-plan-unknown", ("analyze", "plan", "nope", "--out", "{tmp}/out"), "nope"),
    Row("analyze-plan-bad-ranks", ("analyze", "plan", "tiny", "--ranks", "0,8"), "--ranks"),
    Row("analyze-plan-measured-no-fraction", ("analyze", "plan", "tiny", "--ranks", "2", "--unique-model",
                                              "measured"), "unique_fraction"),
    # plot, hash, info, demo
    Row("plot-run-missing", ("plot", "{tmp}/nope", "-o", "{tmp}/out.png"), "nope"),
    Row("plot-out-under-file", ("plot", "{run}", "-o", "{file}/x.png"), "a_file"),
    Row("hash-unknown-preset", ("hash", "--preset", "nope", "--text", "x"), "nope"),
    Row("info-unknown-preset", ("info", "nope"), "nope"),
    Row("demo-wrong-tokenizer", ("demo", "--preset", "demo", "--tokenizer", "{prep}/tokenizer.json"), "deepseek-v3"),
    Row("demo-file-missing", ("demo", "--file", "{tmp}/nope.txt", "--tokenizer", "{prep}/tokenizer.json"),
        "nope.txt"),
]  # fmt: skip


def _run_process(argv: list[str], fsize_limit: int | None) -> tuple[int, str]:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "ENGRAMLM_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "engramlm", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=limit if fsize_limit else None,
    )
    return proc.returncode, proc.stderr


def _run_inprocess(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    n = torch.get_num_threads()
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        torch.set_num_threads(n)
    return rc, capsys.readouterr().err


STATUS = re.compile(r"^(resuming from step \d+ \(checkpoint .+\)|starting a new run in .+)$")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_fault(
    row: Row,
    base: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if row.fsize_limit is not None and not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("no RLIMIT_FSIZE on this platform")
    monkeypatch.delenv("ENGRAMLM_DEBUG", raising=False)
    values = {**base, "tmp": str(tmp_path), "port": str(_free_port())}
    if row.setup is not None:
        values |= row.setup(base, tmp_path)
    before_tmp = _snapshot(tmp_path)
    before = _snapshot(base["root"])
    argv = [a.format(**values) for a in row.argv]
    if row.process or row.fsize_limit is not None:
        rc, err = _run_process(argv, row.fsize_limit)
    else:
        rc, err = _run_inprocess(argv, capsys)

    assert rc != 0, err
    assert "Traceback" not in err, err
    # `train` says where it starts before it can fail (one status line, not an error): not counted
    lines = [ln for ln in err.splitlines() if ln.strip() and not STATUS.match(ln)]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, err
    if not row.usage:
        assert len(lines) == 1, err
        assert lines[0].startswith("engramlm: error: "), err
    assert row.names.format(**values) in errors[0], err
    # Nothing new or half-written: no output path, no temp files; no earlier file changed.
    assert not (tmp_path / "out").exists(), sorted(os.listdir(tmp_path / "out"))
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".build-" in p.name]

    def kept(snap: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in snap.items() if not k.startswith(row.may_change)}

    assert kept(_snapshot(tmp_path)) == kept(before_tmp)  # e.g. the full-disk run's checkpoints 2 and 4
    assert _snapshot(base["root"]) == before


# ------------------------------------------------------------------------------------ the mechanism


def _fake_command(exc: BaseException) -> Callable[[list[str] | None], int]:
    def register(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("boom")

        def raise_it(_args: argparse.Namespace) -> int:
            raise exc

        p.set_defaults(func=raise_it)

    return register


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (RuntimeError("a bug"), cli.EXIT_BUG, "ENGRAMLM_DEBUG=1"),
        (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "interrupted"),
        (OSError(28, "No space left on device", "/x/y.bin"), cli.EXIT_OS_ERROR, "/x/y.bin: No space left"),
        (PermissionError(13, "Permission denied", "/ro/out"), cli.EXIT_OS_ERROR, "/ro/out: Permission denied"),
        (OSError(30, "Read-only file system", "/mnt/x"), cli.EXIT_OS_ERROR, "/mnt/x: Read-only file system"),
        (MemoryError(), cli.EXIT_OS_ERROR, "out of memory"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "0xff"),
    ],
)
def test_exception_mapping(
    exc: BaseException, code: int, text: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    module = types.ModuleType("engramlm_fake_boom")
    module.register = _fake_command(exc)
    monkeypatch.setitem(sys.modules, "engramlm_fake_boom", module)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "engramlm_fake_boom"))
    monkeypatch.delenv("ENGRAMLM_DEBUG", raising=False)
    assert cli.main(["boom"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and text in err, err
    if isinstance(exc, RuntimeError):
        monkeypatch.setenv("ENGRAMLM_DEBUG", "1")
        with pytest.raises(RuntimeError, match="a bug"):
            cli.main(["boom"])


def test_every_numeric_option_has_a_range() -> None:
    """A new int/float option must be classified (POSITIVE, NON_NEGATIVE or ANY_VALUE) in cli.main."""
    known = cli.POSITIVE | cli.NON_NEGATIVE | cli.ANY_VALUE
    parser = cli.build_parser()
    raw = [(cmd, a.dest) for cmd, a in cli.iter_actions(parser) if a.type in (int, float)]
    assert [(cmd, d) for cmd, d in raw if d not in known] == [], "unclassified numeric options"


@pytest.mark.parametrize("reader", ["process", "thread"])
def test_mooncake_tier_with_a_master_is_quiet(reader: str, base: dict[str, str], tmp_path: Path) -> None:
    """The positive side of the fast-fail check: a reachable master serves the tables, read by a reader process (the
    default) or a prefetch thread, and the clients' glog INFO lines stay off stderr (only the decode summary)."""
    pytest.importorskip("mooncake.store", reason="mooncake-transfer-engine-non-cuda is not installed")
    from engramlm.store.mooncake import local_master

    argv = ["generate", base["run"], "--prompt", "x", "--max-new-tokens", "4", "--store", base["store"]]
    with local_master(tmp_path / "master.log", timeout=15.0) as master:
        rc, err = _run_process(
            [*argv, "--tier", "mooncake", "--mooncake-master", master.rpc, "--mooncake-metadata", master.metadata,
             "--mooncake-segment-mb", "64", "--mooncake-reader", reader],
            None,
        )  # fmt: skip
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("[") and "tokens" in lines[0], err


@pytest.mark.parametrize("wait", [0.8, 2.0])
def test_ctrl_c_is_one_line(wait: float, base: dict[str, str], tmp_path: Path) -> None:
    """A real SIGINT while the command imports, loads or works: exit 130 and one line, no output left."""
    import time

    out = tmp_path / "out"
    argv = ["data", "prepare", "--source", "stdlib", "--out", str(out), "--vocab-size", "2000", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engramlm", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    time.sleep(wait)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip(f"finished within {wait} s")
    assert proc.returncode == cli.EXIT_INTERRUPTED, (proc.returncode, err)
    assert err.strip() == "engramlm: interrupted", err
    assert not out.exists() and not list(tmp_path.glob(".out.build-*"))
