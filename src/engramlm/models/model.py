"""EngramLM: token embedding -> blocks (Engram? -> attention -> FFN/MoE) on an M-branch residual
stream -> branch readout -> final norm -> LM head. Read it in one sitting.

The forward takes the tokens and, for the Engram layers, one :class:`EngramInputs` built by the
caller before it runs (row ids or gathered rows per layer, windows, decode state); it reads its
inputs and the caches it is handed, and commits nothing: the caller that owns a decode state
advances it. Without ``engram`` the row ids are hashed from the tokens (no document resets).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.errors import ConfigError
from engramlm.hashing.batch import NgramHasher
from engramlm.hashing.spec import HashLayout
from engramlm.models.config import ModelConfig
from engramlm.models.interface import EngramInputs, LMOutput
from engramlm.nn.attention import Attention, KVCache
from engramlm.nn.engram import EngramBlock
from engramlm.nn.hyper import BranchReadout, MultiBranchResidual, expand_stream
from engramlm.nn.mlp import SwiGLU
from engramlm.nn.moe import MoE
from engramlm.nn.norm import RMSNorm
from engramlm.nn.packed import linear

__all__ = ["Block", "EngramInputs", "EngramLM", "LMOutput", "engram_block"]


def engram_block(cfg: ModelConfig, num_rows: int, num_heads: int) -> EngramBlock:
    """The Engram block ``cfg.engram`` describes, over a ``num_rows`` table split into ``num_heads`` heads.

    One place maps the config's fields onto the block, so the model and the benchmarks build the same thing.
    """
    e = cfg.engram
    if e is None:
        raise ConfigError("engram: the model config has no Engram section (engram is None)")
    return EngramBlock(
        hidden_size=cfg.hidden_size,
        num_rows=num_rows,
        num_heads=num_heads,
        head_dim=e.head_dim,
        n_branches=cfg.hc_mult,
        proj_bias=e.proj_bias,
        gate=e.gate,
        gate_signed_sqrt=e.gate_signed_sqrt,
        gate_norm_eps=e.gate_norm_eps,
        use_short_conv=e.use_short_conv,
        kernel_size=e.kernel_size,
        conv_dilation=e.dilation,
        conv_norm_eps=e.conv_norm_eps,
        conv_zero_init=e.conv_zero_init,
        embed_init_std=e.embed_init_std,
        value_init_scale=e.value_init_scale,
    )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, layout: HashLayout | None) -> None:
        super().__init__()
        d, m = cfg.hidden_size, cfg.hc_mult
        self.index = index
        self.engram: EngramBlock | None = None
        if cfg.engram is not None and layout is not None and index in layout.layer_ids:
            rows = layout.rows_of(index)
            self.engram = engram_block(cfg, rows, layout.heads_per_layer)
        self.attn_hc = MultiBranchResidual(d, m, cfg.hc_dynamic)
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(d, cfg.n_heads, cfg.n_kv_heads, rope_theta=cfg.rope_theta)
        self.ffn_hc = MultiBranchResidual(d, m, cfg.hc_dynamic)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps)
        if cfg.moe is not None and index >= cfg.moe.n_dense_layers:
            mo = cfg.moe
            self.ffn: nn.Module = MoE(
                d, mo.expert_hidden, mo.n_routed, mo.n_shared, mo.top_k, mo.score_func, mo.bias_update_speed
            )
        else:
            self.ffn = SwiGLU(d, cfg.mlp_hidden)

    def forward(
        self, h: torch.Tensor, engram: EngramInputs | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (new stream, the Engram gate alpha [B, T, M, 1] or None when this block has no Engram or skips it)."""
        alpha = None
        if self.engram is not None and engram is not None and self.index not in engram.skip:
            kwargs = engram.for_layer(self.index, h.device)
            h, alpha = self.engram(h, kwargs.pop("row_ids", None), **kwargs, return_gate=True)
        x, ctx = self.attn_hc.read(h)
        h = self.attn_hc.write(h, self.attn(self.attn_norm(x), kv_cache=kv_cache), ctx)
        x, ctx = self.ffn_hc.read(h)
        return self.ffn_hc.write(h, self.ffn(self.ffn_norm(x)), ctx), alpha


