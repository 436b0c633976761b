"""Engram added to an existing HF transformers causal LM (Llama, Qwen2, GPT-2, ...), like an adapter.

``add_engram(model, tokenizer, layers=[1], preset=... | geometry)`` builds one :class:`EngramBlock`
per chosen decoder layer (one residual branch, M = 1) and a hash layout from the model's own tokenizer
(the exact compression map, multipliers and primes of ``engramlm.hashing``), and attaches them as the
submodule ``model.engram_adapter``. Nothing in the base model is replaced, so its weight names,
``save_pretrained`` and ``from_pretrained`` stay as they were:

* a forward pre-hook on the base model (``model.base_model``) hashes ``input_ids`` once per forward,
  for every Engram layer at once, and keeps the step's row ids (or rows gathered by the sparse
  optimiser);
* a forward pre-hook on each chosen decoder layer replaces its input ``hidden_states`` by
  ``h + Engram(h)``: the block sits before the layer's attention, as in the spec.

The block's value path starts at zero (the fused projection's value rows are zeroed at insertion, on
top of the spec's zero-initialised ShortConv), so the model's outputs are unchanged until it trains.

**Padding and cached generation.** Positions the ``attention_mask`` marks as padding are DEAD (spec
§11.4): no lookback reaches them and their Engram output is zero, so a left-padded row hashes exactly
like the same row unpadded. With a KV cache (``generate``), the adapter keeps, per sequence, the last
N-1 token ids, the lookback window and every layer's ShortConv state, so each cached step gets the
row ids and conv inputs of one full forward. The history belongs to the batch the prefill saw:
beam search (which reorders the cache) is not supported; a continuation whose cache length does not
match the history raises.

**Training.** :func:`engram_optimizers` returns ``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``
or a plain loop: AdamW for the dense parameters (base frozen or not) and :class:`SparseRowAdam` for
the tables, whose rows are gathered per step outside autograd (no dense table gradient).

**Saving.** :func:`save_engram` writes only the Engram weights (safetensors, fingerprint in metadata),
the hash artefact (the tokenizer's compression map, multipliers, primes) and a JSON config;
:func:`load_engram` refuses another tokenizer (:class:`ForeignTokenizerError`), another spec or another
base geometry (:class:`HashSpecMismatch` / :class:`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engramlm.errors import ConfigError, CorruptFileError, ForeignTokenizerError, HashSpecMismatch
from engramlm.hashing.artifact import load_layout, save_layout
from engramlm.hashing.batch import NgramHasher, window_starts
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashLayout, HashSpec, make_layout
from engramlm.models.config import EngramConfig
from engramlm.models.presets import get_preset
from engramlm.nn.engram import ConvState, EngramBlock
from engramlm.train.sparse_adam import SparseRowAdam
from engramlm.utils.config import to_jsonable
from engramlm.utils.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT",
    "ADAPTER_HASH",
    "ADAPTER_WEIGHTS",
    "EngramAdamW",
    "EngramAdapter",
    "add_engram",
    "compression_map_of",
    "decoder_layers",
    "engram_optimizers",
    "load_engram",
    "save_engram",
]

ADAPTER_FORMAT = "engramlm.hf_engram_adapter"
ADAPTER_VERSION = 1
ADAPTER_CONFIG = "engram_adapter.json"
ADAPTER_WEIGHTS = "engram_adapter.safetensors"
ADAPTER_HASH = "engram_hash.safetensors"
ATTR = "engram_adapter"
# Where known architectures keep their decoder layers, relative to ``model.base_model``.
_LAYER_PATHS = ("layers", "h", "decoder.layers", "blocks")
_HASH_FIELDS = {f.name for f in dataclasses.fields(HashSpec)}
_BLOCK_FIELDS = {f.name for f in dataclasses.fields(EngramConfig)} - {"hash", "tokenizer", "table_dtype"}


# ------------------------------------------------------------------------------------------ tokenizer


def _backend_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind an HF tokenizer (or the object itself / a loaded file)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return Tokenizer.from_file(str(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise ConfigError(
        f"tokenizer: need a fast HF tokenizer (PreTrainedTokenizerFast), a tokenizers.Tokenizer or a "
        f"tokenizer.json path; got {type(tokenizer).__name__} (slow tokenizers have no exact id -> text map here)"
    )


def compression_map_of(tokenizer: Any, *, enabled: bool = True) -> CompressionMap:
    """The spec §3 compression map of an HF tokenizer (exactly as ``engramlm`` builds it from ``tokenizer.json``)."""
    return CompressionMap.from_tokenizer(_backend_tokenizer(tokenizer), enabled=enabled)


def _default_pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            return value
    return 0


# ------------------------------------------------------------------------------------------ model structure


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (``model.base_model.layers`` for Llama/Qwen2, ``.h`` for GPT-2)."""
    base = getattr(model, "base_model", model)
    for path in _LAYER_PATHS:
        mod: Any = base
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    raise ConfigError(
        f"model: no decoder layer list found on {type(model).__name__} (looked for base_model."
        f"{{{', '.join(_LAYER_PATHS)}}}); add_engram supports decoder-only HF causal LMs such as Llama, Qwen2, GPT-2"
    )


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(size, int):
        raise ConfigError("model: its config has no hidden_size (or n_embd)")
    return size


