import pytest
import torch

from engramlm.nn.attention import Attention, KVCache
from engramlm.nn.rope import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(32, n_heads=4, n_kv_heads=2).eval()


def test_causality(attn: Attention) -> None:
    x = torch.randn(2, 10, 32)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)
    y, y2 = attn(x), attn(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_gqa_shapes() -> None:
    a = Attention(32, n_heads=8, n_kv_heads=2)
    assert a.q_proj.weight.shape == (32, 32) and a.k_proj.weight.shape == (8, 32)
    assert a.v_proj.weight.shape == (8, 32) and a.o_proj.weight.shape == (32, 32)
    assert a(torch.randn(3, 5, 32)).shape == (3, 5, 32)
    b = Attention(32, n_heads=4, head_dim=16, bias=True)
    assert b.q_proj.weight.shape == (64, 32) and b.o_proj.weight.shape == (32, 64)
    assert b(torch.randn(1, 4, 32)).shape == (1, 4, 32)
    with pytest.raises(ValueError):
        Attention(32, n_heads=4, n_kv_heads=3)


def test_kv_cache_decode_equals_full(attn: Attention) -> None:
    x = torch.randn(2, 12, 32)
    full = attn(x)
    cache = attn.new_cache(2, 16, device=x.device, dtype=x.dtype)
    outs = [attn(x[:, :5], kv_cache=cache), attn(x[:, 5:8], kv_cache=cache)]  # prefill, chunk
    outs += [attn(x[:, t : t + 1], kv_cache=cache) for t in range(8, 12)]  # one token at a time
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
    assert cache.lengths.tolist() == [12, 12]
    with pytest.raises(ValueError):
        attn(torch.randn(2, 5, 32), kv_cache=cache)


def test_kv_cache_ragged_prefill(attn: Attention) -> None:
    """Right-padded prefill, trimmed with set_lengths, then decode: matches each sequence alone."""
    a, b = torch.randn(1, 7, 32), torch.randn(1, 5, 32)
    prompt = torch.cat([a[:, :5], torch.cat([b[:, :3], torch.randn(1, 2, 32)], 1)])
    cache = KVCache(2, attn.n_kv_heads, 8, attn.head_dim)
    attn(prompt, kv_cache=cache)
    cache.set_lengths(torch.tensor([5, 3]))
    step1 = attn(torch.cat([a[:, 5:6], b[:, 3:4]]), kv_cache=cache)
    step2 = attn(torch.cat([a[:, 6:7], b[:, 4:5]]), kv_cache=cache)
    torch.testing.assert_close(step1[0], attn(a)[0, 5:6], rtol=0, atol=1e-5)
    torch.testing.assert_close(step2[0], attn(a)[0, 6:7], rtol=0, atol=1e-5)
    torch.testing.assert_close(step1[1], attn(b)[0, 3:4], rtol=0, atol=1e-5)
    torch.testing.assert_close(step2[1], attn(b)[0, 4:5], rtol=0, atol=1e-5)


def test_rope_is_relative(attn: Attention) -> None:
    """Shifting every position by a constant leaves attention unchanged."""
    x = torch.randn(2, 6, 32)
    shifted = attn(x, positions=torch.arange(6) + 37)
    torch.testing.assert_close(shifted, attn(x), rtol=0, atol=1e-5)
    batched = attn(x, positions=torch.arange(6).expand(2, 6) + torch.tensor([[3], [9]]))
    torch.testing.assert_close(batched, attn(x), rtol=0, atol=1e-5)


def test_rope_table_and_norm() -> None:
    rope = RotaryEmbedding(8, theta=10000.0)
    x = torch.randn(1, 2, 5, 8)
    y = rope.apply_rotary(x, torch.arange(5))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity
    cos, _ = rope.tables(3, x.device, torch.float32)
    assert cos.shape == (5, 4)  # cached table reused: at least the requested length
    rope.apply_rotary(x, torch.tensor([0, 1, 2, 3, 40]))  # grows the cache on demand
    assert rope.tables(3, x.device, torch.float32)[0].shape[0] >= 41


@pytest.mark.parametrize("n_kv", [4, 2])
def test_one_token_attention_equals_sdpa_over_a_masked_cache(n_kv: int) -> None:
    """The compiled decode step's one-query attention (product-sums) equals SDPA with the cache mask,
    GQA included, rows at different lengths (unwritten slots masked)."""
    torch.manual_seed(3)
    a = Attention(32, 4, n_kv)
    b, length, dh = 3, 9, 8
    q = torch.randn(b, 4, 1, dh)
    k, v = torch.randn(b, n_kv, length, dh), torch.randn(b, n_kv, length, dh)
    slots = torch.tensor([[0], [4], [8]])  # each row's new token sits at its own length
    mask = torch.arange(length)[None, None, None, :] <= slots[:, None, :, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, a._repeat_kv(k), a._repeat_kv(v), attn_mask=mask)
    torch.testing.assert_close(a._one_token(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
    k[0, :, 1:] = 1e4  # what row 0 must not see: its masked slots
    torch.testing.assert_close(a._one_token(q, k, v, mask)[0], want[0], rtol=1e-5, atol=1e-6)
