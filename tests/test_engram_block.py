"""EngramBlock / ShortConv / gate (spec §2, §5, §6; golden facts GF-11, GF-12)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from engramlm.hashing.batch import window_starts
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.model import EngramLM
from engramlm.nn.engram import EngramBlock, ShortConv, signed_sqrt_gate
from engramlm.nn.engram_reference import ReferenceEngram

pytestmark = pytest.mark.usefixtures("one_thread")


D, M, HE, DH, R = 8, 4, 4, 4, 50


def make_block(**kw: object) -> EngramBlock:
    torch.manual_seed(0)
    args: dict = dict(hidden_size=D, num_rows=R, num_heads=HE, head_dim=DH, n_branches=M)
    args.update(kw)
    return EngramBlock(**args)


def inputs(b: int = 2, t: int = 12, m: int = M, d: int = D, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, m, d, generator=g)
    row_ids = torch.randint(0, R, (b, t, HE), generator=g)
    return hidden, row_ids


def hand_gated_value(block: EngramBlock, hidden: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
    """alpha * v computed literally from the block's weights, in float64 (spec E5-E9)."""
    b, t, m, d = hidden.shape
    w = block.wkv.weight.double()
    bias = torch.zeros(w.shape[0], dtype=torch.float64)
    if block.wkv.bias is not None:
        bias = block.wkv.bias.double()
    e = block.embed.weight.double()[row_ids].reshape(b, t, -1)
    value = e @ w[m * d :].T + bias[m * d :]
    eps = block.gate_norm_eps if block.gate_norm_eps is not None else torch.finfo(torch.float32).eps
    out = []
    for i in range(m):
        key = e @ w[i * d : (i + 1) * d].T + bias[i * d : (i + 1) * d]
        h = hidden[:, :, i].double()
        q = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * block.q_weight[i].double()
        k = key / torch.sqrt(key.pow(2).mean(-1, keepdim=True) + eps) * block.k_weight[i].double()
        s = (q * k).sum(-1, keepdim=True) / math.sqrt(d)
        alpha = torch.sigmoid(torch.sign(s) * s.abs().clamp_min(1e-6).sqrt())
        out.append(alpha * value)
    return torch.stack(out, dim=2)


# ---- GF-11: gate values -----------------------------------------------------------------------
def test_gf11_gate_values() -> None:
    s = torch.tensor([0.0, 1.0, -4.0, 1e-8])
    a = signed_sqrt_gate(s)
    assert a[0].item() == 0.5
    assert a[1].item() == pytest.approx(0.731059, abs=1e-6)
    assert a[2].item() == pytest.approx(0.119203, abs=1e-6)
    assert a[3].item() == pytest.approx(1 / (1 + math.exp(-1e-3)), abs=1e-7)
    assert a[3].item() > 0.5 + 2e-4  # the clamp lifts |s| to 1e-6 before the sqrt
    # The ablation is the plain sigmoid (sigma(-4), not sigma(-2)).
    plain = signed_sqrt_gate(s, signed_sqrt=False)
    assert plain[2].item() == pytest.approx(1 / (1 + math.exp(4.0)), abs=1e-7)


def test_gate_clamp_has_zero_gradient_below_threshold() -> None:
    s = torch.tensor([1e-8, -1e-7, 0.25], requires_grad=True)
    signed_sqrt_gate(s).sum().backward()
    assert s.grad[0].item() == 0.0 and s.grad[1].item() == 0.0
    assert s.grad[2].item() > 0.0


def test_gate_maths_in_fp32_for_bf16_inputs() -> None:
    block = make_block().to(torch.bfloat16)
    hidden, row_ids = inputs()
    hidden = hidden.to(torch.bfloat16)
    out, alpha = block(hidden, row_ids, return_gate=True)
    assert alpha.dtype == torch.float32
    assert alpha.shape == (2, 12, M, 1)
    assert out.dtype == torch.bfloat16
    # Gate values from bf16 hidden/keys must match a float64 evaluation of the same bf16 numbers
    # to fp32 accuracy (bf16 maths would be off by ~1e-2).
    e = block.lookup(row_ids).reshape(2, 12, -1)
    keys = block.wkv(e).view(2, 12, M + 1, D)[:, :, :M]
    got = block.gate_values(hidden, keys)
    eps = block.gate_norm_eps
    h, k = hidden.double(), keys.double()
    q = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * block.q_weight.double()
    kk = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * block.k_weight.double()
    s = (q * kk).sum(-1, keepdim=True) / math.sqrt(D)
    want = torch.sigmoid(torch.sign(s) * s.abs().clamp_min(1e-6).sqrt())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


