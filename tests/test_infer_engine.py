"""The generation engine: tiers give the same tokens, batching is invisible, sampling is seeded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engramlm.errors import ConfigError, HashSpecMismatch
from engramlm.hashing.spec import HashSpec
from engramlm.infer import Engine, SamplingParams, filter_logits
from engramlm.infer.tables import drop_model_tables, export_model_tables, model_tables, open_tables
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.model import EngramLM
from engramlm.store.memory import MemoryTable
from helpers import tiny_lm

V = 64
PROMPTS = [[5, 9, 3, 3, 17, 40, 2], [11, 4], [7, 7, 8, 1, 30, 29, 28, 60, 12, 13, 14], [50]]
GREEDY = SamplingParams(max_new_tokens=12)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(seed: int = 0, m: int = 2) -> EngramLM:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(101, 103), layer_ids=(0, 2))
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=3,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        hc_mult=m,
        max_seq_len=64,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=16, n_dense_layers=1),
        engram=EngramConfig(hash=spec, head_dim=8),
    )
    model = tiny_lm(cfg, seed, random_conv=True).eval()
    with torch.no_grad():
        for blk in model.engram_layers.values():
            blk.embed.weight.mul_(3.0)  # make the rows matter for the argmax
    return model


@pytest.fixture(scope="module")
def model() -> EngramLM:
    return build()


@pytest.fixture(scope="module")
def reference(model: EngramLM) -> list[list[int]]:
    with Engine(model) as eng:
        return eng.generate(PROMPTS, GREEDY).tokens


def test_batched_equals_one_by_one(model: EngramLM, reference: list[list[int]]) -> None:
    assert all(len(t) == GREEDY.max_new_tokens for t in reference)
    with Engine(model) as eng:
        for prompt, want in zip(PROMPTS, reference, strict=True):
            assert eng.generate([prompt], GREEDY).tokens == [want]


def test_engram_rows_change_the_output(model: EngramLM, reference: list[list[int]]) -> None:
    other = build()
    with torch.no_grad():
        for blk in other.engram_layers.values():
            blk.embed.weight.normal_(std=3.0)
    with Engine(other) as eng:
        assert eng.generate(PROMPTS, GREEDY).tokens != reference


def test_memory_table_tier_equals_in_model(model: EngramLM, reference: list[list[int]]) -> None:
    with Engine(model, model_tables(model)) as eng:
        out = eng.generate(PROMPTS, GREEDY)
    assert out.tokens == reference
    assert set(out.stats.wait_seconds) == {0, 2}


@pytest.mark.parametrize("tier,cache_bytes", [("memory", 0), ("mmap", 0), ("mmap", 4096), ("direct", 8192)])
def test_store_directory_tiers_equal_in_model(
    tmp_path: Path, reference: list[list[int]], tier: str, cache_bytes: int
) -> None:
    model = build()
    export_model_tables(model, tmp_path / "store")
    freed = drop_model_tables(model)  # the rows must now come from the store
    assert freed == int(model.layout.table_rows.sum()) * 8 * 4
    with pytest.warns(RuntimeWarning) if tier == "direct" and _is_tmpfs(tmp_path) else _nullcontext():
        tables = open_tables(tmp_path / "store", tier, cache_bytes=cache_bytes, fingerprint=model.layout.fingerprint)
    try:
        with Engine(model, tables) as eng:
            assert eng.generate(PROMPTS, GREEDY).tokens == reference
    finally:
        for t in tables.values():
            t.close()


def _is_tmpfs(path: Path) -> bool:
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fs, *_ = line.split()
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, fstype = mnt, fs
    return fstype == "tmpfs"


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_tables_from_another_spec_are_refused(model: EngramLM) -> None:
    weight = model.engram_layers[0].embed.weight.detach()
    with pytest.raises(HashSpecMismatch):
        Engine(model, {0: MemoryTable(weight, "ab" * 32)})
    with pytest.raises(HashSpecMismatch, match="needs"):
        Engine(model, {0: MemoryTable(weight[:10], model.layout.fingerprint)})
    with pytest.raises(ConfigError, match="not an Engram layer"):
        Engine(model, {1: MemoryTable(weight, model.layout.fingerprint)})


def test_stop_tokens_and_streaming(model: EngramLM, reference: list[list[int]]) -> None:
    seq = reference[0]
    k = next(i for i in range(1, len(seq)) if seq[i] not in seq[:i])
    params = SamplingParams(max_new_tokens=12, stop_tokens=(seq[k],))
    steps = []
    with Engine(model) as eng:
        out = eng.generate([PROMPTS[0]], params, on_step=steps.append)
    assert out.tokens == [seq[:k]] and out.finish_reasons == ["stop"]
    assert [int(s.tokens[0]) for s in steps if bool(s.emitted[0])] == seq[:k]
    assert len(steps) == k + 1 and bool(steps[-1].finished[0]) and not bool(steps[-1].emitted[0])
    with Engine(model) as eng:
        full = eng.generate([PROMPTS[0]], GREEDY)
    assert full.finish_reasons == ["length"]
    assert full.stats.new_tokens == 12 and full.stats.decode_tokens == 11 and len(full.stats.step_seconds) == 11


def test_seeded_sampling_is_reproducible(model: EngramLM, reference: list[list[int]]) -> None:
    hot = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
    with Engine(model) as eng:
        a = eng.generate(PROMPTS, hot).tokens
        assert eng.generate(PROMPTS, hot).tokens == a
        others = [
            eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.5, seed=s)).tokens for s in (4, 5)
        ]
        assert any(o != a for o in others)
        assert eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1, seed=9)).tokens == (
            reference
        )


def test_filter_logits_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept.sum(-1).tolist() == [3, 3]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).sum(-1).tolist() == [1, 1]
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]


@pytest.mark.parametrize(
    "kw,field",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p")],
)
def test_bad_sampling_params_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**kw)


def test_forced_tokens_replace_sampling(model: EngramLM, reference: list[list[int]]) -> None:
    forced = torch.tensor([[(7 * i + j) % V for j in range(12)] for i in range(len(PROMPTS))])
    with Engine(model) as eng:
        assert eng.generate(PROMPTS, GREEDY, force=forced).tokens == forced.tolist()
        assert eng.generate(PROMPTS, GREEDY, force=torch.tensor(reference)).tokens == reference
        with pytest.raises(ConfigError, match="force"):
            eng.generate(PROMPTS, GREEDY, force=forced[:, :3])


def test_sampling_stays_inside_the_tokenizer_vocabulary() -> None:
    """A model vocabulary padded past the tokenizer's: generation never samples an id the tokenizer (and so the
    hashing) lacks; without the limit a random model samples them and the next hash step fails."""
    from engramlm.hashing.compression import CompressionMap
    from engramlm.hashing.spec import make_layout

    base = build()
    cfg = base.config
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(cfg.engram.hash, CompressionMap.identity(V // 2))).eval()
    params = SamplingParams(max_new_tokens=24, temperature=2.0, seed=3)
    with Engine(model) as eng:
        assert eng.vocab_size == V // 2
        out = eng.generate([[1, 2, 3], [4, 5]], params).tokens
    assert max(max(t) for t in out) < V // 2 and sum(map(len, out)) == 48
    with pytest.raises(ConfigError, match=r"vocab_size: must lie in \[1, 64\]"):
        Engine(model, vocab_size=V + 1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is Linux-only")
def test_decode_and_io_cpus_confine_their_threads(tmp_path: Path, reference: list[list[int]]) -> None:
    """``decode_cpus`` holds the generating thread while it decodes (its own CPU set back after), ``io_cpus`` the
    tables' I/O threads (a cache's and its direct tier's, started after the Engine was made); tokens unchanged."""
    model = build()
    export_model_tables(model, tmp_path / "store")
    drop_model_tables(model)
    mine = os.sched_getaffinity(0)
    every = set(range(os.cpu_count() or 1)) & mine
    decode, io = {min(every)}, {max(every)}
    tables = open_tables(tmp_path / "store", "direct", cache_bytes=4096, fingerprint=model.layout.fingerprint)
    seen: list[set[int]] = []
    try:
        with Engine(model, tables, io_cpus=io, decode_cpus=decode) as eng:
            gen = eng.generate(PROMPTS, GREEDY, on_step=lambda _: seen.append(os.sched_getaffinity(0)))
            assert gen.tokens == reference
            assert seen and all(s == decode for s in seen) and os.sched_getaffinity(0) == mine
            tids = [tid for t in tables.values() for tid in t.io_thread_ids]
            if not tids and os.environ.get("CI"):  # CI runs on x86-64 Linux with AIO: the tables have I/O threads
                pytest.fail("no I/O thread started")
            assert all(os.sched_getaffinity(tid) == io for tid in tids)
            for t in tables.values():
                t.set_io_cpus(None)
            assert all(os.sched_getaffinity(tid) == every for tid in tids)
    finally:
        for t in tables.values():
            t.close()
    with pytest.raises(ConfigError, match="decode_cpus"):
        Engine(model, decode_cpus=[])
    with pytest.raises(ConfigError, match=r"io_cpus: CPUs \[100000\] do not exist"):
        Engine(model, io_cpus=[100_000])
