"""Hashing fidelity (spec §4, golden facts GF-8, GF-9, GF-10, GF-13)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engramlm.errors import ConfigError, HashSpecMismatch
from engramlm.hashing.batch import NgramHasher
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.multipliers import half_bound, layer_multipliers
from engramlm.hashing.primes import is_prime, prime_plan
from engramlm.hashing.reference import reference_row_ids
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.hashing.streaming import StreamingHasher
from engramlm.models.presets import get_preset
from hash_oracle import oracle_row_ids

BACKENDS = ["kernel", "torch"]


# ---------------------------------------------------------------- multipliers (GF-8, §4.1)
def test_half_bound_golden() -> None:
    assert half_bound(98_627) == 46_758_859_322_775
    assert half_bound(99_092) == 46_539_438_283_891
    assert half_bound(2**63 - 1) == 1  # the max(1, ...) floor


@pytest.mark.parametrize("vocab,n,layer", [(98_627, 3, 1), (99_092, 4, 14), (8192, 3, 0)])
def test_multipliers_recomputed_with_numpy(vocab: int, n: int, layer: int) -> None:
    hb = ((2**63 - 1) // vocab) // 2
    rng = np.random.default_rng(0 + 10007 * layer)
    expected = rng.integers(0, hb, size=n, dtype=np.int64) * 2 + 1
    got = layer_multipliers(vocab, n, layer, seed=0)
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    assert np.all(got % 2 == 1) and np.all(got >= 1) and np.all(got <= 2 * hb - 1)
    # the largest product stays below 2^63: no int64 overflow (spec §4.1)
    assert all(int(m) * (vocab - 1) < 2**63 for m in got)


def test_layers_and_seeds_get_different_multipliers() -> None:
    a = layer_multipliers(98_627, 3, 1)
    assert not np.array_equal(a, layer_multipliers(98_627, 3, 15))
    assert not np.array_equal(a, layer_multipliers(98_627, 3, 1, seed=1))
    assert not np.array_equal(a, layer_multipliers(98_628, 3, 1))  # V' changes every multiplier


def test_stored_multipliers_that_differ_are_refused() -> None:
    spec = HashSpec(layer_ids=(1,), engram_vocab_size=(5000, 5000))
    cmap = CompressionMap.identity(1000)
    good = make_layout(spec, cmap)
    make_layout(spec, cmap, good.multipliers)  # identical: accepted
    bad = good.multipliers.copy()
    bad[0, 1] += 2
    with pytest.raises(HashSpecMismatch, match="recomputes"):
        make_layout(spec, cmap, bad)


# ---------------------------------------------------------------- primes (GF-9, §4.4)
def test_is_prime_matches_sympy() -> None:
    rng = np.random.default_rng(0)
    for n in list(range(0, 3000)) + rng.integers(10**6, 10**12, size=300).tolist():
        assert is_prime(int(n)) == sympy.isprime(int(n)), n
    # a Mersenne prime, and the strong pseudoprimes to bases 2..23 and to bases 2..37
    for n in (2**61 - 1, 3_825_123_056_546_413_051, 318_665_857_834_031_151_167_461):
        assert is_prime(n) == sympy.isprime(n)
    with pytest.raises(ValueError, match="exact only below"):
        is_prime(3_317_044_064_679_887_385_961_981)


def test_toy_prime_plans() -> None:
    assert prime_plan([0], [100, 100], 3) == (((101, 103, 107), (109, 113, 127)),)
    assert prime_plan([0], [100, 90], 3) == (((101, 103, 107), (97, 109, 113)),)


def test_demo_prime_plan() -> None:
    plan = prime_plan([1, 15], [646_400, 646_400], 8)
    assert plan[0][0] == (646_403, 646_411, 646_421, 646_423, 646_433, 646_453, 646_519, 646_523)
    assert plan[0][1] == (646_537, 646_543, 646_549, 646_571, 646_573, 646_577, 646_609, 646_619)
    assert plan[1][0] == (646_631, 646_637, 646_643, 646_669, 646_687, 646_721, 646_757, 646_771)
    assert plan[1][1] == (646_781, 646_823, 646_831, 646_837, 646_843, 646_859, 646_873, 646_879)
    assert [sum(sum(o) for o in layer) for layer in plan] == [10_344_164, 10_348_242]


@pytest.mark.parametrize(
    "bases,rows,first,last",
    [
        ((16_000_000,) * 3, [384_006_168, 384_016_682], 16_000_057, 16_000_889),
        ((2_262_400,) * 2, [36_199_972, 36_204_260], 2_262_409, 2_262_859),
        ((7_239_680,) * 2, [115_837_464, 115_841_428], None, None),
    ],
)
def test_paper_and_v41_prime_plans(bases, rows, first, last) -> None:
    plan = np.asarray(prime_plan([1, 14], bases, 8))
    assert plan.reshape(2, -1).sum(1).tolist() == rows
    flat = plan.ravel().tolist()
    assert len(set(flat)) == len(flat) and all(is_prime(p) for p in flat)
    if first is not None:
        assert flat[0] == first and flat[-1] == last


def test_unsorted_layer_ids_refused() -> None:
    with pytest.raises(ValueError, match="sorted"):
        prime_plan([15, 1], [100, 100], 2)
    with pytest.raises(ConfigError, match="layer_ids"):
        HashSpec(layer_ids=(1, 1))


def test_v41_sizes_gf10() -> None:
    cfg = get_preset("deepseek-v4.1").engram
    plan = np.asarray(prime_plan(cfg.hash.layer_ids, cfg.hash.engram_vocab_size, 8), dtype=np.int64)
    rows = int(plan.sum())
    assert rows == 768_022_850
    assert rows * cfg.head_dim == 196_613_849_600
    assert rows * (256 + 8) == 202_758_032_400  # 264-byte fp8 rows: 188.83 GiB
    assert round(rows * 264 / 2**30, 2) == 188.83
    assert cfg.hash.heads_per_layer == 24 and 24 * 264 * 2 == 12_672


# ---------------------------------------------------------------- batch hasher vs oracle
def _layout(mode: str = "none", n: int = 3, k: int = 3, vocab: int = 400, row_dtype: str = "int64"):
    spec = HashSpec(
        max_ngram_size=n,
        n_head_per_ngram=k,
        engram_vocab_size=tuple(3000 + 500 * i for i in range(n - 1)),
        layer_ids=(1, 4),
        boundary_mode=mode,
        row_id_dtype=row_dtype,
    )
    lookup = np.arange(vocab) // 2  # a surjective, canonical map: pairs of ids merge
    lookup[0] = 0
    cmap = CompressionMap(lookup, int(lookup.max()) + 1, None, "test-pairs", {})
    return make_layout(spec, cmap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["none", "reset"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_batch_hasher_equals_scalar_oracle(backend: str, mode: str, n: int) -> None:
    layout = _layout(mode, n)
    rng = np.random.default_rng(n)
    ids = torch.from_numpy(rng.integers(0, 400, size=(3, 37)))
    doc = torch.from_numpy(rng.random((3, 37)) < 0.15)
    dead = torch.from_numpy(rng.random((3, 37)) < 0.08)
    out = NgramHasher(layout, backend=backend)(ids, doc, dead)
    assert out.shape == (2, 3, 37, (n - 1) * 3) and out.dtype == torch.int64
    for b in range(3):
        expect = oracle_row_ids(
            ids[b].tolist(),
            layout.compression.lookup,
            layout.multipliers,
            layout.primes,
            2,
            doc[b].tolist(),
            dead[b].tolist(),
            reset=(mode == "reset"),
        )
        assert out[:, b].tolist() == expect


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_hasher_equals_numpy_reference_on_real_tokenizer(backend: str, dsv3_cmap: CompressionMap) -> None:
    spec = get_preset("demo").engram.hash
    layout = make_layout(spec, dsv3_cmap)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, dsv3_cmap.vocab_size, size=(4, 500)))
    ids[:, ::11] = 128_814  # the largest raw id: biggest products, no overflow
    x = dsv3_cmap.lookup[ids.numpy()]
    ref = reference_row_ids(x, layout.multipliers, layout.primes, layout.offsets, layout.compressed_pad_id)
    got = NgramHasher(layout, backend=backend)(ids)
    assert np.array_equal(got.numpy(), ref)


def test_v41_golden_ids(dsv4_cmap: CompressionMap, dsv4_tokenizer_path) -> None:
    """Pins V4.1 ids of a fixed text (regression guard) and checks int32, ranges and shapes."""
    from tokenizers import Tokenizer

    cfg = get_preset("deepseek-v4.1").engram
    layout = make_layout(cfg.hash, dsv4_cmap)
    text = "Alexander the Great crossed the Milky Way. By the way, Diana, Princess of Wales."
    ids = Tokenizer.from_file(str(dsv4_tokenizer_path)).encode(text, add_special_tokens=False).ids
    rows = NgramHasher(layout)(torch.tensor([ids]))
    assert rows.dtype == torch.int32 and rows.shape == (2, 1, len(ids), 24)
    x = dsv4_cmap.lookup[np.asarray([ids])]
    ref = reference_row_ids(x, layout.multipliers, layout.primes, layout.offsets, layout.compressed_pad_id)
    assert np.array_equal(rows.numpy().astype(np.int64), ref)
    off = layout.offsets.reshape(2, 1, 1, 24)
    size = layout.primes.reshape(2, 1, 1, 24)
    assert ((rows.numpy() >= off) & (rows.numpy() < off + size)).all()  # GF-13 ranges
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    assert digest == V41_GOLDEN_DIGEST, digest


V41_GOLDEN_DIGEST = "9b70808163ce93d82b3880ef70df5251336f4d5e09f3c7f339f0923ec26454d2"


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_mode_pads_before_sequence_start(backend: str) -> None:
    layout = _layout("none", 4)
    ids = torch.tensor([[7, 9, 11, 13, 15]])
    pad = layout.compressed_pad_id
    padded = torch.tensor([[2, 2, 2, 7, 9, 11, 13, 15]])  # raw pad 2 -> pad' ; explicit pads agree
    assert layout.compression.lookup[2] == pad
    a = NgramHasher(layout, backend=backend)(ids)
    b = NgramHasher(layout, backend=backend)(padded)[:, :, 3:]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_mode_document_alone_equals_packed(backend: str) -> None:
    layout = _layout("reset", 3)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, 400, 17), rng.integers(0, 400, 23)
    packed = torch.from_numpy(np.concatenate([doc_a, doc_b]))[None]
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, 0] = starts[0, 17] = True
    hasher = NgramHasher(layout, backend=backend)
    alone = hasher(torch.from_numpy(doc_b)[None])
    assert torch.equal(hasher(packed, starts)[:, :, 17:], alone)
    # in "none" mode doc starts are ignored, so the packed ids differ
    none = NgramHasher(_layout("none", 3), backend=backend)
    assert not torch.equal(none(packed, starts)[:, :, 17:], none(torch.from_numpy(doc_b)[None]))


def test_int32_row_ids_and_head_local() -> None:
    layout = _layout("none", 3, row_dtype="int32")
    ids = torch.randint(0, 400, (2, 9))
    rows = NgramHasher(layout)(ids)
    local = NgramHasher(layout)(ids, head_local=True)
    assert rows.dtype == torch.int32
    assert torch.equal(
        rows - local, torch.from_numpy(layout.offsets.reshape(2, 1, 1, -1)).to(torch.int32).expand_as(rows)
    )
    assert (local >= 0).all() and (local < torch.from_numpy(layout.primes.reshape(2, 1, 1, -1))).all()


def test_out_of_range_ids_raise() -> None:
    hasher = NgramHasher(_layout())
    with pytest.raises(IndexError, match=r"\[0, 400\)"):
        hasher(torch.tensor([[1, 400]]))
    with pytest.raises(IndexError):
        hasher(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        hasher(torch.tensor([1, 2]))


def test_expected_compressed_vocab_is_enforced() -> None:
    spec = HashSpec(engram_vocab_size=(5000, 5000), layer_ids=(1,), expected_compressed_vocab_size=99_092)
    with pytest.raises(ConfigError, match="expected_compressed_vocab_size"):
        make_layout(spec, CompressionMap.identity(1000))


def test_fingerprint_covers_mapping_not_window_options() -> None:
    base = _layout("none")
    assert _layout("reset").fingerprint == base.fingerprint  # boundary mode: not part of the mapping
    other = make_layout(base.spec.replace(seed=5), base.compression)
    assert other.fingerprint != base.fingerprint
    with pytest.raises(HashSpecMismatch):
        base.check_fingerprint(other.fingerprint)


# ---------------------------------------------------------------- streaming == batch (GF-13)
@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 4),
    mode=st.sampled_from(["none", "reset"]),
    length=st.integers(1, 30),
)
def test_streaming_equals_batch(data, n: int, mode: str, length: int) -> None:
    layout = _layout(mode, n)
    ids = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, 399), min_size=length, max_size=length), min_size=2, max_size=2))
    )
    doc = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=2, max_size=2))
    )
    dead = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=2, max_size=2))
    )
    batch = NgramHasher(layout, backend="torch")(ids, doc, dead)
    stream = StreamingHasher(layout, batch_size=2)
    steps = torch.stack([stream.step(ids[:, t], doc[:, t], dead[:, t]) for t in range(length)], dim=2)
    assert torch.equal(steps, batch)
    # the state is derivable from history alone (rollback / fork / prefix-cache hit)
    cut = data.draw(st.integers(0, length))
    resumed = StreamingHasher(layout, batch_size=2)
    resumed.load_history(
        [ids[b, :cut] for b in range(2)], [doc[b, :cut] for b in range(2)], [dead[b, :cut] for b in range(2)]
    )
    rest = [resumed.step(ids[:, t], doc[:, t], dead[:, t]) for t in range(cut, length)]
    if rest:
        assert torch.equal(torch.stack(rest, dim=2), batch[:, :, cut:])


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 4),
    mode=st.sampled_from(["none", "reset"]),
    length=st.integers(1, 20),
    row_dtype=st.sampled_from(["int64", "int32"]),
)
def test_streaming_host_steps_equal_batch(data, n: int, mode: str, length: int, row_dtype: str) -> None:
    """Steps without resets take the host (NumPy) path; mixed with masked steps, the ids stay the batch's."""
    layout = _layout(mode, n, row_dtype=row_dtype)
    ids = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(0, 399), min_size=length, max_size=length), min_size=3, max_size=3))
    )
    masked = data.draw(st.lists(st.booleans(), min_size=length, max_size=length))  # per step: masks given or None
    doc = torch.zeros_like(ids, dtype=torch.bool)
    dead = torch.zeros_like(ids, dtype=torch.bool)
    for t in range(length):
        if masked[t]:
            doc[:, t] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=3, max_size=3)))
            dead[:, t] = torch.tensor(data.draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    batch = NgramHasher(layout, backend="torch")(ids, doc, dead)
    stream = StreamingHasher(layout, batch_size=3)
    steps = [
        stream.step(ids[:, t], doc[:, t], dead[:, t]) if masked[t] else stream.step(ids[:, t]) for t in range(length)
    ]
    assert all(s.dtype == batch.dtype for s in steps)
    assert torch.equal(torch.stack(steps, dim=2), batch)


def test_hashing_never_in_python_per_token_loop_on_large_input() -> None:
    """A 8 x 4096 batch for two layers hashes fast (the kernel path); guards against regressions."""
    import time

    layout = _layout("none", 3, vocab=400)
    hasher = NgramHasher(layout)
    ids = torch.randint(0, 400, (8, 4096))
    hasher(ids)  # compile / warm up
    t0 = time.perf_counter()
    hasher(ids)
    assert time.perf_counter() - t0 < 0.5


# ---------------------------------------------------------------- the kernel's division-free modulo
KERNEL_PRIMES = [3, 5, 7, 2_262_409, 16_000_057, 536_870_923, 1_073_741_783, 1_073_741_789]  # last: max < 2^30


def test_modulo_constants_round_inverse_down() -> None:
    """inv must be the largest double <= 1/p: the one-sided quotient estimate depends on it."""
    from fractions import Fraction

    from engramlm.hashing._kernels import modulo_constants

    rng = np.random.default_rng(5)
    primes = KERNEL_PRIMES + [int(sympy.prevprime(int(v))) for v in rng.integers(10, 2**30, size=200)]
    cf = modulo_constants(np.asarray(primes))
    for p, (pf, inv, m42) in zip(primes, cf.tolist(), strict=True):
        assert pf == p and m42 == (1 << 42) % p
        assert Fraction(inv) <= Fraction(1, p) < Fraction(np.nextafter(inv, 1.0))
    with pytest.raises(ValueError, match="2\\^30"):
        modulo_constants(np.asarray([2, 5]))
    with pytest.raises(ValueError, match="2\\^30"):
        modulo_constants(np.asarray([1 << 30]))


def _edge_mixes(p: int) -> list[int]:
    top = 2**63 - 1
    q_top = top // p
    return [0, 1, p - 1, p, p + 1, 2 * p - 1, 2 * p, top, top - 1, q_top * p, q_top * p - 1, (q_top - 1) * p + p - 1,
            2**42 - 1, 2**42, 2**21 - 1, 2**21, 2**63 - 2**42, (2**21 - 1) << 42 | (2**21 - 1) << 21]  # fmt: skip


def test_exact_mod_at_edges() -> None:
    from engramlm.hashing._kernels import exact_mod

    mixes, primes = [], []
    for p in KERNEL_PRIMES:
        for m in _edge_mixes(p):
            if 0 <= m < 2**63:
                mixes.append(m)
                primes.append(p)
    got = exact_mod(np.asarray(mixes, dtype=np.int64), np.asarray(primes))
    assert got.tolist() == [m % p for m, p in zip(mixes, primes, strict=True)]
    with pytest.raises(ValueError, match="non-negative"):
        exact_mod(np.asarray([-1]), np.asarray([7]))


@settings(max_examples=60, deadline=None)
@given(
    p=st.one_of(st.sampled_from(KERNEL_PRIMES), st.integers(3, 2**30 - 1).map(lambda v: int(sympy.prevprime(v + 1)))),
    mixes=st.lists(
        st.one_of(
            st.integers(0, 2**63 - 1),
            st.integers(2**63 - 2**40, 2**63 - 1),  # near the top: largest limbs
            st.integers(0, 2**53),  # around the double mantissa
        ),
        min_size=1,
        max_size=64,
    ),
    k=st.integers(0, 2**33),
)
def test_exact_mod_property(p: int, mixes: list[int], k: int) -> None:
    """Random mixes, plus multiples of p and their neighbours (where a quotient off by one shows)."""
    from engramlm.hashing._kernels import exact_mod

    mult = [v for j in (-1, 0, 1) if 0 <= (v := (k % (2**63 // p)) * p + j) < 2**63]
    vals = mixes + mult
    got = exact_mod(np.asarray(vals, dtype=np.int64), np.full(len(vals), p))
    assert got.tolist() == [v % p for v in vals]


# Columns per layer (orders x heads): 4 and 12 take the scalar transpose, 8 and 24 the 8 x 8 tiles.
@pytest.mark.parametrize(
    "n,k,row_dtype", [(2, 4, "int64"), (3, 4, "int32"), (3, 4, "int64"), (4, 4, "int64"), (4, 8, "int32")]
)
def test_kernel_equals_torch_across_chunks_and_blocks(n: int, k: int, row_dtype: str) -> None:
    """Long rows cross the kernel's work-item (CHUNK) and block (BLOCK) edges; windows must carry over."""
    from engramlm.hashing import _kernels

    for mode in ("none", "reset"):
        layout = _layout(mode, n, k=k, row_dtype=row_dtype)
        rng = np.random.default_rng(n)
        t = 2 * _kernels.CHUNK + _kernels.BLOCK // 2 + 3
        ids = torch.from_numpy(rng.integers(0, 400, size=(8, t)))  # >= 2 * MIN_TOKENS_PER_THREAD: 2 threads run
        doc = torch.from_numpy(rng.random((8, t)) < 0.004)
        dead = torch.from_numpy(rng.random((8, t)) < 0.002)
        doc[1, _kernels.CHUNK] = True  # a boundary exactly at a chunk start, and a DEAD just before one
        dead[2, 2 * _kernels.CHUNK - 1] = True
        # window starts just before a chunk, still inside the next chunk's first lookbacks
        doc[3, _kernels.CHUNK - 1] = doc[5, 2 * _kernels.CHUNK - 2] = True
        dead[4, _kernels.CHUNK - 3] = True
        doc[3:6, _kernels.CHUNK - 1 :][:, 1:8] = False
        dead[3:6, _kernels.CHUNK - 3 :][:, 1:8] = False
        dead[0, :] = False  # row 0: a window from the start with no DEAD token at all
        torch_h = NgramHasher(layout, backend="torch")
        for threads, streaming_bytes in ((1, 0), (2, 1 << 62)):  # non-temporal tile stores on / off
            kern = NgramHasher(layout, backend="kernel", threads=threads)
            kern.STREAMING_BYTES = streaming_bytes
            for args in ((ids,), (ids, doc, dead), (ids, None, dead)):
                assert torch.equal(kern(*args), torch_h(*args))
            assert torch.equal(kern(ids.to(torch.int32)), torch_h(ids))  # int32 ids: no conversion copy


def test_kernel_reports_out_of_range_in_a_late_chunk() -> None:
    from engramlm.hashing import _kernels

    hasher = NgramHasher(_layout(), backend="kernel")
    ids = torch.randint(0, 400, (2, _kernels.CHUNK * 2 + 5))
    ids[1, -1] = 400
    with pytest.raises(IndexError, match=r"max=400; valid range is \[0, 400\)"):
        hasher(ids)
    with pytest.raises(TypeError, match="integers"):
        hasher(ids.float())
    with pytest.raises(ConfigError, match="threads"):
        NgramHasher(_layout(), threads=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_leaves_torch_thread_count_alone(threads: int) -> None:
    """The kernel's worker threads are its own: callers (trainer, decode, benchmarks) rely on torch's
    intra-op setting surviving a hash call (an OpenMP kernel used to reset it)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ids = torch.randint(0, 400, (4, 9000), generator=torch.Generator().manual_seed(0))
        NgramHasher(_layout(), backend="kernel", threads=threads)(ids)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_kernel_hashing_leaves_torch_thread_count_alone() -> None:
    """The default thread count must not launch Numba's OpenMP layer, which resets torch's intra-op threads
    (torch.set_num_threads(1) silently became 2 and parallel training jobs oversubscribed the cores).
    A fresh interpreter: the reset happens once per process."""
    import subprocess
    import sys

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "assert torch.get_num_threads() == 1  # torch's pool is up, as in training (ops ran before hashing)\n"
        "from engramlm.hashing.batch import NgramHasher\n"
        "from engramlm.hashing.compression import CompressionMap\n"
        "from engramlm.hashing.spec import HashSpec, make_layout\n"
        "spec = HashSpec(max_ngram_size=3, n_head_per_ngram=4, engram_vocab_size=(1000, 1000), layer_ids=(1,))\n"
        "h = NgramHasher(make_layout(spec, CompressionMap.identity(512)))\n"
        "h(torch.randint(0, 512, (4, 9000)))\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "1"


def test_layout_answers_by_layer_id() -> None:
    spec = HashSpec(layer_ids=(1, 3), engram_vocab_size=(50, 60), n_head_per_ngram=2)
    layout = make_layout(spec, CompressionMap.identity(40))
    for i, lid in enumerate(layout.layer_ids):
        assert layout.rows_of(lid) == int(layout.table_rows[i]) == sum(layout.head_sizes(lid))
        assert layout.head_sizes(lid) == layout.primes[i].reshape(-1).tolist()
    stacked = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    parts = layout.split(stacked)
    assert list(parts) == [1, 3] and torch.equal(parts[3], stacked[1])
    assert list(layout.split(stacked, [3])) == [3]
    with pytest.raises(ConfigError, match="layer_id: 2 is not an Engram layer"):
        layout.rows_of(2)
    with pytest.raises(ValueError, match="leading dim"):
        layout.split(stacked[:1])
