"""Save and load models: safetensors weights, JSON config, and the hash artefact. No pickle.

Directory layout::

    config.json             model config (+ format version)
    engram_hash.safetensors compression map, multipliers, primes, hash spec, fingerprint
    model.safetensors       weights; metadata carries the hash-spec fingerprint
    checksums.json          sha256 of each file above, written last

Every file is written atomically, ``checksums.json`` last (a directory without it was not finished, or
was saved before digests were recorded). Loading checks every file against its sha256 first
(:func:`verify_saved_model`; one pass over the files, ~1.5 GB/s for sha256 on this machine's CPU,
so ~0.7 s per GB of weights), then refuses weights whose fingerprint differs from the artefact's, or
from a layout the caller insists on. A directory saved before digests were recorded (no
``checksums.json``) still loads, with one warning: refusing would strand every model saved until now,
and re-saving it records the digests.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from engramlm.errors import ConfigError, CorruptFileError, CorruptModelFileError, HashSpecMismatch
from engramlm.hashing.artifact import load_layout, save_layout
from engramlm.hashing.spec import HashLayout
from engramlm.models.config import ModelConfig
from engramlm.models.model import EngramLM
from engramlm.utils.io import atomic_write_bytes, atomic_write_json, sha256_file

MODEL_FORMAT = "engramlm.model"
MODEL_VERSION = 1
NO_ENGRAM = "none"
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "engramlm.checksums"
_SAVED_FILES = ("config.json", "engram_hash.safetensors", "model.safetensors")


def write_checksums(directory: str | Path) -> dict[str, str]:
    """Record the sha256 of the saved model's files in ``checksums.json`` (atomically); returns them."""
    out = Path(directory)
    files = {name: sha256_file(out / name) for name in _SAVED_FILES if (out / name).is_file()}
    doc = {"format": CHECKSUMS_FORMAT, "version": 1, "algorithm": "sha256", "files": files}
    atomic_write_json(out / CHECKSUMS, doc)
    return files


def recorded_checksums(directory: str | Path) -> dict[str, str]:
    """The digests ``checksums.json`` records (as written; not recomputed), keyed by file name; the one reader
    of that file (:class:`CorruptModelFileError` for an unreadable or malformed one)."""
    path = Path(directory) / CHECKSUMS
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptModelFileError(f"{path}: not a readable JSON file ({exc})") from exc
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == CHECKSUMS_FORMAT else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CorruptModelFileError(f"{path}: not an {CHECKSUMS_FORMAT} file (no 'files' table of sha256 digests)")
    return dict(files)


def verify_saved_model(directory: str | Path) -> dict[str, str] | None:
    """Check a saved model's files against ``checksums.json``; returns the digests, or None (with one
    warning) for a directory saved before digests were recorded. A mismatch, a listed file that is
    missing or a saved file that is not listed raises :class:`CorruptModelFileError` naming the file."""
    src = Path(directory)
    path = src / CHECKSUMS
    if not path.is_file():
        warnings.warn(
            f"{src}: no {CHECKSUMS} (saved before file digests were recorded), so its files are not verified; "
            "re-save it with save_pretrained to record them",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    files = recorded_checksums(src)
    for name in _SAVED_FILES:
        if (src / name).is_file() and name not in files:
            raise CorruptModelFileError(f"{src / name}: not listed in {path}; the saved model is corrupt")
    for name, digest in files.items():
        f = src / name
        if not f.is_file():
            raise CorruptModelFileError(f"{f}: missing, but {path} lists it; the saved model is corrupt")
        if sha256_file(f) != digest:
            raise CorruptModelFileError(f"{f}: sha256 does not match {path}; the file is corrupt")
    return files


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
    write_checksums(out)
    return out


def load_pretrained(
    directory: str | Path,
    *,
    layout: HashLayout | None = None,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> EngramLM:
    """Load a saved model. ``verify``: check its files against ``checksums.json`` first (default; False
    for a caller that has already checked them, e.g. against a training checkpoint's digests)."""
    from safetensors import safe_open

    src = Path(directory)
    if verify and (src / "config.json").is_file():
        verify_saved_model(src)
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
    # tables trained on SSD (engram.table_tier=ssd) are saved as [0, d_h] placeholders: build the model without
    # allocating them; their rows come from a store (store build streams them from the run's table files)
    external = [k for k, v in state.items() if k.endswith(".engram.embed.weight") and v.shape[0] == 0]
    if external:
        from engramlm.nn.engram import external_tables

        with external_tables(lambda *_: None):
            model = EngramLM(config, saved_layout)
    else:
        model = EngramLM(config, saved_layout)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptFileError(f"{weights}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(map_location)
