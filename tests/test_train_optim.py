"""Optimisers: Muon orthogonalises, parameters go to the right optimiser, sparse table Adam equals
per-row Adam on touched rows only, with state independent of table size and no dense table grad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.model import EngramLM
from engramlm.train.config import OptimConfig
from engramlm.train.muon import Muon, orthogonalize
from engramlm.train.optim import OptimizerSet, split_parameters
from engramlm.train.sparse_adam import SparseRowAdam

torch.set_num_threads(1)


def _model(rows: int = 300, moe: bool = True) -> EngramLM:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(rows, rows), layer_ids=(1,))
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, n_heads=2, mlp_hidden=48, hc_mult=2,
        moe=MoEConfig(n_routed=4, top_k=2, expert_hidden=16, n_dense_layers=1) if moe else None,
        engram=EngramConfig(hash=spec, head_dim=8),
    )  # fmt: skip
    torch.manual_seed(0)
    return EngramLM(cfg, make_layout(spec, CompressionMap.identity(64)))


def test_orthogonalize_gives_near_unit_singular_values_batched() -> None:
    g = torch.randn(3, 40, 24)
    o = orthogonalize(g, steps=5)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3  # NS5 targets singular values in ~[0.7, 1.2]
    assert torch.allclose(o[1], orthogonalize(g[1]), atol=1e-5)  # a batch is E separate matrices
    with pytest.raises(ValueError, match="matrices"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_parameter_split() -> None:
    model = _model()
    muon, adamw, tables = split_parameters(model)
    assert set(tables) == {1} and tables[1] is model.layers[1].engram.embed.weight
    assert "embed.weight" in adamw and "lm_head.weight" in adamw
    assert "layers.1.ffn.experts.gate_proj" in muon and "layers.0.attn.q_proj.weight" in muon
    assert "layers.1.engram.wkv.weight" in muon and "layers.1.ffn.router.weight" in muon
    assert "layers.0.attn_norm.weight" in adamw and "layers.1.engram.q_weight" in adamw  # gains: not Muon
    names = set(muon) | set(adamw)
    assert "layers.1.engram.embed.weight" not in names
    assert len(names) + 1 == len(list(model.parameters()))


def _ref_adam(table: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]], lr, b1, b2, eps) -> np.ndarray:
    """Per-row lazy Adam written the slow, obvious way (float64)."""
    w = table.astype(np.float64).copy()
    m, v, n = np.zeros_like(w), np.zeros_like(w), np.zeros(len(w), dtype=np.int64)
    for rows, grads in steps:
        for r, g in zip(rows, grads, strict=True):
            n[r] += 1
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            w[r] -= lr * (m[r] / (1 - b1 ** n[r])) / (np.sqrt(v[r] / (1 - b2 ** n[r])) + eps)
    return w


def test_sparse_adam_matches_per_row_reference_and_leaves_other_rows() -> None:
    torch.manual_seed(1)
    table = torch.randn(1000, 4)
    before = table.clone()
    opt = SparseRowAdam({7: table}, lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    history = []
    for ids in ([[3, 5, 5, 900]], [[5, 6, 3, 3]], [[900, 11, 5, 12]]):
        row_ids = torch.tensor(ids)[None, :, :, None].expand(1, 1, 4, 2)  # [L, B, T, H]
        rows = opt.gather(row_ids, (7,))
        target = torch.randn_like(rows[7])
        (rows[7] * target).sum().backward()
        leaf = opt.leaves()[0]
        history.append((opt._pending[0].unique.numpy().copy(), leaf.grad.double().numpy().copy()))
        opt.step()
    want = _ref_adam(before.numpy(), history, 0.01, 0.9, 0.95, 1e-8)
    np.testing.assert_allclose(table.numpy(), want, rtol=1e-5, atol=1e-6)
    touched = {3, 5, 6, 11, 12, 900}
    untouched = [r for r in range(1000) if r not in touched]
    assert torch.equal(table[untouched], before[untouched])  # bitwise: never read-modify-written
    st = opt.state[7]
    counts = dict(zip(st.state_tensors()["rows"].tolist(), st.state_tensors()["count"].tolist(), strict=True))
    assert counts == {3: 2, 5: 3, 900: 2, 6: 1, 11: 1, 12: 1}  # per-row bias-correction counts


def test_sparse_state_independent_of_table_size_and_round_trips() -> None:
    ids = torch.randint(0, 500, (1, 2, 16, 2))
    states = []
    for rows in (500, 50_000):
        table = torch.zeros(rows, 8)
        opt = SparseRowAdam({0: table}, lr=0.1)
        out = opt.gather(ids, (0,))
        out[0].sum().backward()
        opt.step()
        states.append(opt)
    assert states[0].state_bytes == states[1].state_bytes  # proportional to rows touched, not to R
    a, b = states[0].state_tensors(), states[1].state_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = SparseRowAdam({0: torch.zeros(50_000, 8)}, lr=0.1)
    fresh.load_state_tensors(b)
    assert torch.equal(torch.from_numpy(fresh.state[0].keys), torch.unique(ids))
    c = fresh.state_tensors()
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_training_step_never_makes_a_dense_table_grad() -> None:
    model = _model()
    opts = OptimizerSet(model, OptimConfig(lr=1e-2))
    table = model.layers[1].engram.embed.weight
    before = table.detach().clone()
    ids = torch.randint(0, 64, (2, 12))
    row_ids = model.hash(ids)
    rows = opts.sparse.gather(row_ids, (1,))
    out = model(ids, torch.roll(ids, -1, 1), engram=model.engram_inputs(ids, rows=rows))
    out.loss.backward()
    assert table.grad is None and not table.requires_grad
    norm = opts.clip(1e-3)  # tiny max norm: everything is scaled, the row leaves included
    assert norm > 1e-3
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.grad) for t in opts.grad_tensors()]))
    assert float(total) == pytest.approx(1e-3, rel=1e-3)
    assert any(t is opts.sparse.leaves()[0] for t in opts.grad_tensors())
    opts.step()
    changed = (table != before).any(-1).nonzero().flatten()
    assert set(changed.tolist()) == set(torch.unique(row_ids).tolist())
    assert opts.sparse.lr == pytest.approx(5 * 1e-2)  # the paper's 5x table LR
    tensors, meta = opts.state_tensors()
    assert any(k.startswith("muon/") for k in tensors) and any(k.startswith("sparse/") for k in tensors)
    assert meta["sparse"] == [1]


def test_a_step_moves_every_dense_weights_version_counter() -> None:
    """The packed-weight caches (nn.packed, nn.hyper) are keyed on ``Tensor._version``: an optimiser that writes
    weights without bumping it (torch's fused AdamW does) would serve the next forward stale weights. Muon's
    chunked step writes through views, which share their base's counter."""
    model = _model()
    opt = OptimizerSet(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    for p in opt.dense_params:
        p.grad = torch.randn_like(p)
    before = {id(p): (p._version, p.detach().clone()) for p in opt.dense_params}
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    for p in opt.dense_params:
        version, value = before[id(p)]
        assert p._version > version and not torch.equal(p.detach(), value), names[id(p)]
