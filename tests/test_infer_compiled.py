"""``Engine(compile=...)``: the torch.compile'd decode step gives eager's greedy tokens, compiles one graph
per batch size (none per step), and falls back to eager with one warning when inductor cannot compile."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec
from engramlm.infer import Engine, SamplingParams
from engramlm.infer.compiled import cxx_compiler
from engramlm.infer.tables import model_tables
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.model import EngramLM
from helpers import tiny_lm

V = 64
PROMPTS = [[5, 9, 3, 3, 17, 40, 2], [11, 4], [7, 7, 8, 1, 30, 29, 28, 60, 12, 13, 14], [50]]
GREEDY = SamplingParams(max_new_tokens=10)

pytestmark = pytest.mark.usefixtures("one_thread")


def build(*, hidden: int = 32, moe: bool = False) -> EngramLM:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(101, 103), layer_ids=(0, 2))
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=hidden,
        num_layers=3,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        hc_mult=2,
        max_seq_len=64,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=16, n_dense_layers=1) if moe else None,
        engram=EngramConfig(hash=spec, head_dim=8),
    )
    model = tiny_lm(cfg, 0, random_conv=True).eval()
    with torch.no_grad():
        for blk in model.engram_layers.values():
            blk.embed.weight.mul_(3.0)  # make the rows matter for the argmax
    return model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


needs_cxx = pytest.mark.skipif(cxx_compiler() is None, reason="inductor needs a C++ compiler (none on this host)")


@needs_cxx
@pytest.mark.slow
def test_compiled_greedy_equals_eager_one_graph_per_batch_size() -> None:
    model = build()
    with Engine(model) as eager:
        want = eager.generate(PROMPTS, GREEDY).tokens
        want_one = eager.generate(PROMPTS[:1], GREEDY).tokens
    with Engine(model, compile=True) as eng:
        before = graphs()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: it really compiled
            got = eng.generate(PROMPTS, GREEDY)
        assert eng.compiled.error is None
        assert got.tokens == want  # right-padded prefill (eager), then 9 compiled one-token steps
        assert eng.compiled.calls == GREEDY.max_new_tokens - 1
        assert graphs() - before == 1  # one graph for all 9 steps: nothing recompiled per step
        assert eng.compiled.compile_seconds > 0
        again = graphs()
        assert eng.generate(PROMPTS, GREEDY).tokens == want
        assert graphs() == again  # a second batch of the same size reuses the graph
        assert eng.generate(PROMPTS[:1], GREEDY).tokens == want_one  # batch 1: its own graph, same tokens
        assert graphs() - again == 1
        assert eng.compiled.calls == 3 * (GREEDY.max_new_tokens - 1)


@needs_cxx
@pytest.mark.slow
def test_two_engines_keep_their_graphs_apart() -> None:
    """Each engine's graphs sit on its own code object, so one engine's steps never evaluate the other
    model's guards first; interleaved, both still give eager's tokens and nothing recompiles."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries

    models = [build(), build(hidden=48)]
    want = []
    for m in models:
        with Engine(m) as eager:
            want.append(eager.generate(PROMPTS, GREEDY).tokens)
    engines = [Engine(m, compile=True) for m in models]
    try:
        assert engines[0].compiled.code is not engines[1].compiled.code
        for _ in range(2):  # interleaved, as the benchmark runs them
            for eng, w in zip(engines, want, strict=True):
                assert eng.generate(PROMPTS, GREEDY).tokens == w
        assert [len(entries(e.compiled.code)) for e in engines] == [1, 1]  # each: its own one graph
    finally:
        for e in engines:
            e.close()


