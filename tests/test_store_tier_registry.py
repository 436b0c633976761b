"""One tier vocabulary: CLIs, planner and store directories all derive from ``store.tiers``.

Also: the RowTable base holds the table header, so no tier redefines it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import engramlm.store
from engramlm.analysis.planner import REFERENCE, PlanRequest, plan
from engramlm.cli.main import build_parser
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.hashing.spec import HashSpec
from engramlm.infer.tables import export_model_tables, open_tables
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.model import EngramLM
from engramlm.store.base import RowTable, TableHeader
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.formats import FP32
from engramlm.store.memory import MemoryTable
from engramlm.store.mmap import MmapTable
from engramlm.store.storedir import INDEX_NAME, export_tables, open_store_dir, read_index
from engramlm.store.tiers import INDEX_ALIASES, OPENERS, LayerPlacement, Medium, Placement, Tier
from helpers import tiny_lm

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*O_DIRECT")]

HEADER_NAMES = ("num_rows", "dim", "fingerprint", "row_format", "row_bytes")


@pytest.fixture(scope="module")
def model() -> EngramLM:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(61, 67), layer_ids=(0, 2))
    cfg = ModelConfig(
        vocab_size=48, hidden_size=16, num_layers=3, n_heads=2, mlp_hidden=24, hc_mult=2, max_seq_len=32,
        engram=EngramConfig(hash=spec, head_dim=8),
    )  # fmt: skip
    return tiny_lm(cfg).eval()


@pytest.fixture(scope="module")
def store(model: EngramLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    export_model_tables(model, out)
    return out


def _subcommand(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_cli_tier_choice_is_the_registry() -> None:
    parser = build_parser()
    for path in (("generate",), ("store", "build")):
        action = _option(_subcommand(parser, *path), "--tier")
        assert tuple(action.choices) == Tier.names() == tuple(OPENERS), path
        assert action.default in Tier.names(), path
    # The planner's --tier is the hardware word; every one has a reference device and a serving tier.
    plan_tier = _option(_subcommand(parser, "analyze", "plan"), "--tier")
    assert all(m in plan_tier.help for m in Medium.names())
    assert set(REFERENCE) == set(Medium) and all(isinstance(m.tier, Tier) for m in Medium)


def test_medium_to_tier_mapping() -> None:
    assert {m.value: m.tier.value for m in Medium} == {
        "hbm": "memory", "ram": "memory", "ssd": "direct", "remote": "mooncake"
    }  # fmt: skip


def _one_config_error(call, field: str, allowed: tuple[str, ...]) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{field}: must be one of "), msg
    listed = re.search(r"one of \[(.*?)\]", msg).group(1)
    assert [s.strip(" '") for s in listed.split(",")] == list(allowed), msg
    assert msg.count("must be one of") == 1
    return msg


@pytest.mark.parametrize("bad", ["ssd", "file", "hbm", "", "DIRECT"])
def test_unknown_tier_is_one_config_error(store: Path, tmp_path: Path, bad: str) -> None:
    names = Tier.names()
    _one_config_error(lambda: Tier.parse(bad), "tier", names)
    _one_config_error(lambda: Tier.parse(bad, field="--tier"), "--tier", names)
    _one_config_error(lambda: open_store_dir(store, tier=bad), "tier", names)
    _one_config_error(lambda: open_tables(store, bad), "tier", names)
    _one_config_error(lambda: LayerPlacement(bad), "tier", names)
    src = {0: MemoryTable(torch.zeros(4, 8), "0" * 64)}
    _one_config_error(lambda: export_tables(src, tmp_path, "fp32", "0" * 64, tier=bad), "tier", names)
    doc = {"layers": [{"layer_id": 0, "tier": bad}, {"layer_id": 2, "tier": "mmap"}]}
    _one_config_error(lambda: Placement.from_dict(doc), "placement.layers[0].tier", names)
    if bad not in Medium.names():
        _one_config_error(lambda: PlanRequest(tier=bad), "tier", Medium.names())


def test_old_index_spelling_is_read_but_not_accepted_as_an_argument(store: Path, tmp_path: Path) -> None:
    assert INDEX_ALIASES == {"file": Tier.DIRECT}
    assert read_index(store)["tier"] == "direct"  # what export writes now
    doc = json.loads((store / INDEX_NAME).read_text())
    old = tmp_path / "old"
    old.mkdir()
    for f in store.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / INDEX_NAME).write_text(json.dumps({**doc, "tier": "file"}))
    assert read_index(old)["tier"] == "direct"
    tables = open_store_dir(old)
    assert all(isinstance(t, DirectFileTable) for t in tables.values())
    for t in tables.values():
        t.close()
    with pytest.raises(ConfigError, match="tier: must be one of"):
        open_store_dir(old, tier="file")
    (old / INDEX_NAME).write_text(json.dumps({**doc, "tier": "floppy"}))
    with pytest.raises(CorruptFileError, match=r"store\.json tier: must be one of"):
        read_index(old)


@pytest.mark.parametrize(
    "medium, inner", [("hbm", MemoryTable), ("ram", MemoryTable), ("ssd", DirectFileTable)]
)  # fmt: skip
def test_plan_placement_opens_the_store(model: EngramLM, store: Path, medium: str, inner: type) -> None:
    p = plan(model.config, PlanRequest(dtype="fp32", tier=medium, cache_bytes=4096, cache_policy="lru"))
    doc = json.loads(json.dumps(p))  # what plan.json holds
    assert doc["placement"]["cache_policy"] == "lru"
    assert [e["layer_id"] for e in doc["placement"]["layers"]] == [0, 2]
    assert sum(e["cache_bytes"] for e in doc["placement"]["layers"]) <= 4096
    tables = open_store_dir(store, placement=doc["placement"], expected_fingerprint=model.layout.fingerprint)
    try:
        assert set(tables) == {0, 2}
        g = torch.Generator().manual_seed(1)
        for lid, table in tables.items():
            assert isinstance(table, CachedTable) and isinstance(table.inner, inner)
            assert table.policy == "lru" and table.capacity > 0
            w = model.engram_layers[lid].embed.weight.detach()
            ids = torch.randint(0, w.shape[0], (3, 5, 4), generator=g)
            assert torch.equal(table.gather(ids), w[ids])
    finally:
        for t in tables.values():
            t.close()


def test_placement_per_layer_and_refusals(store: Path) -> None:
    mixed = Placement({2: LayerPlacement(Tier.MMAP), 0: LayerPlacement("memory", cache_bytes=512)})
    assert list(mixed.layers) == [0, 2] and Placement.from_dict(mixed.to_dict()) == mixed
    tables = open_store_dir(store, placement=mixed)
    assert isinstance(tables[0], CachedTable) and isinstance(tables[0].inner, MemoryTable)
    assert isinstance(tables[2], MmapTable)
    for t in tables.values():
        t.close()
    with pytest.raises(ConfigError, match=r"placement: places layers \[0\], but .* holds layers \[0, 2\]"):
        open_store_dir(store, placement=Placement({0: LayerPlacement("mmap")}))
    with pytest.raises(ConfigError, match="not both"):
        open_store_dir(store, "mmap", placement=mixed)
    with pytest.raises(ConfigError, match="needs a set-up MooncakeDistributedStore"):
        open_store_dir(store, placement=Placement({0: LayerPlacement("mmap"), 2: LayerPlacement("mooncake")}))
    with pytest.raises(ConfigError, match="cache_bytes: must be an int >= 0"):
        LayerPlacement("mmap", cache_bytes=-1)
    with pytest.raises(ConfigError, match=r"cache_policy: must be one of \['lfu', 'lru', 'static'\]"):
        Placement({0: LayerPlacement("mmap")}, cache_policy="fifo")
    with pytest.raises(ConfigError, match="cache_policy"):
        PlanRequest(cache_policy="fifo")


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def test_row_table_header_is_held_once() -> None:
    for mod in pkgutil.iter_modules(engramlm.store.__path__):
        importlib.import_module(f"engramlm.store.{mod.name}")
    subclasses = {c for c in _all_subclasses(RowTable) if c.__module__.startswith("engramlm.")}
    assert {c.__name__ for c in subclasses} >= {
        "MemoryTable", "MmapTable", "DirectFileTable", "CachedTable", "MooncakeTable", "SafetensorsTable"
    }  # fmt: skip
    for cls in subclasses:
        redefined = [n for n in HEADER_NAMES if n in vars(cls)]
        assert not redefined, f"{cls.__name__} redefines {redefined}"
    assert RowTable.__abstractmethods__ == frozenset({"_fetch_unique"})
    table = MemoryTable(torch.zeros(5, 8), "A" * 64)
    assert table.table_header == TableHeader(5, 8, "a" * 64, FP32)
    assert (table.num_rows, table.dim, table.fingerprint, table.row_format, table.row_bytes) == (
        5, 8, "a" * 64, FP32, 32
    )  # fmt: skip
    cached = CachedTable(table, 64)
    assert cached.table_header is table.table_header
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        TableHeader(5, 0, "a" * 64, FP32)
    with pytest.raises(ValueError, match="fingerprint must be 64 hex"):
        TableHeader(5, 8, "xyz", FP32)
