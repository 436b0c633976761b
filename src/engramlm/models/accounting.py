"""Parameter accounting (spec §9.1) and the iso-parameter Engram variant of a MoE config.

Counts are analytic (from the config alone), so they work for presets far too large to build;
a test checks them against an instantiated model. Definitions:

* P_tot: trainable parameters excluding the vocabulary embedding and the LM head;
* P_act: parameters used per token (Engram projections, norms and conv count; tables do not);
* P_sparse = P_tot - P_act = inactive routed experts + Engram tables;
* rho: share of P_sparse held by routed experts (1.0 = pure MoE).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from engramlm.errors import ConfigError
from engramlm.hashing.primes import prime_plan
from engramlm.models.config import EngramConfig, ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # everything, embedding and head included
    embedding: int  # vocabulary embedding + LM head (once if tied)
    p_tot: int
    p_act: int
    p_sparse: int
    moe_sparse: int  # inactive routed-expert parameters
    engram_tables: int
    engram_dense: int  # Engram projections, gate norms, conv (part of P_act)
    engram_rows: tuple[int, ...]  # R_l per Engram layer

    @property
    def rho(self) -> float | None:
        return self.moe_sparse / self.p_sparse if self.p_sparse else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["engram_rows"] = list(self.engram_rows)
        d["rho"] = self.rho
        return d


def engram_table_rows(cfg: ModelConfig) -> tuple[int, ...]:
    if cfg.engram is None:
        return ()
    h = cfg.engram.hash
    plan = prime_plan(h.layer_ids, h.engram_vocab_size, h.n_head_per_ngram)
    return tuple(sum(sum(order) for order in layer) for layer in plan)


def _hc_params(d: int, m: int, dynamic: bool) -> int:
    if m == 1:
        return 0
    static = 2 * m + m * m
    return static + ((m * d) + (m * d) * (2 * m + m * m) + 3 if dynamic else 0)


def _engram_dense(cfg: ModelConfig) -> int:
    e: EngramConfig = cfg.engram
    d, m = cfg.hidden_size, cfg.hc_mult
    mem = e.hash.heads_per_layer * e.head_dim
    wkv = mem * (m + 1) * d + ((m + 1) * d if e.proj_bias else 0)
    gate = 2 * m * d
    conv = (m * d + m * d * e.kernel_size) if e.use_short_conv else 0
    return wkv + gate + conv


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts of ``EngramLM(cfg)`` without building it."""
    d, m, v = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    hd = d // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * kv * hd * 2
    per_layer_common = attn + 2 * d + 2 * _hc_params(d, m, cfg.hc_dynamic)
    dense_ffn = 3 * d * cfg.mlp_hidden
    total_layers = dense_total = moe_total = moe_sparse = 0
    for i in range(cfg.num_layers):
        total_layers += per_layer_common
        if cfg.moe is not None and i >= cfg.moe.n_dense_layers:
            mo = cfg.moe
            per_expert = 3 * d * mo.expert_hidden
            layer = per_expert * mo.n_routed + d * mo.n_routed + 3 * d * mo.n_shared * mo.expert_hidden
            moe_total += layer
            moe_sparse += per_expert * (mo.n_routed - mo.top_k)
        else:
            dense_total += dense_ffn
    rows = engram_table_rows(cfg)
    tables = sum(rows) * cfg.engram.head_dim if cfg.engram else 0
    engram_dense = _engram_dense(cfg) * len(rows) if cfg.engram else 0
    head_and_final = d + (d * m if m > 1 else 0)  # final norm + branch readout
    p_tot = total_layers + dense_total + moe_total + tables + engram_dense + head_and_final
    embedding = v * d * (1 if cfg.tie_embeddings else 2)
    p_sparse = moe_sparse + tables
    return ParamCounts(
        total=p_tot + embedding,
        embedding=embedding,
        p_tot=p_tot,
        p_act=p_tot - p_sparse,
        p_sparse=p_sparse,
        moe_sparse=moe_sparse,
        engram_tables=tables,
        engram_dense=engram_dense,
        engram_rows=rows,
    )


@dataclass(frozen=True)
class IsoVariant:
    config: ModelConfig
    base: ParamCounts
    variant: ParamCounts
    target_rho: float

    def report(self) -> dict[str, Any]:
        return {
            "target_rho": self.target_rho,
            "achieved_rho": self.variant.rho,
            "base": self.base.to_dict(),
            "variant": self.variant.to_dict(),
            "p_tot_rel_diff": (self.variant.p_tot - self.base.p_tot) / self.base.p_tot,
            "p_act_rel_diff": (self.variant.p_act - self.base.p_act) / self.base.p_act,
            "n_routed": {"base": None, "variant": self.config.moe.n_routed if self.config.moe else None},
        }