@needs_cxx
@pytest.mark.slow
def test_changed_weights_are_noticed_once_per_batch_and_recompiled() -> None:
    """The graphs carry no per-step guards on the model's own tensors; the engine checks them once per
    batch instead. A replaced weight (same layout, other values) and a model moved to float64 are both
    noticed before the next batch, the graphs are dropped and rebuilt, and the tokens are eager's."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as entries

    model = build()
    with Engine(model) as eager:
        want = eager.generate(PROMPTS, GREEDY).tokens
    with Engine(model, compile=True) as eng:
        assert eng.generate(PROMPTS, GREEDY).tokens == want
        assert eng.compiled.resets == 0 and len(entries(eng.compiled.code)) == 1
        before = graphs()
        assert eng.generate(PROMPTS, GREEDY).tokens == want
        assert eng.compiled.resets == 0 and graphs() == before  # unchanged model: same graph, no check fails

        blk = model.layers[1]  # replace one weight by another tensor of the same layout, other values
        old = blk.attn.q_proj.weight
        blk.attn.q_proj.weight = torch.nn.Parameter(old.detach().flip(0).clone(), requires_grad=old.requires_grad)
        with Engine(model) as eager:
            want_new = eager.generate(PROMPTS, GREEDY).tokens
        assert want_new != want  # the change matters for the argmax
        assert eng.generate(PROMPTS, GREEDY).tokens == want_new
        assert eng.compiled.resets == 1 and len(entries(eng.compiled.code)) == 1  # a fresh code object

        # the final norm's weight, same values, as a strided view: only its strides differ, which no input
        # of the step shows; a graph that read it with the old strides would compute garbage
        w = model.norm.weight
        wide = torch.zeros(w.shape[0], 2, dtype=w.dtype)
        wide[:, 0] = w.detach()
        model.norm.weight = torch.nn.Parameter(wide[:, 0], requires_grad=w.requires_grad)
        assert model.norm.weight.stride() == (2,)
        assert eng.generate(PROMPTS, GREEDY).tokens == want_new
        assert eng.compiled.resets == 2

        model.to(torch.float64)  # same tensors (``param.data`` swapped in place), another dtype
        with Engine(model) as eager:
            want64 = eager.generate(PROMPTS, GREEDY).tokens
        calls = eng.compiled.calls
        assert eng.generate(PROMPTS, GREEDY).tokens == want64
        assert eng.compiled.resets == 3 and eng.compiled.error is None
        assert eng.compiled.calls - calls == GREEDY.max_new_tokens - 1  # compiled again, not fallen back


@needs_cxx
@pytest.mark.slow
def test_compiled_with_moe_layers_and_a_table_tier_equals_eager() -> None:
    """MoE layers run eagerly between graphs; rows from a prefetcher are taken before the compiled step."""
    model = build(moe=True)
    with Engine(model) as eager:
        want = eager.generate(PROMPTS, GREEDY).tokens
    with Engine(model, model_tables(model), compile=True) as eng:
        got = eng.generate(PROMPTS, GREEDY)
        assert eng.compiled.error is None and eng.compiled.calls == GREEDY.max_new_tokens - 1
    assert got.tokens == want
    assert set(got.stats.wait_seconds) == {0, 2}


def test_no_compiler_warns_once_and_decodes_eagerly() -> None:
    model = build()
    with Engine(model) as eager:
        want = eager.generate(PROMPTS, GREEDY).tokens
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/engramlm-c++",)}):
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as caught:
            eng = Engine(model, compile=True)
            got = eng.generate(PROMPTS, GREEDY).tokens
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert got == want and eng.compiled.calls == 0


@needs_cxx
@pytest.mark.slow
def test_compile_error_rolls_back_the_step_and_decodes_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that exists but fails (``false``): the first compiled step raises inside inductor, the
    engine warns once, restores the KV lengths and conv history, and the step re-runs eagerly."""
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` binary to stand in for a broken compiler")
    model = build(hidden=40)  # a shape no other test compiled, so no cached kernel hides the failure
    with Engine(model) as eager:
        want = eager.generate(PROMPTS, GREEDY).tokens
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    patch = {"cpp.cxx": (false,), "fx_graph_cache": False}
    with torch._inductor.config.patch(patch), pytest.warns(RuntimeWarning, match="decoding eagerly") as caught:
        eng = Engine(model, compile=True)
        got = eng.generate(PROMPTS, GREEDY).tokens
    torch._dynamo.reset()
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "InvalidCxxCompiler" in eng.compiled.error and eng.compiled.calls == 0
    assert got == want


def test_compile_value_is_checked() -> None:
    with pytest.raises(ConfigError, match="compile: must be True or False"):
        Engine(build(), compile="max-autotune")  # type: ignore[arg-type]