def _geometry(
    compression: CompressionMap, layers: Sequence[int], preset: str | None, engram: EngramConfig | None,
    pad_id: int, overrides: Mapping[str, Any],
) -> EngramConfig:  # fmt: skip
    """The Engram config: a preset's geometry (or ``engram``, or the defaults) at ``layers``, plus overrides."""
    if preset is not None and engram is not None:
        raise ConfigError("preset: pass a preset name or an EngramConfig (engram=), not both")
    if preset is not None:
        base = get_preset(preset).engram
        if base is None:
            raise ConfigError(f"preset: {preset!r} has no Engram section")
        # A preset's V' expectation belongs to its own tokenizer; here the model's tokenizer decides V'.
        base = dataclasses.replace(base, hash=base.hash.replace(expected_compressed_vocab_size=None), tokenizer=None)
    else:
        base = engram
    unknown = sorted(set(overrides) - _HASH_FIELDS - _BLOCK_FIELDS)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: not an Engram geometry field; allowed: "
            f"{sorted((_HASH_FIELDS | _BLOCK_FIELDS) - {'layer_ids'})}"
        )
    if "layer_ids" in overrides:
        raise ConfigError("layer_ids: pass the decoder layers as layers=[...]")
    hash_over = {k: v for k, v in overrides.items() if k in _HASH_FIELDS}
    block_over = {k: v for k, v in overrides.items() if k in _BLOCK_FIELDS}
    hash_fields: dict[str, Any] = {"layer_ids": tuple(sorted(set(int(i) for i in layers))), "pad_id": pad_id}
    if base is None:
        # The CPU default: 3-grams, 4 heads per order, 5 x V' rows per order (the paper's ratio), d_h 32.
        n = int(hash_over.get("max_ngram_size", 3))
        hash_fields["engram_vocab_size"] = (5 * compression.compressed_vocab_size,) * (n - 1)
        spec = HashSpec.from_dict({"n_head_per_ngram": 4, **hash_fields, **hash_over})
        return EngramConfig(hash=spec, **{"head_dim": 32, **block_over})
    spec_dict = {**base.hash.to_dict(), **hash_fields, **hash_over}
    return dataclasses.replace(base, hash=HashSpec.from_dict(spec_dict), **block_over)


# ------------------------------------------------------------------------------------------ the adapter


@dataclass
class _Stream:
    """Decode history of a cached batch: last N-1 raw ids and DEAD flags, committed length, window start
    (absolute, per row) and each layer's ShortConv state."""

    ids: torch.Tensor  # [B, N-1]
    dead: torch.Tensor  # [B, N-1] bool
    length: int
    start: torch.Tensor  # [B]
    conv: dict[int, ConvState]


@dataclass
class _Step:
    """One forward's Engram inputs, shared by every wrapped layer."""

    row_ids: dict[int, torch.Tensor] | None
    rows: dict[int, torch.Tensor] | None
    dead: torch.Tensor | None
    window_start: torch.Tensor | None
    stream: _Stream | None


