"""Parameter accounting (spec §9.1), preset table sizes (GF-9, GF-10) and the iso-parameter variant."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engramlm.errors import ConfigError
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.models.accounting import count_parameters, iso_parameter_variant
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.model import EngramLM
from engramlm.models.presets import get_preset

V = 40


def engram(**kw: object) -> EngramConfig:
    hash_kw: dict = dict(
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(29, 29),
        layer_ids=(1,),
    )
    hash_kw.update(kw.pop("hash", {}))  # type: ignore[arg-type]
    args: dict = dict(hash=HashSpec(**hash_kw), head_dim=4)
    args.update(kw)
    return EngramConfig(**args)


def base_cfg(**kw: object) -> ModelConfig:
    args: dict = dict(vocab_size=V, hidden_size=16, num_layers=3, n_heads=4, mlp_hidden=24)
    args.update(kw)
    return ModelConfig(**args)


def instantiated_count(cfg: ModelConfig) -> int:
    torch.manual_seed(0)
    layout = make_layout(cfg.engram.hash, CompressionMap.identity(cfg.vocab_size)) if cfg.engram else None
    model = EngramLM(cfg, layout)
    return sum(p.numel() for p in model.parameters())


MOE = MoEConfig(n_routed=4, n_shared=2, top_k=2, expert_hidden=8, n_dense_layers=1)

CONFIGS = {
    "dense-m1": base_cfg(),
    "dense-m4-dynamic": base_cfg(hc_mult=4),
    "dense-m4-static": base_cfg(hc_mult=4, hc_dynamic=False),
    "moe-shared-dense1": base_cfg(hc_mult=2, moe=MOE),
    "moe-no-shared-dense0": base_cfg(moe=MoEConfig(n_routed=3, n_shared=0, top_k=1, expert_hidden=8, n_dense_layers=0)),
    "engram-conv-nobias": base_cfg(hc_mult=4, engram=engram()),
    "engram-noconv-bias": base_cfg(hc_mult=4, engram=engram(use_short_conv=False, proj_bias=True)),
    "engram-m1-two-layers": base_cfg(engram=engram(hash=dict(layer_ids=(0, 2), n_head_per_ngram=3))),
    "tied": base_cfg(tie_embeddings=True, engram=engram()),
    "gqa": base_cfg(n_kv_heads=2, hc_mult=2),
    "everything": base_cfg(
        hc_mult=4,
        n_kv_heads=1,
        tie_embeddings=True,
        moe=MOE,
        engram=engram(proj_bias=True, hash=dict(max_ngram_size=4, engram_vocab_size=(29, 31, 37))),
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_matches_instantiated_model(name: str) -> None:
    cfg = CONFIGS[name]
    counts = count_parameters(cfg)
    assert counts.total == instantiated_count(cfg)
    assert counts.p_tot == counts.total - counts.embedding
    assert counts.p_sparse == counts.p_tot - counts.p_act == counts.moe_sparse + counts.engram_tables
    assert counts.embedding == V * 16 * (1 if cfg.tie_embeddings else 2)


def test_hand_count_small_config() -> None:
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=8,
        num_layers=2,
        n_heads=2,
        n_kv_heads=1,
        mlp_hidden=12,
        hc_mult=2,
        hc_dynamic=True,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=6, n_dense_layers=1),
        engram=EngramConfig(
            hash=HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(11, 11), layer_ids=(1,)),
            head_dim=4,
        ),
    )
    d, m, hd = 8, 2, 4
    # Attention per layer: q and o are d x d; k and v are d x (1 kv head * 4).
    attention = d * d + d * hd + d * hd + d * d  # 64 + 32 + 32 + 64 = 192
    norms = d + d  # attn_norm + ffn_norm
    # One dynamic hyper-connection (M = 2): static logits pre (2) + post (2) + res (4),
    # RMSNorm over M*d = 16, projection 16 x (2M + M^2 = 8) = 128, three alphas.
    hc = (m + m + m * m) + m * d + (m * d) * (2 * m + m * m) + 3  # 8 + 16 + 128 + 3 = 155
    per_layer = attention + norms + 2 * hc  # 192 + 16 + 310 = 518
    swiglu_layer0 = 3 * d * 12  # 288
    router = d * 4  # 32
    expert = 3 * d * 6  # 144
    shared = 3 * d * 6  # 144
    moe_layer1 = router + 4 * expert + shared  # 752
    # Engram at layer 1: H_e = 2 orders x 2 heads = 4, d_mem = 16; primes 11, 13, 17, 19.
    rows = 11 + 13 + 17 + 19  # 60
    wkv = 16 * (m + 1) * d  # 384, no bias
    gate_norms = 2 * m * d  # q_weight + k_weight = 32
    conv = m * d + m * d * 4  # conv norm 16 + depthwise weights 64
    engram_dense = wkv + gate_norms + conv  # 496
    table = rows * 4  # 240
    final = d + m * d  # final norm + branch readout = 24
    p_tot = 2 * per_layer + swiglu_layer0 + moe_layer1 + engram_dense + table + final
    moe_sparse = (4 - 2) * expert
    assert p_tot == 2836

    counts = count_parameters(cfg)
    assert counts.engram_rows == (rows,)
    assert counts.engram_tables == table
    assert counts.engram_dense == engram_dense
    assert counts.moe_sparse == moe_sparse == 288
    assert counts.p_tot == p_tot
    assert counts.p_sparse == moe_sparse + table == 528
    assert counts.p_act == p_tot - 528 == 2308
    assert counts.embedding == 2 * 50 * 8
    assert counts.total == p_tot + 800 == instantiated_count(cfg)
    assert counts.rho == pytest.approx(288 / 528)


# ---- presets (analytic only; never instantiated) -----------------------------------------------
def test_paper_27b_tables_and_rho() -> None:
    c = count_parameters(get_preset("paper-27b"))
    assert c.engram_rows == (36_199_972, 36_204_260)
    assert c.engram_tables == 5_792_338_560
    assert c.rho == pytest.approx(0.743, abs=0.005)


def test_paper_40b_tables() -> None:
    c = count_parameters(get_preset("paper-40b"))
    assert c.engram_rows == (115_837_464, 115_841_428)
    assert c.engram_tables == 18_534_311_360


def test_deepseek_v41_tables() -> None:
    c = count_parameters(get_preset("deepseek-v4.1"))
    assert c.engram_rows == (384_006_168, 384_016_682)
    assert sum(c.engram_rows) == 768_022_850
    assert c.engram_tables == 196_613_849_600
    # No conv in V4.1: the dense Engram part is the fused wkv plus the gate norms only.
    d, m, mem = 5120, 4, 24 * 256
    assert c.engram_dense == 2 * (mem * (m + 1) * d + 2 * m * d)


def test_demo_rows_and_no_moe() -> None:
    c = count_parameters(get_preset("demo"))
    assert c.engram_rows == (10_344_164, 10_348_242)
    assert c.engram_tables == (10_344_164 + 10_348_242) * 64
    assert c.moe_sparse == 0 and c.rho == 0.0


# ---- iso-parameter variant ---------------------------------------------------------------------
def moe_base() -> ModelConfig:
    return ModelConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=4,
        n_heads=4,
        mlp_hidden=64,
        hc_mult=1,
        moe=MoEConfig(n_routed=16, n_shared=1, top_k=2, expert_hidden=64, n_dense_layers=1),
        name="tiny-moe",
    )


def iso_engram() -> EngramConfig:
    return EngramConfig(
        hash=HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(100, 100), layer_ids=(1,)),
        head_dim=8,
    )


def test_iso_parameter_variants() -> None:
    base = moe_base()
    base_counts = count_parameters(base)
    assert base_counts.rho == 1.0
    n_moe_layers = 3
    routed = []
    for rho in (0.9, 0.75, 0.5):
        iso = iso_parameter_variant(base, rho, iso_engram())
        cfg, var = iso.config, iso.variant
        assert var == count_parameters(cfg)
        assert iso.base == base_counts
        assert abs(var.p_tot - base_counts.p_tot) / base_counts.p_tot < 0.01
        assert var.rho is not None and abs(var.rho - rho) < 0.1
        assert cfg.moe.top_k == base.moe.top_k
        assert cfg.moe.expert_hidden == base.moe.expert_hidden
        assert cfg.engram is not None and var.engram_tables > 0
        # Only routed experts and table size change (spec §9.1 protocol).
        assert cfg.replace(moe=base.moe, engram=None, name=base.name) == base
        assert cfg.engram.head_dim == 8 and cfg.engram.hash.layer_ids == (1,)
        removed = base.moe.n_routed - cfg.moe.n_routed
        assert removed > 0
        assert var.p_act - base_counts.p_act == var.engram_dense - removed * 32 * n_moe_layers
        report = iso.report()
        assert report["achieved_rho"] == var.rho and report["target_rho"] == rho
        routed.append(cfg.moe.n_routed)
    assert routed[0] > routed[1] > routed[2]


def test_iso_rho_one_is_base_and_errors() -> None:
    base = moe_base()
    iso = iso_parameter_variant(base, 1.0, iso_engram())
    assert iso.config == base and iso.config.engram is None
    assert iso.variant == iso.base == count_parameters(base)
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ConfigError, match="rho"):
            iso_parameter_variant(base, bad, iso_engram())
    with pytest.raises(ConfigError, match="moe"):
        iso_parameter_variant(base.replace(moe=None), 0.5, iso_engram())
    with pytest.raises(ConfigError, match="engram"):
        iso_parameter_variant(base.replace(engram=iso_engram()), 0.5, iso_engram())


def test_iso_variant_matching_p_act() -> None:
    """match_p_act pays for Engram's dense parameters with narrower experts: equal P_act and P_tot."""
    base = moe_base()
    base_counts = count_parameters(base)
    loose = iso_parameter_variant(base, 0.75, iso_engram())
    iso = iso_parameter_variant(base, 0.75, iso_engram(), match_p_act=True)
    cfg, var = iso.config, iso.variant
    assert var == count_parameters(cfg)
    assert loose.variant.p_act > base_counts.p_act  # the unmatched variant is larger per token
    assert cfg.moe.expert_hidden < base.moe.expert_hidden
    # One unit of expert width moves P_act by (top_k + n_shared) * 3 * d * MoE layers: the closest
    # width leaves at most half of that.
    unit = (base.moe.top_k + base.moe.n_shared) * 3 * base.hidden_size * (base.num_layers - base.moe.n_dense_layers)
    assert abs(var.p_act - base_counts.p_act) <= unit // 2 + base.hidden_size * 3
    assert abs(var.p_act - base_counts.p_act) < abs(loose.variant.p_act - base_counts.p_act)
    assert abs(var.p_tot - base_counts.p_tot) / base_counts.p_tot < 0.01
    assert var.rho is not None and abs(var.rho - 0.75) < 0.1
    assert cfg.replace(moe=base.moe, engram=None, name=base.name) == base  # only the MoE and the table change


def test_iso_variant_matching_p_act_infeasible_is_a_clear_error() -> None:
    base = moe_base().replace(moe=dataclasses.replace(moe_base().moe, expert_hidden=4))
    iso_parameter_variant(base, 0.9, iso_engram())  # feasible without matching
    with pytest.raises(ConfigError, match=r"match_p_act: .* needs more routed experts than the base's 16"):
        iso_parameter_variant(base, 0.9, iso_engram(), match_p_act=True)
