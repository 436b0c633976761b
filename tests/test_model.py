"""EngramLM end to end: causality, training, boundary modes, MoE balancing, I/O, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engramlm.errors import ConfigError, CorruptFileError, HashSpecMismatch
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.io import load_pretrained, save_pretrained
from engramlm.models.model import EngramLM
from engramlm.nn.moe import MoE
from helpers import randomise_conv, tiny_lm

V = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(**kw: object) -> HashSpec:
    args: dict = dict(
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(31, 31),
        layer_ids=(1,),
        boundary_mode="reset",
    )
    args.update(kw)
    return HashSpec(**args)


def config(*, m: int = 4, use_moe: bool = True, hash_kw: dict | None = None, **kw: object) -> ModelConfig:
    args: dict = dict(
        vocab_size=V,
        hidden_size=16,
        num_layers=3,
        n_heads=2,
        mlp_hidden=24,
        hc_mult=m,
        max_seq_len=64,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=8, n_dense_layers=1) if use_moe else None,
        engram=EngramConfig(hash=spec(**(hash_kw or {})), head_dim=4),
    )
    args.update(kw)
    return ModelConfig(**args)


def randint(shape: tuple[int, ...], seed: int = 1, high: int = V) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ---- causality -----------------------------------------------------------------------------------
def test_whole_model_is_causal_including_hashing() -> None:
    model = tiny_lm(config()).eval()
    randomise_conv(model)
    ids = randint((2, 14))
    with torch.no_grad():
        ref = model(ids).logits
        for t in (0, 4, 9, 12):
            other = ids.clone()
            other[:, t + 1 :] = randint((2, 13 - t), seed=t + 7)
            assert not torch.equal(other[:, t + 1 :], ids[:, t + 1 :])
            got = model(other).logits
            torch.testing.assert_close(got[:, : t + 1], ref[:, : t + 1], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got[:, t + 1 :], ref[:, t + 1 :])


# ---- training step -----------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 4])
def test_forward_backward_reaches_table_and_backbone(m: int) -> None:
    model = tiny_lm(config(m=m)).train()
    ids = randint((2, 10))
    targets = randint((2, 10), seed=2)
    out = model(ids, targets)
    assert out.logits.shape == (2, 10, V)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    eng = model.layers[1].engram
    assert eng is not None and eng.n_branches == m
    table_grad = eng.embed.weight.grad
    assert table_grad is not None and table_grad.abs().sum() > 0
    used = torch.unique(model.hash(ids)[0])
    touched = torch.nonzero(table_grad.abs().sum(-1)).flatten()
    assert set(touched.tolist()) <= set(used.tolist())  # only looked-up rows get gradient
    assert eng.wkv.weight.grad.abs().sum() > 0
    assert eng.conv.weight.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0
    assert model.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.layers[2].ffn.experts.gate_proj.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- boundary modes ------------------------------------------------------------------------------
def test_reset_mode_packed_document_matches_alone() -> None:
    # Layer 0 sees only the token embedding, so its Engram output for a packed document must
    # equal the one for the document alone when hashing and conv both reset.
    cfg = config(hash_kw=dict(layer_ids=(0, 2)))
    model = tiny_lm(cfg).eval()
    randomise_conv(model)
    first, t = 6, 15
    ids = randint((1, t))
    doc_start = torch.zeros(1, t, dtype=torch.bool)
    doc_start[0, 0] = doc_start[0, first] = True
    packed_rows = model.hash(ids, doc_start)
    alone_rows = model.hash(ids[:, first:])
    assert packed_rows.shape == (2, 1, t, 4)
    assert torch.equal(packed_rows[:, :, first:], alone_rows)
    assert not torch.equal(model.hash(ids)[:, :, first:], alone_rows)  # reset matters

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [model.layers[0].engram.register_forward_hook(lambda mod, a, o: seen.append((a[0], o[0])))]
    with torch.no_grad():
        model(ids, engram=model.engram_inputs(ids, doc_start))
        model(ids[:, first:])
        model(ids)  # no reset: the conv and the hash read the first document
    for h in handles:
        h.remove()
    (h_p, y_p), (h_a, y_a), (_, y_n) = seen
    assert torch.equal(h_p[:, first:], h_a)  # same conv-stage inputs (embedding stream)
    torch.testing.assert_close(y_p[:, first:], y_a, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y_n[:, first:], y_a, atol=1e-4)


def test_doc_start_honoured_only_in_reset_mode() -> None:
    t = 12
    ids = randint((2, t))
    doc_start = torch.zeros(2, t, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 5] = doc_start[1, 8] = True
    none_model = tiny_lm(config(hash_kw=dict(boundary_mode="none"))).eval()
    randomise_conv(none_model)
    reset_model = tiny_lm(config()).eval()
    randomise_conv(reset_model)
    assert torch.equal(none_model.hash(ids, doc_start), none_model.hash(ids))
    assert not torch.equal(reset_model.hash(ids, doc_start), reset_model.hash(ids))
    with torch.no_grad():
        none_doc = none_model.engram_inputs(ids, doc_start)
        assert torch.equal(none_model(ids, engram=none_doc).logits, none_model(ids).logits)
        reset_logits = reset_model(ids, engram=reset_model.engram_inputs(ids, doc_start)).logits
        assert not torch.allclose(reset_logits, reset_model(ids).logits)


# ---- MoE balancing -----------------------------------------------------------------------------
def test_moe_bias_update_and_eval_does_not_count() -> None:
    model = tiny_lm(config())
    moes = [mod for mod in model.modules() if isinstance(mod, MoE)]
    assert len(moes) == 2  # layers 1 and 2 (n_dense_layers = 1)
    ids = randint((4, 16))
    model.eval()
    with torch.no_grad():
        model(ids)
    assert all(int(mo.expert_counts.sum()) == 0 for mo in moes)
    assert all(int(mo.last_load.sum()) == 4 * 16 * 2 for mo in moes)
    model.train()
    with torch.no_grad():
        model(ids)
        model(ids)
    for mo in moes:
        assert int(mo.expert_counts.sum()) == 2 * 4 * 16 * 2
        counts = mo.expert_counts.clone().float()
        before = mo.expert_bias.clone()
        mo.update_bias()
        step = mo.expert_bias - before
        assert not torch.equal(step, torch.zeros_like(step))
        # Over-used experts go down, under-used ones go up.
        assert torch.equal(torch.sign(step), torch.sign(counts.mean() - counts))
        assert int(mo.expert_counts.sum()) == 0


# ---- save / load -------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> tuple[EngramLM, Path]:
    model = tiny_lm(config()).eval()
    randomise_conv(model)
    with torch.no_grad():
        for mo in model.modules():
            if isinstance(mo, MoE):
                mo.expert_bias.normal_(std=0.1)
    return model, save_pretrained(model, tmp_path / "ckpt")


def test_save_load_roundtrip_identical_logits(saved: tuple[EngramLM, Path]) -> None:
    model, path = saved
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors", "engram_hash.safetensors"}
    loaded = load_pretrained(path).eval()
    assert loaded.config == model.config
    assert loaded.layout.fingerprint == model.layout.fingerprint
    ids = randint((2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for a, b in zip(loaded.modules(), model.modules(), strict=True):
        if isinstance(a, MoE):
            assert torch.equal(a.expert_bias, b.expert_bias)


def test_save_load_tied_embeddings(tmp_path: Path) -> None:
    model = tiny_lm(config(tie_embeddings=True)).eval()
    loaded = load_pretrained(save_pretrained(model, tmp_path / "tied"))
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = randint((1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_with_other_seed_layout_refused(saved: tuple[EngramLM, Path]) -> None:
    model, path = saved
    other = make_layout(model.config.engram.hash.replace(seed=1), CompressionMap.identity(V))
    with pytest.raises(HashSpecMismatch):
        load_pretrained(path, layout=other)
    same = make_layout(model.config.engram.hash, CompressionMap.identity(V))
    assert load_pretrained(path, layout=same).layout is same


def test_tampered_multipliers_refused(saved: tuple[EngramLM, Path]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path = saved
    art = path / "engram_hash.safetensors"
    with safe_open(str(art), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["multipliers"] = tensors["multipliers"].clone()
    tensors["multipliers"][0, 1] += 2  # still odd, still plausible
    save_file(tensors, str(art), metadata=meta)
    with pytest.raises(HashSpecMismatch, match="multipliers"):
        load_pretrained(path, verify=False)  # the check behind checksums.json (which would refuse it first)


def test_missing_or_corrupt_weights_raise(saved: tuple[EngramLM, Path]) -> None:
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(CorruptFileError):
        load_pretrained(path)
    weights.unlink()
    with pytest.raises(CorruptFileError):
        load_pretrained(path)


def test_unknown_config_field_raises(saved: tuple[EngramLM, Path]) -> None:
    _, path = saved
    cfg_path = path / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc["model"]["bogus_knob"] = 3
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="bogus_knob"):
        load_pretrained(path, verify=False)  # the check behind checksums.json (which would refuse it first)
    del doc["model"]["bogus_knob"]
    doc["model"]["engram"]["hash"]["secret_salt"] = 1
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="secret_salt"):
        load_pretrained(path, verify=False)


# ---- config validation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(hidden_size=15), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_kv_heads=3, n_heads=4, hidden_size=16), "n_kv_heads"),
        (dict(num_layers=1), "engram.hash.layer_ids"),
        (dict(moe=MoEConfig(n_routed=4, top_k=2, n_dense_layers=5)), "moe.n_dense_layers"),
    ],
)
def test_model_config_errors_name_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        config(**change)


def test_engram_layer_id_must_be_below_num_layers() -> None:
    with pytest.raises(ConfigError, match=r"engram\.hash\.layer_ids.*num_layers \(3\)"):
        config(hash_kw=dict(layer_ids=(1, 3)))
    assert config(hash_kw=dict(layer_ids=(1, 2))).engram.hash.layer_ids == (1, 2)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(top_k=0), "moe.top_k"),
        (dict(top_k=5, n_routed=4), "moe.top_k"),
        (dict(n_routed=0), "moe.n_routed"),
        (dict(n_shared=-1), "moe.n_shared"),
        (dict(score_func="relu"), "moe.score_func"),
    ],
)
def test_moe_config_errors(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        MoEConfig(**kw)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(table_dtype="fp16"), "engram.table_dtype"),
        (dict(head_dim=0), "engram.head_dim"),
        (dict(gate_norm_eps=0.0), "engram.gate_norm_eps"),
        (dict(embed_init_std=-1.0), "engram.embed_init_std"),
    ],
)
def test_engram_config_errors(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        EngramConfig(**kw)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(layer_ids=(3, 1)), "layer_ids"),
        (dict(layer_ids=()), "layer_ids"),
        (dict(max_ngram_size=1, engram_vocab_size=()), "max_ngram_size"),
        (dict(engram_vocab_size=(31,)), "engram_vocab_size"),
        (dict(boundary_mode="eos"), "boundary_mode"),
        (dict(row_id_dtype="int16"), "row_id_dtype"),
    ],
)
def test_hash_spec_errors(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        spec(**kw)


@pytest.mark.parametrize(
    ("hash_patch", "field"),
    [
        (dict(layer_ids=[2, 1]), "engram.hash.layer_ids"),
        (dict(max_ngram_size=9), "engram.hash.max_ngram_size"),
        (dict(engram_vocab_size=[31]), "engram.hash.engram_vocab_size"),
    ],
)
def test_nested_from_dict_errors_name_full_path(hash_patch: dict, field: str) -> None:
    d = config().to_dict()
    assert ModelConfig.from_dict(d) == config()
    d["engram"]["hash"].update(hash_patch)
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        ModelConfig.from_dict(d)


def test_from_dict_type_errors() -> None:
    d = config().to_dict()
    d["moe"]["top_k"] = 9
    with pytest.raises(ConfigError, match=r"^moe\.top_k:"):
        ModelConfig.from_dict(d)
    d = config().to_dict()
    d["engram"]["table_dtype"] = "int4"
    with pytest.raises(ConfigError, match=r"^engram\.table_dtype:"):
        ModelConfig.from_dict(d)
    d = config().to_dict()
    d["hidden_size"] = "16"
    with pytest.raises(ConfigError, match=r"^hidden_size:"):
        ModelConfig.from_dict(d)


def test_expected_compressed_vocab_size_mismatch_refused() -> None:
    good = spec(expected_compressed_vocab_size=V)
    assert make_layout(good, CompressionMap.identity(V)).compression.compressed_vocab_size == V
    with pytest.raises(ConfigError, match="expected_compressed_vocab_size"):
        make_layout(spec(expected_compressed_vocab_size=V + 1), CompressionMap.identity(V))


def test_model_refuses_mismatched_layout() -> None:
    cfg = config()
    with pytest.raises(ConfigError, match="layout"):
        EngramLM(cfg, None)
    with pytest.raises(ConfigError, match="layout"):
        EngramLM(cfg, make_layout(spec(seed=5), CompressionMap.identity(V)))
    with pytest.raises(ConfigError, match="vocab_size"):
        EngramLM(cfg, make_layout(cfg.engram.hash, CompressionMap.identity(V + 8)))


def test_out_of_range_input_ids_raise() -> None:
    model = tiny_lm(config(use_moe=False)).eval()
    ids = randint((1, 6))
    with torch.no_grad():
        model(ids)
        ids[0, 3] = V
        with pytest.raises(IndexError, match=rf"\[0, {V}\)"):
            model(ids)
        ids[0, 3] = -1
        with pytest.raises(IndexError, match=rf"\[0, {V}\)"):
            model(ids)


# ---- externally gathered rows ------------------------------------------------------------------
def test_engram_rows_equal_hashed_path_full_and_partial() -> None:
    model = tiny_lm(config(hash_kw=dict(layer_ids=(0, 2)))).eval()
    randomise_conv(model)
    ids = randint((2, 9))
    rid = model.hash(ids)
    rows = {lid: model.layers[lid].engram.embed.weight.detach()[rid[i]] for i, lid in enumerate((0, 2))}
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(
            model(ids, engram=model.engram_inputs(ids, rows=rows)).logits, full, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            model(ids, engram=model.engram_inputs(ids, row_ids=rid)).logits, full, atol=0, rtol=0
        )
        # Rows for some layers only: the others must still be hashed from the ids.
        partial = model(ids, engram=model.engram_inputs(ids, rows={2: rows[2]})).logits
        torch.testing.assert_close(partial, full, atol=1e-6, rtol=0)


def test_hidden_states_and_engram_knockout() -> None:
    model, ids = tiny_lm(config()), randint((2, 24))
    out = model.forward_with_hidden_states(ids)
    assert len(out.hidden_states) == model.config.num_layers + 1
    torch.testing.assert_close(model.head(out.hidden_states[-1]), out.logits)
    off = model(ids, engram=model.engram_inputs(ids, skip_engram=True))
    assert off.gates == {}
    # With the table perturbed, knocked-out logits do not move while normal logits do.
    with torch.no_grad():
        for blk in model.engram_layers.values():
            blk.embed.weight.mul_(3.0)
    assert torch.equal(model(ids, engram=model.engram_inputs(ids, skip_engram=True)).logits, off.logits)
    assert not torch.allclose(model(ids).logits, out.logits)


def test_skip_engram_on_a_model_without_engram_is_a_no_op() -> None:
    model = tiny_lm(config().replace(engram=None))
    ids = randint((1, 8))
    assert torch.equal(model(ids, engram=model.engram_inputs(ids, skip_engram=True)).logits, model(ids).logits)
