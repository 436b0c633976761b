"""The layer map is enforced: ``lint-imports`` checks the contracts in pyproject.toml ([tool.importlinter]).

Layers, lower never importing higher: errors < utils < assets < nn | store | hashing | data < models
< dist < train | infer | analysis < cli, where ``|`` also forbids imports between siblings; and hashing never reaches
network, subprocess or download code. Why a test: a written map drifts, an upward import made in a hurry
compiles and runs; here it fails the suite with the offending import chain and line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pyproject.toml"
_LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with this checkout's contracts over the ``engramlm`` package found in ``src``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    env["COLUMNS"] = "200"  # rich wraps at the terminal width: keep each import chain on one line
    return subprocess.run(
        [sys.executable, "-c", _LINT, "--no-cache", "--no-logo", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


def test_the_package_keeps_its_import_contracts() -> None:
    out = lint_imports(REPO / "src")
    assert out.returncode == 0, f"lint-imports (pyproject.toml [tool.importlinter]):\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        # upward: the lowest layer importing the highest
        ("utils/io.py", "import engramlm.cli.main", "engramlm.utils is not allowed to import engramlm.cli"),
        # upward by one layer
        ("nn/norm.py", "import engramlm.models.config", "engramlm.nn is not allowed to import engramlm.models"),
        # between independent siblings
        ("data/loader.py", "import engramlm.hashing.batch", "engramlm.data is not allowed to import engramlm.hashing"),
        (
            "infer/sampling.py",
            "import engramlm.train.schedule",
            "engramlm.infer is not allowed to import engramlm.train",
        ),
        # hashing reaching the network
        ("hashing/batch.py", "import socket", "engramlm.hashing is not allowed to import socket"),
    ],
)
def test_a_forbidden_import_fails_with_its_line(tmp_path: Path, module: str, line: str, expected: str) -> None:
    """The contracts are live: one forbidden import added to a copy of the package breaks them, naming the line."""
    pkg = tmp_path / "engramlm"
    shutil.copytree(REPO / "src" / "engramlm", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    path = pkg / module
    text = path.read_text(encoding="utf-8")
    path.write_text(f"{text}\n{line}  # added by the test\n", encoding="utf-8")
    lineno = len(path.read_text(encoding="utf-8").splitlines())
    out = lint_imports(tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert expected in out.stdout, out.stdout
    importer = "engramlm." + module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {line.split()[1]} (l.{lineno})" in out.stdout, out.stdout
