"""EngramLM: token embedding -> blocks (Engram? -> attention -> FFN/MoE) on an M-branch residual
stream -> branch readout -> final norm -> LM head. Read it in one sitting.

Row ids for every Engram layer are computed once per forward, before block 0, from the token ids
alone (or passed in by the data pipeline); each Engram block then looks up its own rows, or takes
rows gathered from an external store.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engramlm.errors import ConfigError
from engramlm.hashing.batch import NgramHasher, window_starts
from engramlm.hashing.spec import HashLayout
from engramlm.models.config import ModelConfig
from engramlm.models.decode import DecodeCache, DecodeStep
from engramlm.nn.attention import Attention
from engramlm.nn.engram import ConvState, EngramBlock
from engramlm.nn.hyper import BranchReadout, MultiBranchResidual, expand_stream
from engramlm.nn.mlp import SwiGLU
from engramlm.nn.moe import MoE
from engramlm.nn.norm import RMSNorm


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    gates: dict[int, torch.Tensor] | None = None  # layer id -> alpha [B, T, M, 1]
    hidden_states: list[torch.Tensor] | None = None  # residual stream [B, T, M, d] after embed and each block


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
        self,
        h: torch.Tensor,
        *,
        row_ids: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        window_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        gates: dict[int, torch.Tensor] | None = None,
        kv_cache=None,
        positions: torch.Tensor | None = None,
        skip_engram: bool = False,
        conv_state: ConvState | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.engram is not None and not skip_engram:
            h, alpha = self.engram(
                h,
                row_ids,
                rows=rows,
                window_start=window_start,
                dead=dead,
                return_gate=True,
                conv_state=conv_state,
                lengths=lengths,
            )
            if gates is not None:
                gates[self.index] = alpha
        x, ctx = self.attn_hc.read(h)
        h = self.attn_hc.write(h, self.attn(self.attn_norm(x), positions=positions, kv_cache=kv_cache), ctx)
        x, ctx = self.ffn_hc.read(h)
        return self.ffn_hc.write(h, self.ffn(self.ffn_norm(x)), ctx)


class EngramLM(nn.Module):
    """A causal LM with Engram memory. ``layout`` binds the config's hash spec to a compression map.

    ``forward(input_ids, targets=None, *, row_ids=None, engram_rows=None, doc_start=None,
    dead=None, return_gates=False) -> LMOutput``. ``row_ids`` [L, B, T, H_e] (offset-applied)
    come from :class:`NgramHasher` (hashed here when omitted); ``engram_rows`` maps a layer id to
    rows [B, T, H_e, d_h] gathered from an external table store.

    Decoding: ``forward(chunk, cache=DecodeCache(...), step=cache.begin(chunk))`` continues every
    sequence in the cache (KV, conv history, streaming hasher); prefill and one-token steps give
    the logits of the full forward. ``step`` may be omitted (the forward then calls ``begin``).
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
        nn.init.normal_(self.embed.weight, std=0.02)
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
        return self.lm_head(self.norm(self.readout(h)))

    def hash(self, input_ids: torch.Tensor, doc_start=None, dead=None) -> torch.Tensor:
        """Row ids [L, B, T, H_e] for every Engram layer (what the data pipeline precomputes)."""
        if self.hasher is None:
            raise ConfigError("engram: this model has no Engram layers")
        return self.hasher(input_ids.cpu() if input_ids.device.type != "cpu" else input_ids, doc_start, dead).to(
            input_ids.device
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        row_ids: torch.Tensor | None = None,
        engram_rows: dict[int, torch.Tensor] | None = None,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        return_gates: bool = False,
        output_hidden_states: bool = False,
        skip_engram: bool | Collection[int] = False,
        cache: DecodeCache | None = None,
        step: DecodeStep | None = None,
        lengths: torch.Tensor | None = None,
    ) -> LMOutput:
        """``skip_engram`` (True, or a set of layer ids) bypasses those Engram blocks entirely
        (knockout analysis: the block's output is suppressed, the rest of the model unchanged).

        With ``cache`` the tokens continue the cached sequences; ``doc_start``/``dead`` describe the
        new tokens, ``lengths`` [B] the real tokens of a right-padded chunk (logits past them are junk).
        """
        b, t = input_ids.shape
        if isinstance(skip_engram, bool):
            skip = set(self.layout.layer_ids) if skip_engram and self.layout is not None else set()
        else:
            skip = set(skip_engram)
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise IndexError(
                f"input ids must lie in [0, {self.config.vocab_size}); got min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )
        window_start = None
        if cache is not None:
            if cache.skip_engram is None or cache.fresh:
                cache.skip_engram = frozenset(skip)
            elif cache.skip_engram != skip:
                raise ValueError(
                    f"skip_engram: this decode cache was started skipping layers {sorted(cache.skip_engram)}, "
                    f"got {sorted(skip)}; the skipped set must stay the same for a cached sequence"
                )
            step = step if step is not None else cache.begin(input_ids, doc_start, dead, lengths)
            if row_ids is None:
                row_ids = step.row_ids
            window_start = step.window_start.to(input_ids.device)
            chunk_lengths = None if step.full else step.lengths.to(input_ids.device)
        elif self.layout is not None:
            provided = set(engram_rows or {}) | skip
            if row_ids is None and any(lid not in provided for lid in self.layout.layer_ids):
                row_ids = self.hasher(input_ids, doc_start, dead)
            reset = self.layout.spec.boundary_mode == "reset" and doc_start is not None
            if reset or dead is not None:
                window_start = window_starts(doc_start if reset else None, dead, (b, t), input_ids.device)
        h = expand_stream(self.embed(input_ids), self.config.hc_mult)
        gates: dict[int, torch.Tensor] | None = {} if return_gates else None
        hidden: list[torch.Tensor] | None = [h] if output_hidden_states else None
        for blk in self.layers:
            kwargs = {}
            if blk.index in skip:
                kwargs["skip_engram"] = True
            elif blk.engram is not None:
                li = self.layout.layer_index(blk.index)
                if engram_rows is not None and blk.index in engram_rows:
                    kwargs["rows"] = engram_rows[blk.index]
                else:
                    kwargs["row_ids"] = row_ids[li].to(input_ids.device)
                kwargs.update(window_start=window_start, dead=dead, gates=gates)
                if cache is not None:
                    kwargs.update(conv_state=cache.conv.get(blk.index), lengths=chunk_lengths)
            if cache is not None:
                kwargs["kv_cache"] = cache.kv[blk.index]
            h = blk(h, **kwargs)
            if hidden is not None:
                hidden.append(h)
        if cache is not None:
            cache.commit(step)
        logits = self.head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, gates=gates, hidden_states=hidden)