# ---- GF-12: conv -------------------------------------------------------------------------------
def test_gf12_zero_init_conv_is_exact_identity_on_gated_value() -> None:
    block = make_block()
    assert torch.count_nonzero(block.conv.weight) == 0
    hidden, row_ids = inputs()
    out = block(hidden, row_ids)
    no_conv = copy.deepcopy(block)
    no_conv.conv = None
    assert torch.equal(out, no_conv(hidden, row_ids))  # Y = V~ exactly
    want = hidden.double() + hand_gated_value(block, hidden, row_ids)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # Non-trivial: the block does add something.
    assert (out - hidden).abs().max() > 1e-2


def test_gf12_dilated_receptive_field() -> None:
    torch.manual_seed(0)
    conv = ShortConv(4, 2, kernel_size=4, dilation=3, zero_init=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    v = torch.randn(1, 14, 2, 4)
    t = 11
    base = conv(v)[0, t]
    depends = set()
    for s in range(14):
        pert = v.clone()
        pert[0, s] += torch.randn(2, 4)
        if not torch.equal(conv(pert)[0, t], base):
            depends.add(s)
    assert depends == {t, t - 3, t - 6, t - 9}


def test_gf12_perturb_block_conv_input_at_t_minus_1() -> None:
    block = make_block(conv_zero_init=False)
    hidden, row_ids = inputs(b=1, t=12)
    e = block.lookup(row_ids).reshape(1, 12, -1)
    kv = block.wkv(e).view(1, 12, M + 1, D)
    gated = block.gate_values(hidden, kv[:, :, :M]) * kv[:, :, M:]
    t = 10
    y = block.conv(gated)
    p1, p3 = gated.clone(), gated.clone()
    p1[0, t - 1] += 1.0
    p3[0, t - 3] += 1.0
    assert torch.equal(block.conv(p1)[0, t], y[0, t])
    assert not torch.allclose(block.conv(p3)[0, t], y[0, t])


def test_conv_weight_gradient_nonzero_at_zero_init() -> None:
    block = make_block()
    hidden, row_ids = inputs(t=12)
    out = block(hidden, row_ids)
    (out * torch.randn_like(out)).sum().backward()
    g = block.conv.weight.grad
    assert g is not None and g.shape == (M * D, 1, 4)
    assert (g.abs().sum(dim=(0, 1)) > 0).all()  # every tap, including lag 9, gets a gradient
    assert block.conv.norm_weight.grad is not None


# ---- parity with the reference (demo-structure) module -----------------------------------------
@pytest.mark.parametrize(
    ("m", "kw"),
    [
        (4, dict(proj_bias=True, gate_norm_eps=None, conv_zero_init=False)),
        (1, dict(use_short_conv=False)),
    ],
)
def test_fused_block_matches_reference(m: int, kw: dict) -> None:
    block = make_block(n_branches=m, **kw)
    if block.conv is not None:
        assert torch.count_nonzero(block.conv.weight) > 0  # PyTorch default init, not zero
    with torch.no_grad():  # non-trivial gains so a swapped q/k norm would show
        block.q_weight.mul_(torch.rand_like(block.q_weight) + 0.5)
        block.k_weight.mul_(torch.rand_like(block.k_weight) + 0.5)
        if block.conv is not None:
            block.conv.norm_weight.mul_(torch.rand_like(block.conv.norm_weight) + 0.5)
    ref = ReferenceEngram(block)
    hidden, row_ids = inputs(m=m, t=13)
    got = block(hidden, row_ids)
    want = ref(hidden, row_ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - hidden).abs().max() > 1e-2


# ---- model-level identity at initialisation ----------------------------------------------------
def test_model_engram_adds_exactly_gated_value_at_init() -> None:
    spec = HashSpec(
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(23, 23),
        layer_ids=(1,),
        boundary_mode="reset",
    )
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=D,
        num_layers=2,
        n_heads=2,
        mlp_hidden=16,
        hc_mult=M,
        engram=EngramConfig(hash=spec, head_dim=DH),
    )
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(spec, CompressionMap.identity(40))).eval()
    blk = model.layers[1].engram
    assert torch.count_nonzero(blk.conv.weight) == 0
    seen: dict = {}

    def hook(mod, args, kwargs, out):
        seen["h"], seen["ids"], seen["out"] = args[0], args[1], out

    handle = blk.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
    handle.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    delta = (out - seen["h"]).double()
    want = hand_gated_value(blk, seen["h"], seen["ids"])
    torch.testing.assert_close(delta, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(seen["ids"], model.hash(ids)[0])


# ---- rows= vs row_ids=, argument errors ---------------------------------------------------------
def test_rows_path_equals_row_ids_path() -> None:
    block = make_block(conv_zero_init=False)
    hidden, row_ids = inputs()
    rows = block.embed.weight.detach()[row_ids]
    assert rows.shape == (2, 12, HE, DH)
    torch.testing.assert_close(block(hidden, rows=rows), block(hidden, row_ids), atol=0, rtol=0)


def test_argument_errors() -> None:
    block = make_block()
    hidden, row_ids = inputs()
    rows = block.embed.weight.detach()[row_ids]
    with pytest.raises(ValueError, match="exactly one"):
        block(hidden, row_ids, rows=rows)
    with pytest.raises(ValueError, match="exactly one"):
        block(hidden)
    bad = row_ids.clone()
    bad[0, 0, 0] = R
    with pytest.raises(IndexError, match=rf"\[0, {R}\)"):
        block(hidden, bad)
    bad[0, 0, 0] = -1
    with pytest.raises(IndexError, match=rf"\[0, {R}\)"):
        block(hidden, bad)
    with pytest.raises(ValueError, match=f"H_e={HE}"):
        block(hidden, row_ids[..., :3])
    with pytest.raises(ValueError, match="hidden must be"):
        block(hidden[:, :, :2], row_ids)


# ---- reset mode, DEAD mask -----------------------------------------------------------------------
def test_reset_window_conv_never_reads_previous_document() -> None:
    block = make_block(conv_zero_init=False)
    hidden, row_ids = inputs(b=1, t=15)
    first = 5
    doc_start = torch.zeros(1, 15, dtype=torch.bool)
    doc_start[0, 0] = doc_start[0, first] = True
    ws = window_starts(doc_start, None, (1, 15), hidden.device)
    assert ws[0].tolist() == [0] * first + [first] * (15 - first)
    packed = block(hidden, row_ids, window_start=ws)
    alone = block(hidden[:, first:], row_ids[:, first:])
    torch.testing.assert_close(packed[:, first:], alone, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed[:, :first], block(hidden[:, :first], row_ids[:, :first]))
    # Without the window, the conv does read the first document.
    free = block(hidden, row_ids)
    assert not torch.allclose(free[:, first:], alone, atol=1e-4)


def test_dead_mask_zeroes_output_delta() -> None:
    block = make_block(conv_zero_init=False)
    hidden, row_ids = inputs(b=2, t=10)
    dead = torch.zeros(2, 10, dtype=torch.bool)
    dead[0, 3] = dead[1, 0] = dead[1, 7] = True
    out, alpha = block(hidden, row_ids, dead=dead, return_gate=True)
    delta = out - hidden
    assert torch.equal(delta[dead], torch.zeros_like(delta[dead]))
    assert (alpha[dead] == 0).all()
    assert (delta[~dead].abs().amax(dim=(-1, -2)) > 0).all()


def test_short_conv_matches_conv1d_reference() -> None:
    """The shifted multiply-add form equals a causal left-padded Conv1d (spec §6)."""
    torch.manual_seed(0)
    conv = ShortConv(4, 2, kernel_size=4, dilation=3, zero_init=False)
    v = torch.randn(2, 11, 2, 4)
    u = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * conv.norm_weight
    padded = F.pad(u.reshape(2, 11, 8).transpose(1, 2), (9, 0))
    c = F.conv1d(padded, conv.weight, dilation=3, groups=8)
    want = v + F.silu(c.transpose(1, 2)).reshape(v.shape)
    torch.testing.assert_close(conv(v), want, atol=1e-6, rtol=1e-5)


# ---- the fused inference path (no autograd) equals the autograd path ----------------------------
FUSED_CASES = [
    dict(proj_bias=True, gate_norm_eps=None, conv_zero_init=False),
    dict(conv_zero_init=False, gate_signed_sqrt=False),
    dict(conv_zero_init=False, gate=False),
    dict(use_short_conv=False),
    dict(),  # zero-initialised conv
    dict(conv_zero_init=False, n_branches=1),
]


def _perturbed(**kw: object) -> EngramBlock:
    block = make_block(**kw)
    with torch.no_grad():  # non-trivial norm gains, so a dropped or swapped weight shows
        for p in (block.q_weight, block.k_weight) + ((block.conv.norm_weight,) if block.conv is not None else ()):
            p.mul_(torch.rand_like(p) + 0.5)
    return block


@pytest.mark.parametrize("kw", FUSED_CASES)
@pytest.mark.parametrize("masks", [False, True])
def test_fused_inference_path_equals_autograd_path(kw: dict, masks: bool) -> None:
    block = _perturbed(**kw)
    m = block.n_branches
    hidden, row_ids = inputs(b=3, t=14, m=m)
    extra: dict = {}
    if masks:  # a document reset mid-row (the conv must not read across it) and DEAD positions
        doc_start = torch.zeros(3, 14, dtype=torch.bool)
        doc_start[:, 0] = doc_start[0, 6] = doc_start[2, 11] = True
        extra["window_start"] = window_starts(doc_start, None, (3, 14), hidden.device)
        dead = torch.zeros(3, 14, dtype=torch.bool)
        dead[1, 4] = dead[2, 0] = True
        extra["dead"] = dead
    e = block.lookup(row_ids).reshape(3, 14, -1)
    assert not block._inference_path(hidden, e)  # parameters require grad: the autograd path
    want, want_alpha = block(hidden, row_ids, return_gate=True, **extra)
    with torch.no_grad():
        assert block._inference_path(hidden, e)
        got, got_alpha = block(hidden, row_ids, return_gate=True, **extra)
        ref = ReferenceEngram(block)(hidden, row_ids) if not (masks or kw.get("gate") is False) else None
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_alpha, want_alpha.detach(), atol=1e-6, rtol=1e-5)
    if ref is not None and kw.get("gate_signed_sqrt", True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - hidden).abs().max() > 1e-2
    if masks:
        assert torch.equal(got[extra["dead"]], hidden[extra["dead"]])


def test_fused_conv_chunks_agree() -> None:
    """Chunking the fused conv over the batch (to keep buffers small) changes nothing."""
    block = _perturbed(conv_zero_init=False)
    hidden, _ = inputs(b=5, t=11)
    g = torch.Generator().manual_seed(2)
    alpha, value = torch.rand(5, 11, M, 1, generator=g), torch.randn(5, 11, 1, D, generator=g)
    ws = torch.randint(0, 6, (5, 11), generator=g).cummax(dim=1).values
    with torch.no_grad():
        whole = block.conv.fused_forward(hidden, alpha, value, ws)
        rows = block.conv.fused_forward(hidden, alpha, value, ws, chunk_elems=2 * 11 * M * D)
        want = hidden + block.conv(alpha * value, ws)
    assert torch.equal(whole, rows)
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-5)


def test_inference_mode_forward_matches_and_training_still_backpropagates() -> None:
    """inference_mode takes the fused path; a training forward right after still gets gradients."""
    block = _perturbed(conv_zero_init=False)
    hidden, row_ids = inputs()
    with torch.inference_mode():
        fast = block(hidden, row_ids)
    slow = block(hidden, row_ids)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    slow.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (block.wkv.weight, block.conv.weight))