class EngramAdapter(nn.Module):
    """The Engram blocks added to an HF model (``blocks[str(layer)]``), their hash layout and the hooks.

    ``row_source`` (set by :func:`engram_optimizers`): in training, a callable turning the step's row ids
    [L, B, T, H_e] into gathered rows per layer, so the tables are updated sparsely.
    """

    def __init__(self, config: EngramConfig, layout: HashLayout, hidden_size: int) -> None:
        super().__init__()
        if layout.spec != config.hash:
            raise ConfigError("layout: built from a different hash spec than the Engram config")
        self.config, self.layout, self.hidden_size = config, layout, hidden_size
        self.hasher = NgramHasher(layout)
        self.blocks = nn.ModuleDict()
        for lid in layout.layer_ids:
            block = EngramBlock(
                hidden_size=hidden_size,
                num_rows=layout.rows_of(lid),
                num_heads=layout.heads_per_layer,
                head_dim=config.head_dim,
                n_branches=1,
                proj_bias=config.proj_bias,
                gate=config.gate,
                gate_signed_sqrt=config.gate_signed_sqrt,
                gate_norm_eps=config.gate_norm_eps,
                use_short_conv=config.use_short_conv,
                kernel_size=config.kernel_size,
                conv_dilation=config.dilation,
                conv_norm_eps=config.conv_norm_eps,
                conv_zero_init=config.conv_zero_init,
                embed_init_std=config.embed_init_std,
            )
            with torch.no_grad():  # the value rows of wkv: Y = 0 at insertion, whatever the conv does
                block.wkv.weight[hidden_size:].zero_()
                if block.wkv.bias is not None:
                    block.wkv.bias[hidden_size:].zero_()
            self.blocks[str(lid)] = block
        self.row_source: Callable[[torch.Tensor], dict[int, torch.Tensor]] | None = None
        self._step: _Step | None = None
        self._stream: _Stream | None = None
        self._handles: list[Any] = []

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.layout.layer_ids

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint

    def tables(self) -> dict[int, nn.Parameter]:
        """layer id -> the Engram table ``embed.weight`` [R, d_h]."""
        return {lid: self.blocks[str(lid)].embed.weight for lid in self.layer_ids}

    # ---- per forward -------------------------------------------------------------------------------

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past: int, cached: bool) -> _Step:
        """Hash ``input_ids`` [B, T] (a new sequence when ``past == 0``, else a cached continuation)."""
        b, t = input_ids.shape
        dead = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            m = attention_mask[:, -t:]
            if not bool(m.bool().all()):
                dead = ~m.bool()
        n1 = self.layout.spec.max_ngram_size - 1
        ids = input_ids.detach()
        if past > 0:
            st = self._stream
            if st is None or st.length != past or st.ids.shape[0] != b:
                raise ConfigError(
                    "cache: a cached continuation (past length "
                    f"{past}, batch {b}) without the matching Engram history "
                    f"({'none' if st is None else f'length {st.length}, batch {st.ids.shape[0]}'}); the adapter keeps "
                    "the n-gram and conv history of the batch it prefilled: start from a fresh cache (beam search and "
                    "caches built outside this model are not supported)"
                )
            full = torch.cat([st.ids.to(ids.device), ids], dim=1)
            chunk_dead = dead if dead is not None else torch.zeros(b, t, dtype=torch.bool, device=ids.device)
            full_dead = torch.cat([st.dead.to(ids.device), chunk_dead], dim=1)
            stacked = self.hasher(full, dead=full_dead)[:, :, n1:]
            ws = window_starts(None, dead, (b, t), ids.device) if dead is not None else torch.zeros_like(ids)
            rel = torch.where(ws > 0, ws, (st.start.to(ids.device) - st.length).unsqueeze(1))
            stream = st
        else:
            stacked = self.hasher(ids, dead=dead)
            rel = window_starts(None, dead, (b, t), ids.device) if dead is not None else None
            stream = None
            if cached:
                pad = torch.full((b, n1), self.layout.spec.pad_id, dtype=ids.dtype, device=ids.device)
                full = torch.cat([pad, ids], dim=1)
                full_dead = torch.cat(
                    [torch.ones(b, n1, dtype=torch.bool, device=ids.device),
                     dead if dead is not None else torch.zeros(b, t, dtype=torch.bool, device=ids.device)], dim=1,
                )  # fmt: skip
                conv = {
                    lid: blk.conv.new_state(b, ids.device)
                    for lid, blk in ((int(k), v) for k, v in self.blocks.items())
                    if blk.conv is not None
                }
                stream = _Stream(full, full_dead, 0, torch.zeros(b, dtype=torch.long), conv)
                if rel is None:
                    rel = torch.zeros_like(ids)
        if stream is not None:  # advance the history (the conv states advance inside the blocks)
            stream.ids, stream.dead = full[:, -n1:], full_dead[:, -n1:]
            if dead is not None:
                any_dead = dead.any(dim=1)
                last = t - 1 - torch.flip(dead, dims=[1]).int().argmax(dim=1)
                stream.start = torch.where(any_dead.cpu(), stream.length + last.cpu() + 1, stream.start)
            stream.length += t
            self._stream = stream
        elif not cached:
            self._stream = None
        per_layer = self.layout.split(stacked)
        rows = None
        if self.row_source is not None and self.training and torch.is_grad_enabled():
            rows = self.row_source(stacked)
            per_layer = None
        self._step = _Step(per_layer, rows, dead, rel, stream)
        return self._step

    def apply(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        """``h + Engram(h)`` for decoder layer ``layer_id`` with this forward's row ids (hidden [B, T, d])."""
        step = self._step
        if step is None:
            raise ConfigError(
                "input_ids: an Engram layer ran before its row ids were computed; call the model (or its base "
                "model) with input_ids (inputs_embeds alone carry no token ids to hash)"
            )
        block = self.blocks[str(layer_id)]
        kwargs: dict[str, Any] = {"window_start": step.window_start, "dead": step.dead}
        if step.stream is not None and block.conv is not None:
            kwargs["conv_state"] = step.stream.conv[layer_id]
        if step.rows is not None:
            kwargs["rows"] = step.rows[layer_id]
            row_ids = None
        else:
            assert step.row_ids is not None
            row_ids = step.row_ids[layer_id].to(hidden.device)
        out = block(hidden.unsqueeze(2), row_ids, **kwargs)
        return out.squeeze(2)

    # ---- hooks -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (its base model and the chosen decoder layers)."""
        self.detach()
        base = getattr(model, "base_model", model)
        layers = decoder_layers(model)
        bad = [lid for lid in self.layer_ids if lid >= len(layers)]
        if bad:
            raise ConfigError(f"layers: {bad} out of range; the model has {len(layers)} decoder layers (0-based)")

        def begin_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                if kwargs.get("inputs_embeds") is not None:
                    raise ConfigError(
                        "inputs_embeds: a model with Engram needs input_ids (the n-grams are hashed from token ids)"
                    )
                return
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
            cached = cache is not None or not self.training
            self.begin(ids, kwargs.get("attention_mask"), past, cached)

        self._handles.append(base.register_forward_pre_hook(begin_hook, with_kwargs=True))
        for lid in self.layer_ids:

            def layer_hook(module: nn.Module, args: tuple, kwargs: dict, lid: int = lid) -> tuple[tuple, dict]:
                if args:
                    return (self.apply(lid, args[0]), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = self.apply(lid, kwargs["hidden_states"])
                return args, kwargs

            self._handles.append(layers[lid].register_forward_pre_hook(layer_hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def add_engram(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int] = (1,),
    *,
    preset: str | None = None,
    engram: EngramConfig | None = None,
    pad_id: int | None = None,
    seed: int | None = None,
    **geometry: Any,
) -> EngramAdapter:
    """Add Engram before the attention of decoder ``layers`` (0-based) of the HF causal LM ``model``; in place.

    Geometry: a ``preset`` name (its Engram section: orders, heads, rows, d_h, conv), an :class:`EngramConfig`,
    or the CPU default (3-grams, 4 heads per order, 5 x V' rows per order, d_h 32); keyword overrides are
    :class:`HashSpec` fields (``max_ngram_size``, ``n_head_per_ngram``, ``engram_vocab_size``, ``seed``,
    ``boundary_mode``, ...) and block fields (``head_dim``, ``use_short_conv``, ``kernel_size``, ...).
    ``pad_id`` (default: the tokenizer's pad, else EOS, else BOS id) is what a lookback before the sequence
    start reads. ``seed`` seeds the new parameters (default: the current torch RNG).
    Returns the adapter, also at ``model.engram_adapter``.
    """
    if getattr(model, ATTR, None) is not None:
        raise ConfigError("model: already has Engram (model.engram_adapter); load weights with load_engram")
    cmap = compression_map_of(tokenizer)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and cmap.vocab_size > emb.weight.shape[0]:
        raise ForeignTokenizerError(
            f"tokenizer has {cmap.vocab_size} ids, the model's embedding only {emb.weight.shape[0]}: not its tokenizer"
        )
    if not layers:
        raise ConfigError("layers: name at least one decoder layer")
    cfg = _geometry(cmap, layers, preset, engram, _default_pad_id(tokenizer) if pad_id is None else pad_id, geometry)
    return _install(model, cfg, make_layout(cfg.hash, cmap), seed)


def _install(model: nn.Module, cfg: EngramConfig, layout: HashLayout, seed: int | None) -> EngramAdapter:
    ref = next(model.parameters())
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            adapter = EngramAdapter(cfg, layout, _hidden_size(model))
    else:
        adapter = EngramAdapter(cfg, layout, _hidden_size(model))
    adapter.to(device=ref.device)
    adapter.attach(model)
    model.add_module(ATTR, adapter)
    return adapter


def get_adapter(model: nn.Module) -> EngramAdapter:
    adapter = getattr(model, ATTR, None)
    if not isinstance(adapter, EngramAdapter):
        raise ConfigError("model: has no Engram adapter (call engramlm.hf.adapter.add_engram first)")
    return adapter


# ------------------------------------------------------------------------------------------ training


class EngramAdamW(torch.optim.AdamW):
    """AdamW over the dense parameters plus one parameter group ``{"engram_tables": True}`` for the tables,
    stepped by :class:`SparseRowAdam` at that group's (scheduled) learning rate.

    The tables are frozen for autograd; each training forward gathers the batch's unique rows into a small
    leaf (:meth:`gather`, installed as the adapter's ``row_source``), and :meth:`step` applies Adam to those
    rows only. Gradient accumulation works: gathers since the last step are merged per layer (gradients of
    a row summed) before one sparse step. ``Trainer``'s gradient clipping sees the dense parameters only.
    """

    def __init__(
        self,
        adapter: EngramAdapter,
        dense: list[dict[str, Any]],
        table_lr: float,
        betas: tuple[float, float],
        eps: float,
        table_eps: float,
        table_weight_decay: float,
    ) -> None:
        tables = adapter.tables()
        for t in tables.values():
            t.requires_grad_(False)
        groups = [g for g in dense if g["params"]]
        groups.append({"params": list(tables.values()), "lr": table_lr, "weight_decay": 0.0, "engram_tables": True})
        super().__init__(groups, betas=betas, eps=eps, foreach=False)
        self.adapter = adapter
        self.sparse = SparseRowAdam(tables, table_lr, betas, table_eps, table_weight_decay)
        adapter.row_source = self.gather

    def gather(self, row_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each layer's rows for one forward (micro-batch); they stay pending until :meth:`step`."""
        return {lid: self.sparse.gather_layer(lid, row_ids[li]) for li, lid in enumerate(self.adapter.layer_ids)}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = super().step(closure)  # the table group has no .grad: AdamW skips it
        group = next(g for g in self.param_groups if g.get("engram_tables"))
        self.sparse.lr = group["lr"]
        self.sparse.step()  # sums each row's gradient over the micro-batches, then one update
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.sparse.reset()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["engram_sparse"] = self.sparse.state_tensors()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        sparse = state_dict.pop("engram_sparse", None)
        super().load_state_dict(state_dict)
        if sparse is not None:
            self.sparse.load_state_tensors(sparse)


def engram_optimizers(
    model: nn.Module,
    lr: float = 1e-3,
    *,
    table_lr_mult: float = 5.0,
    freeze_base: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    table_eps: float = 1e-30,
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> tuple[EngramAdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for ``transformers.Trainer(optimizers=...)`` or a plain loop.

    Dense parameters (the base model unless ``freeze_base``, and Engram's projection, gates and conv) use
    AdamW at ``lr``; the tables use sparse row Adam at ``table_lr_mult * lr`` (the paper's 5x) without weight
    decay. The scheduler is linear warm-up then constant, or linear decay to 0 at ``total_steps``; it scales
    both groups, so the tables follow the same schedule.
    """
    adapter = get_adapter(model)
    if lr <= 0 or table_lr_mult <= 0:
        raise ConfigError(f"lr: must be > 0 (and table_lr_mult > 0), got lr={lr}, table_lr_mult={table_lr_mult}")
    table_ids = {id(t) for t in adapter.tables().values()}
    engram_ids = {id(p) for p in adapter.parameters()}
    if freeze_base:
        for p in model.parameters():
            if id(p) not in engram_ids:
                p.requires_grad_(False)
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    decay = [p for p in dense if p.dim() >= 2 and id(p) not in engram_ids]
    rest = [p for p in dense if not (p.dim() >= 2 and id(p) not in engram_ids)]
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": rest, "lr": lr, "weight_decay": 0.0},
    ]
    opt = EngramAdamW(adapter, groups, lr * table_lr_mult, betas, eps, table_eps, 0.0)

    def schedule(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if total_steps is None:
            return warm
        return warm * max(0.0, 1.0 - step / max(1, total_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ------------------------------------------------------------------------------------------ save / load


def _base_signature(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "hidden_size": _hidden_size(model),
        "num_layers": len(decoder_layers(model)),
    }


def save_engram(model: nn.Module, directory: str | Path) -> Path:
    """Write only the Engram part of ``model``: weights, hash artefact and config (each atomically)."""
    from safetensors.torch import save

    adapter = get_adapter(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_layout(adapter.layout, out / ADAPTER_HASH)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.blocks.state_dict().items()}
    meta = {"format": ADAPTER_FORMAT, "version": str(ADAPTER_VERSION), "hash_fingerprint": adapter.fingerprint}
    atomic_write_bytes(out / ADAPTER_WEIGHTS, save(state, metadata=meta))
    cmap = adapter.layout.compression
    atomic_write_json(
        out / ADAPTER_CONFIG,
        {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "hash_fingerprint": adapter.fingerprint,
            "tokenizer": {
                "compression_digest": cmap.digest(),
                "vocab_size": cmap.vocab_size,
                "compressed_vocab_size": cmap.compressed_vocab_size,
            },
            "base_model": _base_signature(model),
            "engram": to_jsonable(dataclasses.asdict(adapter.config)),
        },
    )
    return out


def _read_config(src: Path) -> dict[str, Any]:
    path = src / ADAPTER_CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not a readable Engram adapter config ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != ADAPTER_FORMAT:
        raise CorruptFileError(f"{path}: not an engramlm HF Engram adapter config")
    if doc.get("version") != ADAPTER_VERSION:
        raise CorruptFileError(f"{path}: adapter version {doc.get('version')!r}, this library reads {ADAPTER_VERSION}")
    return doc


def load_engram(model: nn.Module, tokenizer: Any, directory: str | Path) -> EngramAdapter:
    """Add the Engram saved in ``directory`` to ``model`` (or load it into the adapter it already has).

    Refused: a ``tokenizer`` whose compression map differs from the saved one (:class:`ForeignTokenizerError`;
    its n-grams would map to other rows), a base model of another width or depth (:class:`ConfigError`), an
    existing adapter with another hash spec (:class:`HashSpecMismatch`).
    """
    from safetensors import safe_open

    src = Path(directory)
    doc = _read_config(src)
    stored = load_layout(src / ADAPTER_HASH)
    stored.check_fingerprint(doc["hash_fingerprint"], what=f"{src / ADAPTER_CONFIG}")
    mine = compression_map_of(tokenizer, enabled=stored.compression.normalizer != "identity")
    if mine.digest() != stored.compression.digest():
        raise ForeignTokenizerError(
            f"tokenizer: its compression map (sha256 {mine.digest()[:16]}...) differs from the one the Engram "
            f"adapter in {src} was trained with ({stored.compression.digest()[:16]}...): its n-grams would map to "
            "other rows; load the adapter with the tokenizer it was trained with"
        )
    sig = _base_signature(model)
    want = doc.get("base_model", {})
    for key in ("hidden_size", "num_layers"):
        if want.get(key) != sig[key]:
            raise ConfigError(
                f"model: the adapter in {src} was made for a base model with {key}={want.get(key)}, this one has "
                f"{sig[key]}"
            )
    cfg = EngramConfig(**{**doc["engram"], "hash": HashSpec.from_dict(doc["engram"]["hash"])})
    layout = make_layout(cfg.hash, mine, stored.multipliers)
    layout.check_fingerprint(doc["hash_fingerprint"], what=f"adapter {src}")
    adapter = getattr(model, ATTR, None)
    if adapter is None:
        adapter = _install(model, cfg, layout, seed=None)
    else:
        adapter.layout.check_fingerprint(doc["hash_fingerprint"], what=f"adapter {src} (the model's own Engram)")
    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("hash_fingerprint") != doc["hash_fingerprint"]:
            raise HashSpecMismatch(f"{src / ADAPTER_WEIGHTS}: fingerprint differs from {src / ADAPTER_CONFIG}")
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        adapter.blocks.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptFileError(
            f"{src / ADAPTER_WEIGHTS}: does not fit the adapter its config describes ({exc})"
        ) from exc
    return adapter