class EngramLM(nn.Module):
    """A causal LM with Engram memory. ``layout`` binds the config's hash spec to a compression map.

    ``forward(input_ids, targets=None, *, engram=None, kv=None) -> LMOutput``: ``engram`` comes from
    :meth:`engram_inputs` (training, analysis) or :meth:`DecodeCache.begin
    <engramlm.models.decode.DecodeCache.begin>` (decoding, with ``kv=cache.kv``; the cache's owner then
    calls ``cache.commit``). :meth:`forward_with_hidden_states` also returns the residual stream after
    every block (LogitLens, CKA).
    """

    def __init__(self, config: ModelConfig, layout: HashLayout | None = None) -> None:
        super().__init__()
        if config.engram is not None:
            if layout is None:
                raise ConfigError("layout: a config with an Engram section needs a HashLayout")
            if layout.spec != config.engram.hash:
                raise ConfigError("layout: the HashLayout was built from a different hash spec than config.engram.hash")
            if layout.compression.vocab_size > config.vocab_size:
                raise ConfigError(
                    f"vocab_size: {config.vocab_size} is smaller than the tokenizer's"
                    f" {layout.compression.vocab_size} ids"
                )
        self.config = config
        self.layout = layout if config.engram is not None else None
        self.hasher = NgramHasher(layout) if self.layout is not None else None
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=config.embed_init_std)
        self.layers = nn.ModuleList(Block(config, i, self.layout) for i in range(config.num_layers))
        self.readout = BranchReadout(d, config.hc_mult)
        self.norm = RMSNorm(d, config.norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def engram_layers(self) -> dict[int, EngramBlock]:
        return {blk.index: blk.engram for blk in self.layers if blk.engram is not None}

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream [B, T, M, d] (the final readout; also LogitLens' early exit)."""
        return linear(self.norm(self.readout(h)), self.lm_head)

    def hash(self, input_ids: torch.Tensor, doc_start=None, dead=None) -> torch.Tensor:
        """Row ids [L, B, T, H_e] for every Engram layer (what the data pipeline precomputes)."""
        if self.hasher is None:
            raise ConfigError("engram: this model has no Engram layers")
        return self.hasher(input_ids.cpu() if input_ids.device.type != "cpu" else input_ids, doc_start, dead).to(
            input_ids.device
        )

    def engram_inputs(
        self,
        input_ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        *,
        row_ids: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        rows: Mapping[int, torch.Tensor] | None = None,
        skip_engram: bool | Collection[int] = False,
    ) -> EngramInputs | None:
        """The Engram inputs of a full forward over ``input_ids`` (None for a model without Engram layers).

        See :meth:`EngramInputs.from_tokens`; this one hashes with the model's own hasher.
        """
        if self.layout is None:
            return None
        return EngramInputs.from_tokens(
            self.layout,
            input_ids,
            doc_start,
            dead,
            row_ids=row_ids,
            rows=rows,
            skip_engram=skip_engram,
            hasher=self.hasher,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        engram: EngramInputs | None = None,
        kv: Mapping[int, KVCache] | None = None,
    ) -> LMOutput:
        """Logits (and the mean cross-entropy against ``targets``, -100 ignored) of ``input_ids`` [B, T].

        ``kv`` (layer index -> KVCache) continues cached sequences: ``engram`` must then come from the
        same decode cache (its windows and conv state are relative to the cached history).
        """
        return self._run(input_ids, targets, engram, kv, keep_hidden=False)

    def forward_at(
        self,
        input_ids: torch.Tensor,
        at: torch.Tensor,
        *,
        engram: EngramInputs | None = None,
        kv: Mapping[int, KVCache] | None = None,
    ) -> LMOutput:
        """:meth:`forward` with the logits of one position per row only: ``at`` [B] -> logits [B, 1, V].

        A prefill needs just each prompt's last token; the LM head over every position costs more than
        a decode step (HF's ``logits_to_keep``)."""
        return self._run(input_ids, None, engram, kv, keep_hidden=False, logits_at=at)

    def forward_with_hidden_states(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *, engram: EngramInputs | None = None
    ) -> LMOutput:
        """:meth:`forward`, also returning the residual stream after the embedding and after each block."""
        return self._run(input_ids, targets, engram, None, keep_hidden=True)

    def _run(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None,
        engram: EngramInputs | None,
        kv: Mapping[int, KVCache] | None,
        keep_hidden: bool,
        logits_at: torch.Tensor | None = None,
    ) -> LMOutput:
        if engram is None and self.layout is not None:
            if kv is not None:
                raise ConfigError("engram: a cached (kv) forward needs the EngramInputs of DecodeCache.begin")
            engram = self.engram_inputs(input_ids)
        h = expand_stream(self.embed(input_ids), self.config.hc_mult)
        gates: dict[int, torch.Tensor] = {}
        hidden: list[torch.Tensor] | None = [h] if keep_hidden else None
        for blk in self.layers:
            h, alpha = blk(h, engram, None if kv is None else kv[blk.index])
            if alpha is not None:
                gates[blk.index] = alpha
            if hidden is not None:
                hidden.append(h)
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at.to(h.device)].unsqueeze(1)
        logits = self.head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, gates=gates, hidden_states=hidden)
