"""Save and load models: safetensors weights, JSON config, and the hash artefact. No pickle.

Directory layout::

    config.json             model config (+ format version)
    engram_hash.safetensors compression map, multipliers, primes, hash spec, fingerprint
    model.safetensors       weights; metadata carries the hash-spec fingerprint

Every file is written atomically. Loading refuses weights whose fingerprint differs from the
artefact's, or from a layout the caller insists on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engramlm.errors import ConfigError, CorruptFileError, HashSpecMismatch
from engramlm.hashing.artifact import load_layout, save_layout
from engramlm.hashing.spec import HashLayout
from engramlm.models.config import ModelConfig
from engramlm.models.model import EngramLM
from engramlm.utils.io import atomic_write_bytes, atomic_write_json

MODEL_FORMAT = "engramlm.model"
MODEL_VERSION = 1
NO_ENGRAM = "none"


def save_pretrained(model: EngramLM, directory: str | Path) -> Path:
    from safetensors.torch import save

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model.layout.fingerprint if model.layout is not None else NO_ENGRAM
    if model.layout is not None:
        save_layout(model.layout, out / "engram_hash.safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    meta = {"format": MODEL_FORMAT, "version": str(MODEL_VERSION), "hash_fingerprint": fingerprint}
    atomic_write_bytes(out / "model.safetensors", save(state, metadata=meta))
    atomic_write_json(
        out / "config.json",
        {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "hash_fingerprint": fingerprint,
            "model": model.config.to_dict(),
        },
    )
    return out


def load_pretrained(
    directory: str | Path, *, layout: HashLayout | None = None, map_location: str | torch.device = "cpu"
) -> EngramLM:
    from safetensors import safe_open

    src = Path(directory)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CorruptFileError(f"{src}: no config.json (is this a saved engramlm model?)")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CorruptFileError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if doc.get("format") != MODEL_FORMAT or doc.get("version") != MODEL_VERSION:
        raise CorruptFileError(f"{cfg_path}: not an engramlm model v{MODEL_VERSION}")
    config = ModelConfig.from_dict(doc["model"])
    stored = doc.get("hash_fingerprint", NO_ENGRAM)
    saved_layout = None
    if config.engram is not None:
        saved_layout = load_layout(src / "engram_hash.safetensors")
        saved_layout.check_fingerprint(stored, what=f"model {src}")
        if layout is not None:
            layout.check_fingerprint(saved_layout.fingerprint, what=f"model {src}")
            saved_layout = layout
    elif layout is not None:
        raise ConfigError("layout: the saved model has no Engram layers")
    model = EngramLM(config, saved_layout)
    weights = src / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CorruptFileError(f"{weights}: not a readable safetensors file: {exc}") from exc
    if meta.get("hash_fingerprint") != stored:
        raise HashSpecMismatch(
            f"{weights} was written under hash fingerprint {meta.get('hash_fingerprint')!r}, "
            f"but {cfg_path} says {stored!r}"
        )
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptFileError(f"{weights}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(map_location)
