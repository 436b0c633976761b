"""Builders shared by the tests (``from helpers import tiny_lm``; tests/ is on sys.path).

Each test module keeps its own ``ModelConfig`` (sizes tuned to what it checks); what they share is
how a config becomes a seeded model over the identity compression map.
"""

from __future__ import annotations

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


def tiny_model_toml(hc_mult: int = 2) -> str:
    """The ``[model]`` section of the tiny training runs the CLI tests share: the ``tiny`` preset shrunk to a
    2-layer Engram model on a 400-id BPE (seconds per run on one core)."""
    return f"""[model]
preset = "tiny"
[model.overrides]
vocab_size = 400
hidden_size = 32
num_layers = 2
n_heads = 2
mlp_hidden = 64
hc_mult = {hc_mult}
"engram.hash.engram_vocab_size" = [997, 997]
"engram.head_dim" = 8
"""


def run_toml(
    steps: int,
    every: int,
    keep: int,
    eval_every: int,
    *,
    seed: int = 3,
    eval_batch_size: int = 4,
    eval_max_batches: int = 1,
) -> str:
    """The run and ``[data]`` sections of the small training runs the resume / SSD / distributed tests share
    (batches of 4 x 32 tokens, one thread, no TensorBoard or progress bar); ``data.dir`` is added by the test."""
    return f"""
steps = {steps}
seed = {seed}
checkpoint_every = {every}
keep_checkpoints = {keep}
eval_every = {eval_every}
threads = 1
tensorboard = false
progress = false
[data]
batch_size = 4
seq_len = 32
eval_batch_size = {eval_batch_size}
eval_max_batches = {eval_max_batches}
"""
