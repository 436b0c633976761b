"""``EngramConfig``: the HF ``PreTrainedConfig`` of an engramlm model (``model_type = "engramlm"``).

Why it carries the engramlm config whole: one ``config.json`` serves both worlds. An export
(:mod:`engramlm.hf.export`) is at the same time an engramlm saved model (``format``, ``version``,
``hash_fingerprint``, ``model``: what :func:`engramlm.models.io.load_pretrained` reads) and a HF model
directory (``model_type``, ``architectures``, special-token ids: what ``AutoConfig`` reads). The HF
fields ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ... are derived from ``model`` so HF
utilities that read them see the real sizes; ``model`` stays the source of truth.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from engramlm.errors import ConfigError
from engramlm.models.config import ModelConfig
from engramlm.models.io import MODEL_FORMAT, MODEL_VERSION, NO_ENGRAM

__all__ = ["MODEL_TYPE", "EngramConfig"]

MODEL_TYPE = "engramlm"


class EngramConfig(PreTrainedConfig):
    """HF view of a :class:`~engramlm.models.config.ModelConfig` plus the hash fingerprint it was saved under.

    ``model``: the engramlm model config as a dict (``ModelConfig.to_dict()``), validated here;
    ``hash_fingerprint``: the fingerprint of the hash artefact saved with the weights (``"none"`` for a
    model without Engram layers), checked against the loaded artefact by ``EngramForCausalLM.from_pretrained``.
    """

    model_type = MODEL_TYPE

    format: str = MODEL_FORMAT
    version: int = MODEL_VERSION
    hash_fingerprint: str = NO_ENGRAM
    model: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.format != MODEL_FORMAT or self.version != MODEL_VERSION:
            raise ConfigError(
                f"format: an engramlm HF config has format {MODEL_FORMAT!r} version {MODEL_VERSION}, "
                f"got {self.format!r} version {self.version!r}"
            )
        if self.model is not None:
            cfg = self.model_config()  # validates: one ConfigError naming the field
            self.vocab_size = cfg.vocab_size
            self.hidden_size = cfg.hidden_size
            self.num_hidden_layers = cfg.num_layers
            self.num_attention_heads = cfg.n_heads
            self.num_key_value_heads = cfg.n_kv_heads or cfg.n_heads
            self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The engramlm :class:`ModelConfig` this config describes."""
        if self.model is None:
            raise ConfigError("model: this EngramConfig holds no engramlm model config")
        try:
            return ModelConfig.from_dict(self.model)
        except ConfigError as exc:
            raise exc.under("model") from None

    @classmethod
    def from_model_config(
        cls,
        config: ModelConfig,
        hash_fingerprint: str,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> EngramConfig:
        """The HF config of an engramlm model saved under ``hash_fingerprint``."""
        return cls(
            model=config.to_dict(),
            hash_fingerprint=hash_fingerprint,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            architectures=["EngramForCausalLM"],
        )
