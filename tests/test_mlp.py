import torch
import torch.nn.functional as F

from engramlm.nn.mlp import SwiGLU


def test_swiglu_formula_and_names() -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(8, 20)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    x = torch.randn(2, 3, 8)
    w1, w3, w2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    ref = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(mlp(x), ref)
    assert "gate_proj.bias" in SwiGLU(8, 20, bias=True).state_dict()
