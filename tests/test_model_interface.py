"""The model's boundary: one EngramInputs object in, a forward that commits nothing, no import loop in models/."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from engramlm.errors import ConfigError
from engramlm.models.decode import DecodeCache
from engramlm.models.interface import EngramInputs
from engramlm.models.model import EngramLM
from helpers import tiny_lm
from test_model import V, config, randint

MODELS = Path(__file__).resolve().parents[1] / "src" / "engramlm" / "models"


def test_forward_has_at_most_four_parameters() -> None:
    params = [p for p in inspect.signature(EngramLM.forward).parameters if p != "self"]
    assert params == ["input_ids", "targets", "engram", "kv"]


def _models_import_graph() -> dict[str, set[str]]:
    """Module -> the engramlm.models modules it imports (TYPE_CHECKING imports included)."""
    names = {p.stem for p in MODELS.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((MODELS / f"{name}.py").read_text(encoding="utf-8"))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[:2] == ["engramlm", "models"]:
                    if len(parts) > 2:
                        deps.add(parts[2])
                    else:
                        deps.update(a.name for a in node.names if a.name in names)
        graph[name] = deps & names
    return graph


def test_no_import_loop_inside_models() -> None:
    graph = _models_import_graph()
    assert "model" not in graph["decode"] and "decode" not in graph["model"]
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        if node in path:
            raise AssertionError(f"import loop in engramlm.models: {' -> '.join((*path, node))}")
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, (*path, node))
        done.add(node)

    for name in sorted(graph):
        visit(name, ())


@torch.no_grad()
def test_forward_reads_the_decode_state_and_the_caller_commits_it() -> None:
    model = tiny_lm(config(use_moe=False), random_conv=True).eval()
    ids = randint((2, 7))
    cache = DecodeCache(model, 2, 16)
    step = cache.begin(ids)
    hist = {lid: state.hist.clone() for lid, state in cache.conv.items()}
    first = model(ids, engram=step.engram, kv=cache.kv).logits
    assert int(cache.pos.sum()) == 0 and torch.equal(cache.start, torch.zeros(2, dtype=torch.long))
    assert any(not torch.equal(hist[lid], cache.conv[lid].hist) for lid in hist)  # the cached forward wrote its state
    cache.commit(step)
    assert cache.pos.tolist() == [7, 7]
    torch.testing.assert_close(first, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_engram_inputs_are_checked_at_the_edge() -> None:
    model = tiny_lm(config(use_moe=False)).eval()
    ids = randint((1, 6))
    rid = model.hash(ids)
    bad = rid.clone()
    lid = model.layout.layer_ids[0]
    bad[0, 0, 0, 0] = model.layout.rows_of(lid)
    with pytest.raises(IndexError, match=rf"row_ids\[{lid}\]: row ids must lie in \[0, {model.layout.rows_of(lid)}\)"):
        model.engram_inputs(ids, row_ids=bad)
    with pytest.raises(ValueError, match="H_e="):
        model.engram_inputs(ids, row_ids=rid[..., :1])
    rows = {lid: torch.zeros(1, 6, model.layout.heads_per_layer, 8)}
    with pytest.raises(ValueError, match=rf"layers \[{lid}\] have both row ids and rows"):
        EngramInputs(row_ids=model.layout.split(rid), rows=rows)
    with pytest.raises(ConfigError, match="kv"):
        model(ids, kv=DecodeCache(model, 1, 8).kv)
    with pytest.raises(IndexError, match=rf"\[0, {V}\)"):
        model.engram_inputs(torch.full((1, 3), V))


def test_engram_inputs_hash_only_what_is_missing() -> None:
    model = tiny_lm(config(hash_kw=dict(layer_ids=(0, 2)))).eval()
    ids = randint((2, 5))
    rid = model.layout.split(model.hash(ids))
    rows = {2: torch.zeros(2, 5, model.layout.heads_per_layer, 4)}
    inp = model.engram_inputs(ids, rows=rows, skip_engram={0})
    assert set(inp.rows) == {2} and not inp.row_ids and inp.skip == frozenset({0})
    inp = model.engram_inputs(ids, rows=rows)
    assert set(inp.row_ids) == {0} and torch.equal(inp.row_ids[0], rid[0])
    swapped = inp.with_rows({0: torch.zeros(2, 5, model.layout.heads_per_layer, 4)})
    assert set(swapped.rows) == {0} and not swapped.row_ids
    assert tiny_lm(config().replace(engram=None)).engram_inputs(ids) is None
