"""``EngramForCausalLM``: an engramlm model as a HF ``PreTrainedModel`` + ``GenerationMixin``.

It wraps :class:`~engramlm.models.model.EngramLM` (``self.engram``), so the logits are the engramlm
forward's, bit for bit. Importing this module registers ``model_type = "engramlm"`` with ``AutoConfig``
and ``AutoModelForCausalLM`` (``engramlm`` must be installed: no code travels with an export, so no
``trust_remote_code``).

**Loading** (:meth:`EngramForCausalLM.from_pretrained`) goes through engramlm's own loader, not HF's
weight loader: every file is checked against ``checksums.json``, the hash artefact's fingerprint against
``config.json`` and the weights' metadata (:class:`~engramlm.errors.HashSpecMismatch` on a mismatch), and
against the ``EngramConfig`` given, if any. Saving (:meth:`save_pretrained`) writes the same layout.

**Generation.** The n-gram history lives in the cache: :class:`EngramCache` is a HF ``Cache`` holding one
:class:`~engramlm.models.decode.DecodeCache` (attention keys/values, every Engram layer's ShortConv state,
the streaming hasher's last N-1 compressed ids, lengths and lookback windows), so ``generate()`` runs
prefill + one-token steps exactly as ``engramlm generate`` does. Padding: an ``attention_mask`` whose ones
form one run per row (left or right padding) is compacted to right padding, the layout the decode cache
keeps (each row then continues after its own last real token); the logits come back at the caller's
columns (zeros at padding). Masks with holes, padding inside a cached continuation and right padding in
``generate()`` (which reads every row's logits at the last column) are refused.
Beam search, assisted decoding and cache cropping are refused (the streaming hasher cannot be rewound).

**Tables elsewhere.** :meth:`use_store` (or ``from_pretrained(..., engram_store=DIR, engram_tier=...)``)
serves the Engram rows from an engramlm store directory on any tier (``engramlm store build OUT --out DIR``)
through a :class:`~engramlm.store.prefetch.Prefetcher`, and frees the in-model tables; the rest of the model
can sit on an accelerator while the rows stay on the host or disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from engramlm.errors import ConfigError, HashSpecMismatch
from engramlm.hf.cache import EngramCache, compact, expand, runs
from engramlm.hf.configuration import MODEL_TYPE, EngramConfig
from engramlm.models.interface import EngramInputs
from engramlm.models.io import NO_ENGRAM
from engramlm.models.model import EngramLM

__all__ = ["EngramCache", "EngramForCausalLM", "register"]

GENERATION_CONFIG = "generation_config.json"
# from_pretrained keywords that only concern downloads; a local directory ignores them
_HUB_KWARGS = frozenset(
    {"cache_dir", "force_download", "local_files_only", "proxies", "revision", "token", "_from_auto",
     "trust_remote_code", "adapter_kwargs", "code_revision", "subfolder"}
)  # fmt: skip


# ------------------------------------------------------------------------------------ the model


class EngramPreTrainedModel(PreTrainedModel):
    config_class = EngramConfig
    base_model_prefix = "engram"
    main_input_name = "input_ids"
    _no_split_modules = ("Block",)


class EngramForCausalLM(EngramPreTrainedModel, GenerationMixin):
    """An :class:`EngramLM` behind the HF causal-LM interface (see the module docstring).

    ``EngramForCausalLM(config, engram)`` wraps a built model; ``EngramForCausalLM(config)`` builds one from
    ``config.model`` (its hash layout from the tokenizer the config names, or the identity map), which must
    give ``config.hash_fingerprint``.
    """

    def __init__(self, config: EngramConfig, engram: EngramLM | None = None) -> None:
        super().__init__(config)
        if engram is None:
            from engramlm.models.build import build_model

            engram = build_model(config.model_config())
        fp = engram.layout.fingerprint if engram.layout is not None else NO_ENGRAM
        if fp != config.hash_fingerprint:
            raise HashSpecMismatch(
                f"hash_fingerprint: the model hashes under {fp}, its EngramConfig says {config.hash_fingerprint}"
            )
        self.engram = engram
        self._prefetcher: Any = None
        self._tables: dict[int, Any] = {}
        self._weights_sha256: str | None = None
        self.post_init()

    # -------------------------------------------------------------- HF plumbing

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.engram.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.engram.lm_head

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: EngramLM initialises itself when built, and loading never re-initialises."""

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """An :class:`EngramCache` sized for ``generate()``'s ``max_length`` (no other cache can hold the state).

        Also refuses right padding here, once: generate() reads each row's next-token logits at the last column,
        which is padding for a right-padded row.
        """
        mask = model_kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask[:, -1].to(torch.bool).all()):
            raise ValueError(
                "attention_mask: generate() needs left padding (a right-padded row's last column is padding); "
                "set tokenizer.padding_side = 'left'"
            )
        given = model_kwargs.get("cache")
        if given is not None:
            if not isinstance(given, EngramCache):
                raise TypeError(f"cache: EngramForCausalLM needs an EngramCache, got {type(given).__name__}")
            given._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation: {generation_config.cache_implementation!r} is not supported; "
                "EngramForCausalLM keeps its own EngramCache (leave cache_implementation unset)"
            )
        model_kwargs["cache"] = EngramCache(max_len=max_cache_length + 1)

    # -------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EngramCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of ``input_ids`` [B, T] (and the shifted cross-entropy against ``labels``, -100 ignored).

        ``attention_mask`` [B, T] (or [B, past + T] with a cache): one run of ones per row. ``cache``: an
        :class:`EngramCache` to continue (``use_cache=True`` makes a new one). Without a cache this is the
        plain engramlm forward, so its logits equal ``EngramLM(input_ids).logits`` exactly.
        """
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(key, None):
                raise ValueError(f"{key}: not supported by EngramForCausalLM")
        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in ("logits_to_keep",))
        if extra:
            raise TypeError(f"EngramForCausalLM.forward got unsupported arguments {extra}")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("input_ids: required (Engram hashes token ids, so inputs_embeds cannot replace them)")
        if cache is None and use_cache:
            cache = EngramCache()
        if cache is not None and not isinstance(cache, EngramCache):
            raise TypeError(f"cache: EngramForCausalLM needs an EngramCache, got {type(cache).__name__}")
        ids = input_ids.to(torch.long)
        b, t = ids.shape
        first = n = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < t:
                got = tuple(attention_mask.shape)
                raise ValueError(f"attention_mask: must be [B, >= T] = [{b}, >= {t}], got {got}")
            chunk = attention_mask[:, -t:]
            if cache is not None and cache.columns:
                if not bool(chunk.to(torch.bool).all()):
                    raise ValueError("attention_mask: padding inside a cached continuation is not supported")
            elif not bool(chunk.to(torch.bool).all()):
                first, n = runs(chunk)
                ids = compact(ids, first.to(ids.device))
        logits = self._logits(ids, cache, None if n is None else n.cpu())
        if first is not None:
            logits = expand(logits, first, n)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            if attention_mask is not None:  # a target counts when it and the position predicting it are real
                real = attention_mask[:, -t:].to(targets.device, torch.bool)
                targets = targets.masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
            flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _logits(self, ids: torch.Tensor, cache: EngramCache | None, lengths: torch.Tensor | None) -> torch.Tensor:
        lm = self.engram
        device = next(lm.parameters()).device
        if cache is None:
            engram = self._with_rows(lm.engram_inputs(ids.cpu()) if self._prefetcher is not None else None)
            return lm(ids.to(device), engram=engram).logits
        dc = cache.state(lm, ids.shape[0], ids.shape[1])
        step = dc.begin(ids, lengths=lengths)
        out = lm(ids.to(dc.device), engram=self._with_rows(step.engram), kv=dc.kv)
        dc.commit(step)
        cache.columns += ids.shape[1]
        return out.logits

    def _with_rows(self, engram: EngramInputs | None) -> EngramInputs | None:
        """Start fetching the step's rows from the store (when one serves the tables)."""
        if engram is None or self._prefetcher is None:
            return engram
        handle = self._prefetcher.start({lid: ids for lid, ids in engram.row_ids.items() if lid in self._tables})
        return engram.with_rows(handle)

    # -------------------------------------------------------------- tables in a store

    def use_store(
        self,
        directory: str | os.PathLike[str],
        tier: str = "mmap",
        *,
        cache_mb: float = 0.0,
        workers: int = 2,
        verify: bool = True,
        drop_tables: bool = True,
    ) -> EngramForCausalLM:
        """Serve the Engram rows from the store ``directory`` (``store.json``) on ``tier`` instead of the model.

        The store must hold these weights' tables under this hash spec (``ForeignStoreError`` /
        :class:`HashSpecMismatch` otherwise; build it with ``engramlm store build MODEL --out DIR``).
        ``cache_mb``: a hot-row cache in front of every layer; ``drop_tables``: free the in-model tables.
        Returns ``self``.
        """
        from engramlm.infer.tables import drop_model_tables, open_tables
        from engramlm.store.prefetch import Prefetcher

        layout = self.engram.layout
        if layout is None:
            raise ConfigError("engram_store: the model has no Engram layers")
        tables = open_tables(
            directory,
            tier,
            cache_bytes=int(cache_mb * (1 << 20)),
            fingerprint=layout.fingerprint,
            model_sha256=self._weights_sha256,
            verify=verify,
        )
        try:
            for lid, table in tables.items():
                if lid not in layout.layer_ids:
                    raise ConfigError(f"engram_store: layer {lid} is not an Engram layer ({list(layout.layer_ids)})")
                rows, dim = layout.rows_of(lid), self.engram.engram_layers[lid].head_dim
                if (table.num_rows, table.dim) != (rows, dim):
                    raise HashSpecMismatch(
                        f"engram_store: layer {lid} is {table.num_rows}x{table.dim}, the model needs {rows}x{dim}"
                    )
            ref = next(self.engram.parameters())
            prefetcher = Prefetcher(tables, workers=workers, device=ref.device, dtype=ref.dtype)
        except BaseException:
            for t in tables.values():
                t.close()
            raise
        self.close_store()
        self._tables, self._prefetcher = tables, prefetcher
        if drop_tables:
            drop_model_tables(self.engram)
        return self

    def close_store(self) -> None:
        """Stop the prefetcher and close the store's tables (the model cannot run on dropped tables after)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        for t in self._tables.values():
            t.close()
        self._prefetcher, self._tables = None, {}

    # -------------------------------------------------------------- save / load

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """engramlm's saved-model layout (checksummed, fingerprinted) with this HF config and generation config."""
        from engramlm.hf.export import write_hf_files

        if self._prefetcher is not None:
            raise ConfigError("save_pretrained: the tables are served from a store and were dropped from the model")
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub: not supported; save locally and upload the directory")
        from engramlm.models.io import save_pretrained

        out = save_pretrained(self.engram, save_directory)
        write_hf_files(out, self.config, self.generation_config)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        config: EngramConfig | None = None,
        engram_store: str | os.PathLike[str] | None = None,
        engram_tier: str = "mmap",
        engram_cache_mb: float = 0.0,
        dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> EngramForCausalLM:
        """Load an export (``engramlm export-hf``) or any engramlm saved model, checked as engramlm checks it.

        ``engram_store``/``engram_tier``/``engram_cache_mb``: serve the tables from a store (:meth:`use_store`).
        ``dtype`` (or ``torch_dtype``): a torch dtype or ``"auto"`` (as saved); ``device_map``: one device
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, an index); splitting a model across devices is not supported.
        """
        from engramlm.models.locate import load_trained_model

        if model_args:
            raise TypeError("EngramForCausalLM.from_pretrained takes no positional model arguments")
        dtype = dtype if dtype is not None else kwargs.pop("torch_dtype", None)
        unknown = sorted(k for k, v in kwargs.items() if k not in _HUB_KWARGS and v is not None)
        if unknown:
            raise TypeError(f"EngramForCausalLM.from_pretrained got unsupported arguments {unknown}")
        path = _resolve(pretrained_model_name_or_path, kwargs)
        device = _one_device(device_map)
        trained = load_trained_model(path, map_location="cpu", inference=False)
        model = trained.model
        if config is None:
            config = AutoConfig.from_pretrained(path)
        if not isinstance(config, EngramConfig):
            raise ConfigError(f"config: {path} holds a {type(config).__name__}, not an EngramConfig")
        mine = model.layout.fingerprint if model.layout is not None else NO_ENGRAM
        if config.hash_fingerprint != mine:
            raise HashSpecMismatch(
                f"{path}: the saved hash artefact has fingerprint {mine}, the EngramConfig says "
                f"{config.hash_fingerprint}; the config belongs to another model"
            )
        if config.model_config() != model.config:
            raise ConfigError(f"config: {path} holds another model config than the EngramConfig given")
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        hf = cls(config, model)
        hf._weights_sha256 = trained.files.weights_sha256()
        hf.name_or_path = str(pretrained_model_name_or_path)
        if (path / GENERATION_CONFIG).is_file():
            hf.generation_config = GenerationConfig.from_pretrained(path)
        hf.to(device)
        hf.eval()
        if engram_store is not None:
            hf.use_store(engram_store, engram_tier, cache_mb=engram_cache_mb)
        return hf


def _resolve(name: str | os.PathLike[str], kwargs: Mapping[str, Any]) -> Path:
    """A local directory as is; otherwise a Hub snapshot (huggingface_hub, honouring HF_HUB_OFFLINE)."""
    path = Path(name) / (kwargs.get("subfolder") or "")
    if path.is_dir():
        return path
    if Path(name).exists():
        raise ConfigError(f"{name}: not a directory (an export is a directory: engramlm export-hf RUN OUT)")
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        str(name),
        revision=kwargs.get("revision"),
        cache_dir=kwargs.get("cache_dir"),
        local_files_only=bool(kwargs.get("local_files_only")),
        token=kwargs.get("token"),
    )
    return Path(local) / (kwargs.get("subfolder") or "")


def _one_device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return torch.device(device_map)
    raise ConfigError(
        f"device_map: {device_map!r} is not one device; EngramForCausalLM loads onto one device "
        "(keep the tables off it with engram_store=DIR, engram_tier=...)"
    )


def register() -> None:
    """Register ``model_type = "engramlm"`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, EngramConfig, exist_ok=True)
    AutoModelForCausalLM.register(EngramConfig, EngramForCausalLM, exist_ok=True)


register()
