import pytest
import torch

from engramlm.nn.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")


def make(**kw: object) -> MoE:
    torch.manual_seed(0)
    args: dict = dict(d_model=8, expert_hidden=16, n_routed=4, n_shared=1, top_k=2)
    args.update(kw)
    return MoE(**args)


def test_routing_shapes_and_names() -> None:
    moe = make()
    x = torch.randn(2, 5, 8)
    w, idx, scores = moe.route(x.reshape(-1, 8))
    assert w.shape == idx.shape == (10, 2) and scores.shape == (10, 4)
    assert (idx[:, 0] != idx[:, 1]).all()
    assert moe(x).shape == x.shape
    assert moe.last_load.sum().item() == 10 * 2
    assert {k for k in moe.state_dict() if k.startswith("experts")} == {
        "experts.gate_proj",
        "experts.up_proj",
        "experts.down_proj",
    }
    assert moe.experts.gate_proj.shape == (4, 16, 8)
    assert moe.experts.down_proj.shape == (4, 8, 16)
    assert "expert_bias" in moe.state_dict() and "expert_counts" not in moe.state_dict()
    with pytest.raises(ValueError):
        make(top_k=5)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_dispatch_matches_naive(score_func: str) -> None:
    moe = make(score_func=score_func)
    moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(3, 7, 8)
    flat = x.reshape(-1, 8)
    w, idx, _ = moe.route(flat)
    ref = torch.stack(
        [
            moe.shared(flat[n]) + sum(w[n, j] * moe.experts.expert(int(idx[n, j]), flat[n][None])[0] for j in range(2))
            for n in range(flat.shape[0])
        ]
    )
    torch.testing.assert_close(moe(x).reshape(-1, 8), ref, rtol=1e-5, atol=1e-6)


def test_bias_steers_selection_not_gates() -> None:
    moe = make(n_routed=6, top_k=3)
    x = torch.randn(40, 8)
    moe.expert_bias.copy_(torch.randn(6))
    w, idx, scores = moe.route(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(40))
    expect = scores.gather(-1, idx)
    torch.testing.assert_close(w, expect / expect.sum(-1, keepdim=True))
    moe.expert_bias.copy_(torch.tensor([10.0, 0, 0, 0, 0, 0]))  # forces expert 0 into every top-k
    w, idx, scores = moe.route(x)
    assert (idx == 0).any(-1).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(40))


def test_aux_loss_free_balancing() -> None:
    moe = make(d_model=16, n_routed=8, top_k=2, bias_update_speed=0.02)
    with torch.no_grad():
        moe.router.weight[0] = 0.5  # with inputs offset by +1, expert 0 wins for every token
    x = torch.randn(256, 16) + 1.0

    def imbalance() -> float:
        load = moe.last_load.float()
        return (load.max() / load.mean()).item()

    moe.train()
    with torch.no_grad():
        moe(x)
        before = imbalance()
        for _ in range(100):
            moe(x)
            moe.update_bias()
        moe(x)
    assert before > 3.5
    assert imbalance() < 1.6
    assert moe.expert_counts.sum().item() == 256 * 2  # only the forward after the last update
    moe.update_bias()
    assert moe.expert_counts.sum().item() == 0


def test_parameter_counts() -> None:
    moe = make()  # d=8, hidden=16, 4 routed, 1 shared, top-2
    expert = 3 * 16 * 8
    router = 4 * 8
    assert moe.num_parameters() == expert * 1 + router + 4 * expert
    assert moe.activated_parameters() == expert * 1 + router + 2 * expert
    no_shared = make(n_shared=0, n_routed=5, top_k=3)
    assert no_shared.num_parameters() == 5 * 8 + 5 * expert
    assert no_shared.activated_parameters() == 5 * 8 + 3 * expert
    two_shared = make(n_shared=2)
    assert two_shared.activated_parameters() == 2 * expert + router + 2 * expert
