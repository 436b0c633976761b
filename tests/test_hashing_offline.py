"""The hashing layer never reaches the network: tokenizer names are resolved at the edge (issue 12 item 6)."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import engramlm.assets as assets
from engramlm.errors import ConfigError
from engramlm.hashing.compression import CompressionMap

HASHING = Path(__file__).resolve().parent.parent / "src" / "engramlm" / "hashing"
# Modules that download, spawn or open sockets; none belongs in the hashing layer.
FORBIDDEN = ("engramlm.assets", "urllib", "http", "socket", "subprocess", "requests", "huggingface_hub", "pip")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", sorted(HASHING.glob("*.py")), ids=lambda p: p.name)
def test_hashing_modules_import_nothing_that_reaches_the_network(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"{path.name} imports {bad}"


def test_importing_hashing_loads_no_asset_fetcher() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import engramlm.hashing as h\n"
        "for m in pkgutil.iter_modules(h.__path__): importlib.import_module('engramlm.hashing.' + m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('engramlm.') or m in ('pip', 'requests'))))\n"
    )
    src = str(HASHING.parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PATH": "", "HF_HUB_OFFLINE": "1"})  # fmt: skip
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    allowed = ("engramlm.hashing", "engramlm.utils", "engramlm.errors")
    assert all(m.startswith(allowed) for m in loaded), loaded
    assert "pip" not in loaded and "requests" not in loaded


def test_from_tokenizer_refuses_a_name_without_resolving_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise AssertionError("the hashing layer must not resolve tokenizer names")

    monkeypatch.setattr(assets, "resolve_tokenizer", boom)
    monkeypatch.setattr(assets, "_fetch", boom)
    with pytest.raises(ConfigError) as info:
        CompressionMap.from_tokenizer("deepseek-v3")
    assert info.value.field == "tokenizer" and "resolve_tokenizer" in info.value.message


def test_build_layout_resolves_names_at_the_edge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    import engramlm.models.build as build
    from engramlm.models.presets import get_preset

    tok = Tokenizer(models.WordLevel({"a": 0, "A": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    seen: list[str] = []

    def fake_resolve(name: str) -> Path:
        seen.append(name)
        return path

    monkeypatch.setattr(build, "resolve_tokenizer", fake_resolve)
    base = get_preset("tiny")
    engram = dataclasses.replace(base.engram, tokenizer="some-name", hash=base.engram.hash.replace(pad_id=0))
    layout = build.build_layout(base.replace(vocab_size=4, engram=engram))
    assert seen == ["some-name"]
    assert layout.compression.vocab_size == 4 and layout.compression.tokenizer_sha256 is not None
