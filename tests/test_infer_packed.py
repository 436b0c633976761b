"""Prepacked inference matmuls (``engramlm.nn.packed``) and the prefill's last-token LM head: the engine's
greedy tokens equal the plain path's, the packed copies follow in-place weight changes, and nothing
outside ``packed_inference`` (training, gradients, one-row products) takes the packed path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engramlm.infer import Engine
from engramlm.models.decode import DecodeCache
from engramlm.nn import packed
from engramlm.nn.packed import packable, packed_inference, packed_linear
from test_infer_compiled import GREEDY, PROMPTS, build

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not packed._AVAILABLE, reason="oneDNN (mkldnn) is not available in this torch build"),
]


def test_fused_packed_linear_equals_the_separate_projections() -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(48, n, bias=True) for n in (48, 16, 16)]
    x = torch.randn(3, 5, 48)
    with torch.no_grad(), packed_inference():
        assert packable(x)
        got = packed_linear(x, *layers)
    want = torch.cat([layer(x) for layer in layers], -1).detach()
    assert got.shape == (3, 5, 80)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_row_products_equal_f_linear() -> None:
    """Batch-1 decode: one row through the transposed copy (fused groups and a bias too), fp32 rounding apart;
    a narrowing weight (down-like) at one row and a 24-wide one (mHC-like) at a few rows take the other layouts."""
    torch.manual_seed(2)
    layers = [nn.Linear(64, n, bias=True) for n in (1024, 32)]
    assert packed._layout(1, 64, 1056) == 0 and packed._layout(3, 64, 1056) > 0
    x = torch.randn(1, 1, 64)
    with torch.no_grad(), packed_inference():
        got = packed_linear(x, *layers)
        many = packed_linear(x.expand(3, 1, 64), *layers)  # the same weights through the several-row kernel
        for rows, n_in, n in ((1, 640, 256), (4, 64, 24)):  # one narrowing row: oneDNN; a few rows, 24 wide: transposed
            narrow = nn.Linear(n_in, n, bias=False)
            xs = torch.randn(rows, n_in)
            assert (packed._layout(rows, n_in, n) == 0) == (rows == 4)
            torch.testing.assert_close(packed_linear(xs, narrow), narrow(xs), rtol=1e-5, atol=1e-5)
    want = torch.cat([layer(x) for layer in layers], -1).detach()
    assert got.shape == (1, 1, 1056)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many[:1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 64), (4, 64), (64,), (2, 2, 1, 64), "strided"])
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_layout_is_exactly_addmm_on_the_copy(shape, bias: bool) -> None:
    """The transposed layout (a few rows, or one row into a wide weight) runs ``F.linear`` on the copy's [out, in]
    view: bit for bit the ``addmm(b, x2d, copy)`` (``mm`` without a bias) it stands for, whatever x's rank and
    strides (F.linear folds only a contiguous 2-3 dim x into that call; any other x is reshaped first)."""
    torch.manual_seed(3)
    layer = nn.Linear(64, 48, bias=bias)
    x = torch.randn(64, 3).t() if shape == "strided" else torch.randn(*shape)
    rows = x.numel() // 64
    with torch.no_grad(), packed_inference():
        assert packed._layout(rows, 64, 48) == 0
        got = packed_linear(x, layer)
        _, view, b = packed._packed([layer.weight], [layer.bias] if bias else [], 0)
        copy_ = view.t()
        assert copy_.is_contiguous() and copy_.shape == (64, 48)
        x2 = x.reshape(rows, 64)
        want = (torch.addmm(b, x2, copy_) if bias else torch.mm(x2, copy_)).view(*x.shape[:-1], 48)
    assert torch.equal(got, want)


def test_packed_copy_is_rebuilt_after_an_in_place_weight_change_and_dropped_with_the_weight() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(32, 24, bias=False)
    x = torch.randn(4, 32)
    with torch.no_grad(), packed_inference():
        before = packed_linear(x, layer)
        layer.weight.mul_(-2.0)  # an optimiser step or load_state_dict writes in place
        after = packed_linear(x, layer)
    torch.testing.assert_close(after, -2.0 * before, rtol=1e-5, atol=1e-5)
    ptrs = (packed._layout(4, 32, 24), layer.weight.data_ptr())
    assert ptrs in packed._CACHE
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert set(state) == {"weight"}  # the packed copy is no part of the module's state
    copy.deepcopy(layer)  # and never in the way of a copy
    del layer
    assert ptrs not in packed._CACHE  # freed with its weight


def test_packed_path_only_inside_the_context_without_gradients_and_for_several_rows() -> None:
    x = torch.randn(4, 8)
    assert not packable(x)  # outside packed_inference
    with packed_inference():
        assert not packable(x)  # gradients on: never packed
        with torch.no_grad():
            assert packable(x)
            assert not packable(x.double())
        with packed_inference(False), torch.no_grad():
            assert not packable(x)


def test_engine_packed_greedy_tokens_equal_the_plain_engine() -> None:
    model = build()
    with Engine(model, packed=False) as plain:
        want = plain.generate(PROMPTS, GREEDY).tokens
        want_one = plain.generate(PROMPTS[2:3], GREEDY).tokens
    with Engine(model) as eng:
        assert eng.packed
        assert eng.generate(PROMPTS, GREEDY).tokens == want
        # a batch of one: the one-row steps read the transposed copies
        assert eng.generate(PROMPTS[2:3], GREEDY).tokens == want_one


def test_engine_packed_logits_match_the_plain_forward() -> None:
    """The prefill through the packed path gives the plain forward's logits to fp32 rounding."""
    model = build()
    ids = torch.tensor([p + [1] * (11 - len(p)) for p in PROMPTS])
    with torch.no_grad():
        want = model(ids).logits
        with packed_inference():
            cache = DecodeCache(model, ids.shape[0], 16)
            got = cache.run(model, ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_forward_at_gives_the_full_forwards_logits_at_those_positions() -> None:
    model = build()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    at = torch.tensor([8, 2, 5])
    with torch.no_grad():
        full = model(ids).logits
        one = model.forward_at(ids, at).logits
    assert one.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(one[:, 0], full[torch.arange(3), at])


def test_engine_rejects_a_non_bool_packed() -> None:
    with pytest.raises(Exception, match="packed"):
        Engine(build(), packed=1)  # type: ignore[arg-type]


def test_training_forward_is_untouched_by_the_packed_context() -> None:
    """Gradients on: the plain nn.Linear path, bit for bit, even inside packed_inference."""
    model = build().train()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    want = model(ids, targets=ids).loss
    with packed_inference():
        got = model(ids, targets=ids).loss
    assert torch.equal(got, want)
