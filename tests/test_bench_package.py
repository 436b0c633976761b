"""benchmarks/ is a package run as ``python -m benchmarks.<name>``: no module edits sys.path, each imports as
``benchmarks.<name>``, a module run from the repository root works with nothing on PYTHONPATH for it, and the
recorded command is the ``-m`` form that can be pasted back.

Why: a benchmark that found its siblings through a sys.path edit worked only as a script from one folder, and
the tests had to load it through an importlib hack; a result's command that named the module's file path would
not run again as recorded.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import _common

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__")


def test_no_benchmark_edits_sys_path() -> None:
    offenders = [m for m in MODULES if re.search(r"sys\.path\b", (REPO / "benchmarks" / f"{m}.py").read_text())]
    assert offenders == []


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_imports_as_a_package_module(name: str) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__name__ == f"benchmarks.{name}"


def test_make_tables_runs_as_a_module_from_the_repository_root(tmp_path: Path) -> None:
    env = dict(os.environ)
    # engramlm may come from PYTHONPATH (a worktree) or the install; the benchmarks package only from the cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ".")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.make_tables", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert out.returncode == 0, out.stderr


def test_command_line_records_the_module_form(monkeypatch) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec("benchmarks.bench_store", None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "bench_store.py"), "--formats", "fp32", "--dir", "a b"])
    assert _common.command_line() == "python -m benchmarks.bench_store --formats fp32 --dir 'a b'"


def test_command_line_keeps_a_plain_script_command(monkeypatch) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["tool.py", "--quick"])
    assert _common.command_line() == "python tool.py --quick"
