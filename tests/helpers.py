"""Builders shared by the tests (``from helpers import tiny_lm``; tests/ is on sys.path).

Each test module keeps its own ``ModelConfig`` (sizes tuned to what it checks); what they share is
how a config becomes a seeded model over the identity compression map.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import make_layout
from engramlm.models.config import ModelConfig
from engramlm.models.model import EngramLM


def randomise_conv(model: EngramLM) -> None:
    """Draw every Engram ShortConv's weights: the zero init would hide a wrong conv or decode state."""
    with torch.no_grad():
        for blk in model.engram_layers.values():
            if blk.conv is not None:
                blk.conv.weight.normal_()


def tiny_lm(cfg: ModelConfig, seed: int = 0, *, random_conv: bool = False) -> EngramLM:
    """``EngramLM(cfg)`` seeded with ``seed``, hashing raw token ids (identity compression map)."""
    torch.manual_seed(seed)
    layout = make_layout(cfg.engram.hash, CompressionMap.identity(cfg.vocab_size)) if cfg.engram else None
    model = EngramLM(cfg, layout)
    if random_conv:
        randomise_conv(model)
    return model


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module: benchmarks are scripts, not a package, and import each other
    by bare name (``from _common import ...``), so their folder goes on sys.path first."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
