import pytest
import torch
from torch import nn

from engramlm.nn.hyper import BranchReadout, MultiBranchResidual, expand_stream, sinkhorn

pytestmark = pytest.mark.usefixtures("one_thread")


D = 16


def sublayers(n: int) -> list[nn.Module]:
    torch.manual_seed(1)
    return [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n)]


def run_stack(hcs: list[MultiBranchResidual], fs: list[nn.Module], x: torch.Tensor, m: int):
    h = expand_stream(x, m)
    for hc, f in zip(hcs, fs, strict=True):
        inp, ctx = hc.read(h)
        h = hc.write(h, f(inp), ctx)
    return BranchReadout(D, m)(h)


def plain_stack(fs: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for f in fs:
        x = x + f(x)
    return x


@pytest.mark.parametrize("alpha", [1e-2, 1.0])
def test_coefficients_constraints(alpha: float) -> None:
    torch.manual_seed(0)
    hc = MultiBranchResidual(D, 4)
    with torch.no_grad():
        for p in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
            p.fill_(alpha)
        hc.res_logits.add_(torch.randn(4, 4))
    pre, post, res = hc.coefficients(3 * torch.randn(2, 7, 4, D))
    assert pre.shape == post.shape == (2, 7, 4) and res.shape == (2, 7, 4, 4)
    assert (pre >= 0).all() and (post >= 0).all() and (res >= 0).all()
    one = torch.ones(2, 7, 4)
    torch.testing.assert_close(res.sum(-1), one, rtol=0, atol=1e-5)
    torch.testing.assert_close(res.sum(-2), one, rtol=0, atol=1e-5)


def test_sinkhorn_random_logits() -> None:
    torch.manual_seed(0)
    p = sinkhorn(torch.randn(500, 4, 4))
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(500, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(p.sum(-2), torch.ones(500, 4), rtol=0, atol=1e-5)


def test_single_branch_is_exactly_plain_residual() -> None:
    hc, ro = MultiBranchResidual(D, 1), BranchReadout(D, 1)
    assert not list(hc.parameters()) and not list(ro.parameters())
    h = torch.randn(2, 5, 1, D)
    x, ctx = hc.read(h)
    assert torch.equal(x, h[:, :, 0])
    y = torch.randn(2, 5, D)
    assert torch.equal(hc.write(h, y, ctx), h + y[:, :, None])
    fs, x = sublayers(4), torch.randn(2, 5, D)
    assert torch.equal(run_stack([MultiBranchResidual(D, 1) for _ in fs], fs, x, 1), plain_stack(fs, x))


def test_init_values() -> None:
    hc = MultiBranchResidual(D, 4, dynamic=False)
    pre, post, res = hc.coefficients(torch.randn(1, 1, 4, D))
    torch.testing.assert_close(pre, torch.full((4,), 0.25))
    torch.testing.assert_close(post, torch.ones(4))
    e = torch.e**4
    expect = torch.full((4, 4), 1 / (e + 3)) + torch.eye(4) * (e - 1) / (e + 3)
    torch.testing.assert_close(res, expect)
    ro = BranchReadout(D, 4)
    h = torch.randn(2, 3, 4, D)
    torch.testing.assert_close(ro(h), h.mean(2))


@pytest.mark.parametrize("dynamic", [False, True])
def test_init_reproduces_plain_residual(dynamic: bool) -> None:
    """Static (or alpha = 0) init: the M-branch stack equals the plain residual to fp32 roundoff."""
    fs, x = sublayers(6), torch.randn(2, 5, D)
    hcs = [MultiBranchResidual(D, 4, dynamic=dynamic) for _ in fs]
    if dynamic:
        with torch.no_grad():
            for hc in hcs:
                for p in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
                    p.zero_()
    torch.testing.assert_close(run_stack(hcs, fs, x, 4), plain_stack(fs, x), rtol=0, atol=1e-5)


def test_default_dynamic_init_is_near_plain_residual() -> None:
    """With the default alpha = 1e-2 the dynamic terms only perturb the residual by O(alpha)."""
    fs, x = sublayers(6), torch.randn(2, 5, D)
    out = run_stack([MultiBranchResidual(D, 4) for _ in fs], fs, x, 4)
    ref = plain_stack(fs, x)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def test_gradients_reach_dynamic_parts() -> None:
    torch.manual_seed(0)
    hc, ro, f = MultiBranchResidual(D, 4), BranchReadout(D, 4), nn.Linear(D, D)
    h = torch.randn(2, 5, 4, D)
    h[:, :, 1:] += torch.randn(2, 5, 3, D)  # distinct branches, so H_res mixing matters
    x, ctx = hc.read(h)
    ro(hc.write(h, f(x), ctx)).pow(2).sum().backward()
    for name, p in [*hc.named_parameters(), *ro.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(dict(hc.named_parameters())) == {
        "pre_logits",
        "post_logits",
        "res_logits",
        "norm.weight",
        "proj.weight",
        "alpha_pre",
        "alpha_post",
        "alpha_res",
    }
    assert hc.proj.weight.shape == (2 * 4 + 16, 4 * D)


def test_inference_sinkhorn_equals_autograd_sinkhorn() -> None:
    """Without autograd the host runs one compiled loop; it must equal the differentiable torch path."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, 4, generator=g) * 2 + 4 * torch.eye(4)
    with torch.no_grad():
        fast = sinkhorn(logits, 20)
    slow = sinkhorn(logits.clone().requires_grad_(), 20)
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-5)
    slow3 = sinkhorn(logits.clone().requires_grad_(), 3)
    with torch.no_grad():  # the iteration count is honoured
        torch.testing.assert_close(sinkhorn(logits, 3), slow3.detach(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(slow3, slow)


def test_inference_coefficients_equal_autograd_and_follow_weight_updates() -> None:
    """The no-grad coefficients (cached static vectors) equal the autograd ones, also after an in-place update."""
    torch.manual_seed(0)
    hc = MultiBranchResidual(D, 4, dynamic=True, alpha_init=0.3)
    h = torch.randn(2, 5, 4, D)
    for _ in range(2):
        slow = hc.coefficients(h)
        with torch.no_grad():
            fast = hc.coefficients(h)
        for a, b in zip(fast, slow, strict=True):
            torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-5)
        with torch.no_grad():  # an optimiser-like in-place step: the cache must notice
            hc.res_logits.add_(torch.randn(4, 4))
            hc.alpha_post.mul_(2)


def test_sinkhorn_op_is_the_eager_host_sinkhorn_bit_for_bit() -> None:
    """The compiled step's ``engramlm::sinkhorn`` takes a shortcut to the Numba loop: same matrices as
    :func:`sinkhorn` (batched, unbatched, non-contiguous, wide logits that take the log-domain loop)."""
    from engramlm.nn.hyper import _sinkhorn_op

    torch.manual_seed(4)
    wide = torch.randn(2, 4, 4)
    wide[:, 0] += 800.0  # row maxima 800 apart: the log-domain loop
    for z in (torch.randn(8, 1, 4, 4) * 3, torch.randn(3, 5, 4, 4), torch.randn(4, 4).t(), wide):
        assert torch.equal(_sinkhorn_op(z, 20), sinkhorn(z, 20))


def test_host_sinkhorn_handles_widely_spread_logits() -> None:
    """Logits spread over hundreds (a column far below the rest) must not divide by an underflowed zero sum:
    the host loop takes the log-domain path there and agrees with the autograd Sinkhorn."""
    g = torch.Generator().manual_seed(0)
    for scale in (10.0, 100.0, 200.0, 400.0, 800.0):
        logits = torch.randn(500, 4, 4, generator=g) * scale
        logits[:3, :, 1] -= 1000.0  # a whole column far below: the case a row-only check missed
        with torch.no_grad():
            fast = sinkhorn(logits, 20)
        slow = sinkhorn(logits.clone().requires_grad_(), 20).detach()
        assert torch.isfinite(fast).all(), scale
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4, msg=f"scale {scale}")