def iso_parameter_variant(
    base: ModelConfig, rho: float, engram: EngramConfig, *, match_p_act: bool = False
) -> IsoVariant:
    """The Engram + MoE config with the base MoE's P_tot and top-k, and a share ``rho`` to experts.

    Only the routed-expert count and the Engram table size change (spec §9.1 protocol). Routed
    experts are rounded to whole experts and table bases to whole rows, then the table absorbs the
    remainder, so P_tot matches to within one prime gap per head. The Engram block's dense
    parameters (projections, norms, conv) are activated, so P_act grows by them; negligible at the
    paper's scale, a few percent in CPU-sized models. ``match_p_act=True`` pays for them with
    narrower experts (routed and shared alike; the width closest to the base's P_act), so the
    variant has the base's P_tot and P_act: equal FLOPs per token.
    """
    if base.moe is None:
        raise ConfigError("base.moe: the iso-parameter variant needs a MoE base config")
    if not 0.0 < rho <= 1.0:
        raise ConfigError(f"rho: must lie in (0, 1], got {rho}")
    if base.engram is not None:
        raise ConfigError("base.engram: pass a pure MoE base config (rho = 1)")
    counts = count_parameters(base)
    if rho == 1.0:
        return IsoVariant(base, counts, counts, rho)
    mo = base.moe
    if not match_p_act:
        cfg = _iso_config(base, rho, engram, mo.expert_hidden, counts)
        return IsoVariant(cfg, counts, count_parameters(cfg), rho)
    extra = _engram_dense(base.replace(engram=engram)) * len(engram.hash.layer_ids)
    per_unit = (mo.top_k + mo.n_shared) * 3 * base.hidden_size * (base.num_layers - mo.n_dense_layers)
    guess = mo.expert_hidden - round(extra / per_unit)
    candidates = []
    for h in range(max(1, guess - 2), guess + 3):
        try:
            candidates.append(_iso_config(base, rho, engram, h, counts))
        except ConfigError:  # narrower experts, so more of them than the base has
            continue
    if not candidates:
        raise ConfigError(
            f"match_p_act: paying for Engram's {extra:,} dense parameters needs experts about {max(guess, 0)} wide "
            f"instead of {mo.expert_hidden}, and rho {rho} then needs more routed experts than the base's "
            f"{mo.n_routed}; use a wider or larger MoE base, or match_p_act=False"
        )
    best = min(candidates, key=lambda c: abs(count_parameters(c).p_act - counts.p_act))
    return IsoVariant(best, counts, count_parameters(best), rho)


def _iso_config(
    base: ModelConfig, rho: float, engram: EngramConfig, expert_hidden: int, counts: ParamCounts
) -> ModelConfig:
    """The variant with experts ``expert_hidden`` wide, filling ``counts.p_tot`` (see above)."""
    mo = dataclasses.replace(base.moe, expert_hidden=expert_hidden)
    narrow = base.replace(moe=mo)
    extra_dense = _engram_dense(narrow.replace(engram=engram)) * len(engram.hash.layer_ids)
    p_act = count_parameters(narrow).p_act + extra_dense
    p_sparse = counts.p_tot - p_act
    n_moe_layers = base.num_layers - mo.n_dense_layers
    per_expert_all_layers = 3 * base.hidden_size * mo.expert_hidden * n_moe_layers
    router_all_layers = base.hidden_size * n_moe_layers
    # Removing one expert saves its weights and its router row (the router is activated).
    n_inactive = round(rho * p_sparse / per_expert_all_layers)
    n_routed = mo.top_k + n_inactive
    if n_routed > base.moe.n_routed:
        raise ConfigError(
            f"rho: {rho} asks for more routed experts ({n_routed}) than the base has ({base.moe.n_routed})"
        )
    removed = base.moe.n_routed - n_routed
    p_act -= removed * router_all_layers
    table_params = counts.p_tot - (p_act + n_inactive * per_expert_all_layers)
    heads = engram.hash.heads_per_layer * len(engram.hash.layer_ids)
    base_rows = max(2, math.floor(table_params / (engram.head_dim * heads)))
    new_hash = engram.hash.replace(engram_vocab_size=(base_rows,) * (engram.hash.max_ngram_size - 1))
    return base.replace(
        moe=dataclasses.replace(mo, n_routed=n_routed),
        engram=dataclasses.replace(engram, hash=new_hash),
        name=f"{base.name}-engram-rho{rho:g}",
    )
