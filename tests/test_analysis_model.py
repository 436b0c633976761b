"""Analysis instruments on a real prepared corpus and a small saved model: knockout, gates, fired, lens, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.analysis.classes import FREQ_BUCKETS, KINDS, TokenClasses, freq_bucket_table
from engramlm.analysis.common import (
    encode_text,
    eval_pass,
    mode_baseline,
    mode_capacity1,
    mode_no_engram,
    mode_skip_layers,
    token_texts,
)
from engramlm.analysis.fired import PAD_SHOWN, fired_rows
from engramlm.analysis.gates import compute_gates, gate_report, render_html
from engramlm.analysis.knockout import share_kept, summarise, unigram_nll
from engramlm.analysis.lens import (
    alignment_index,
    cka_matrix,
    collect_states,
    hsic1,
    linear_cka,
    logit_lens,
    recurring_ngram_ends,
)
from engramlm.cli.main import main
from engramlm.data import TokenDataset, prepare
from engramlm.errors import ConfigError
from engramlm.hashing.spec import HashSpec
from engramlm.models.build import build_model
from engramlm.models.config import EngramConfig, ModelConfig
from engramlm.models.io import save_pretrained
from engramlm.models.locate import load_trained_model, verify_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ENGRAM_LAYERS = (0, 2)


def _config(engram: bool = True) -> ModelConfig:
    spec = HashSpec(
        max_ngram_size=3,
        n_head_per_ngram=2,
        engram_vocab_size=(997, 997),
        layer_ids=ENGRAM_LAYERS,
        boundary_mode="reset",
    )
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=3,
        n_heads=2,
        mlp_hidden=128,
        hc_mult=2,
        hc_dynamic=False,  # static branch mixing: per-token Sinkhorn would dominate test time
        max_seq_len=256,
        engram=EngramConfig(hash=spec, head_dim=16, conv_zero_init=False) if engram else None,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    data = root / "prep"
    prepare("stdlib", data, 400, max_bytes=60_000, progress=False)
    torch.manual_seed(0)
    save_pretrained(build_model(_config(), data / "tokenizer.json"), root / "engram")
    torch.manual_seed(1)
    save_pretrained(build_model(_config(engram=False), data / "tokenizer.json"), root / "plain")
    return {"data": data, "engram": root / "engram", "plain": root / "plain", "root": root}


def test_knockout_modes_touch_only_engram(env: dict[str, Path]) -> None:
    model = load_trained_model(env["engram"]).model
    ds = TokenDataset(env["data"], "val")
    modes = {
        "baseline": mode_baseline,
        "no_engram": mode_no_engram,
        "capacity1": mode_capacity1,
        "skip_non_engram_layer": mode_skip_layers({1}),
        "skip_2": mode_skip_layers({2}),
    }
    full = eval_pass(model, ds, {"baseline": mode_baseline}, batch_size=16, seq_len=128)
    assert full.complete and full.n > 1000
    # a full sweep attributes every byte of the split to exactly one scored target
    assert int(full.target_bytes.sum()) == ds.n_bytes
    assert np.array_equal(np.diff(full.positions) > 0, np.ones(full.n - 1, dtype=bool))
    arr = eval_pass(model, ds, modes, batch_size=4, seq_len=64, max_batches=2)
    assert not arr.complete
    np.testing.assert_allclose(arr.nll["baseline"][:10], full.nll["baseline"][:10], rtol=1e-4)  # same first window
    base = arr.nll["baseline"]
    assert np.array_equal(arr.nll["skip_non_engram_layer"], base)  # layer 1 has no Engram: nothing changes
    for m in ("no_engram", "capacity1", "skip_2"):
        assert np.abs(arr.nll[m] - base).max() > 1e-4, m
    # skipping the Engram of layer 2 leaves the stream before layer 2 bit-identical and changes what follows
    x = torch.from_numpy(np.asarray(ds.tokens[:64], dtype=np.int64))[None]
    with torch.inference_mode():
        a = model.forward_with_hidden_states(x).hidden_states
        b = model.forward_with_hidden_states(x, engram=model.engram_inputs(x, skip_engram={2})).hidden_states
    assert all(torch.equal(a[i], b[i]) for i in range(3))
    assert not torch.allclose(a[3], b[3])


def test_capacity1_is_a_one_row_table(env: dict[str, Path]) -> None:
    model = load_trained_model(env["engram"]).model
    ds = TokenDataset(env["data"], "val")
    arr = eval_pass(model, ds, {"capacity1": mode_capacity1}, batch_size=4, seq_len=64, max_batches=2)
    one_row = load_trained_model(env["engram"]).model
    for blk in one_row.engram_layers.values():
        blk.embed.weight.copy_(blk.embed.weight[0].expand_as(blk.embed.weight))
    ref = eval_pass(one_row, ds, {"baseline": mode_baseline}, batch_size=4, seq_len=64, max_batches=2)
    np.testing.assert_allclose(arr.nll["capacity1"], ref.nll["baseline"], rtol=1e-5, atol=1e-5)


def test_no_engram_model_knockout_is_identity(env: dict[str, Path]) -> None:
    model = load_trained_model(env["plain"]).model
    ds = TokenDataset(env["data"], "val")
    arr = eval_pass(model, ds, {"b": mode_baseline, "n": mode_no_engram}, batch_size=4, seq_len=64, max_batches=2)
    assert np.array_equal(arr.nll["b"], arr.nll["n"])


def test_share_kept_and_summary(env: dict[str, Path]) -> None:
    assert share_kept(5.0, 5.0, 3.0) == 0.0
    assert share_kept(5.0, 3.0, 3.0) == 1.0
    assert share_kept(5.0, 4.0, 3.0) == pytest.approx(0.5)
    assert share_kept(5.0, 6.0, 3.0) == pytest.approx(-0.5)
    assert share_kept(3.0, 4.0, 3.5) is None  # baseline worse than the reference: undefined
    counts = np.array([10, 0, 5])
    nll = unigram_nll(counts, 4)
    np.testing.assert_allclose(np.exp(-nll).sum(), 1.0)
    assert nll[0] < nll[2] < nll[1]

    model = load_trained_model(env["engram"]).model
    ds = TokenDataset(env["data"], "val")
    arr = eval_pass(
        model, ds, {"baseline": mode_baseline, "no_engram": mode_no_engram}, batch_size=4, seq_len=64, max_batches=3
    )
    tok = verify_tokenizer(model, env["data"] / "tokenizer.json")
    train = np.bincount(np.asarray(TokenDataset(env["data"], "train").tokens, dtype=np.int64), minlength=512)
    classes = TokenClasses(token_texts(tok, 512), np.asarray(ds.token_bytes), train)
    rep = summarise(arr, classes, unigram_nll(train, 512), 512)
    overall = rep["overall"]
    assert overall["modes"]["baseline"]["tokens"] == arr.n
    bpb = arr.nll["baseline"].sum() / (math.log(2) * arr.target_bytes.sum())
    assert overall["modes"]["baseline"]["bpb"] == pytest.approx(bpb)
    for family, by in rep["classes"].items():  # each family partitions the targets
        assert sum(r["modes"]["baseline"]["tokens"] for r in by.values()) == arr.n, family
        total = sum(r["modes"]["no_engram"]["loss"] * r["modes"]["no_engram"]["tokens"] for r in by.values())
        assert total == pytest.approx(arr.nll["no_engram"].sum())


def test_token_classes_definitions() -> None:
    texts = ["<|bos|>", " the", "the", "re", "\n    ", "123", "()", ".append", "x"]
    tb = np.array([0, 4, 3, 2, 5, 3, 2, 7, 1])
    tc = TokenClasses(texts, tb, np.array([0, 9, 8, 7, 6, 5, 4, 3, 0]))
    kinds = [KINDS[k] for k in tc.kind]
    assert kinds == ["special", "word", "word", "word", "whitespace", "number", "punct", "mixed", "word"]
    inputs = np.array([2, 1, 5, 6, 4])  # "the" -> "re" continues; " the" -> "the" continues; "123" -> "x" continues
    targets = np.array([3, 2, 8, 8, 1])
    lab = tc.label(inputs, targets)
    pos, names = lab["position"]
    assert [names[p] for p in pos] == ["continuation", "continuation", "continuation", "word_start", "word_start"]
    fb = freq_bucket_table(np.array([5] * 70 + [0, 1]))
    assert FREQ_BUCKETS[fb[0]] == "rank_1-64" and FREQ_BUCKETS[fb[69]] == "rank_65-512"
    assert FREQ_BUCKETS[fb[70]] == "unseen" and FREQ_BUCKETS[fb[71]] == "rank_65-512"


def test_gates_and_html_escaping(env: dict[str, Path]) -> None:
    model = load_trained_model(env["engram"]).model
    tok = verify_tokenizer(model, env["data"] / "tokenizer.json")
    text = 'def f(x):\n    return "<script>alert(1)</script>" & x'
    ids, doc = encode_text(tok, text)
    gates = compute_gates(model, ids, doc)
    assert sorted(gates) == list(ENGRAM_LAYERS)
    with torch.inference_mode():
        ref = model(ids, engram=model.engram_inputs(ids, doc)).gates
    for lid, g in gates.items():
        assert g.shape == (ids.shape[1], 2)
        assert np.array_equal(g, ref[lid][0, :, :, 0].numpy())
        assert (g >= 0).all() and (g <= 1).all()
    texts = token_texts(tok, 512)
    report = gate_report([texts[i] for i in ids[0].tolist()], ids[0].tolist(), gates)
    assert "".join(report["tokens"][1:]) == text  # decoded tokens reassemble the text
    page = render_html(report)
    assert "<script" not in page and "</script" not in page and "&lt;" in page and "&amp;" in page
    assert page.count('class="tok"') == len(ENGRAM_LAYERS) * ids.shape[1]
    with pytest.raises(ConfigError, match="max_seq_len"):
        compute_gates(model, torch.ones(1, 257, dtype=torch.long))


def test_fired_rows(env: dict[str, Path]) -> None:
    model = load_trained_model(env["engram"]).model
    tok = verify_tokenizer(model, env["data"] / "tokenizer.json")
    texts = token_texts(tok, 512)
    ids, doc = encode_text(tok, "import os\nimport sys\n")
    rows = model.hash(ids, doc)
    gates = compute_gates(model, ids, doc)
    for t in (1, ids.shape[1] - 1):
        rep = fired_rows(model, ids, doc, t, texts)
        for li, layer in enumerate(rep["layers"]):
            assert layer["gate"] == pytest.approx(gates[layer["layer"]][t].tolist())
            got = [h["row"] for h in layer["heads"]]
            assert got == rows[li, 0, t].tolist()
            for h in layer["heads"]:
                assert h["row"] == h["row_local"] + h["offset"] and 0 <= h["row_local"] < h["prime"]
                n = h["order"]
                seq = ids[0].tolist()
                want = [texts[seq[p]] if p >= 0 else PAD_SHOWN for p in range(t - n + 1, t + 1)]
                assert h["ngram_tokens"] == want
    first = fired_rows(model, ids, doc, 1, texts)["layers"][0]["heads"]
    assert next(h["ngram_tokens"] for h in first if h["order"] == 3)[0] == PAD_SHOWN
    with pytest.raises(ConfigError, match="position"):
        fired_rows(model, ids, doc, ids.shape[1], texts)


def test_logit_lens_last_layer_is_final(env: dict[str, Path]) -> None:
    model = load_trained_model(env["engram"]).model
    ds = TokenDataset(env["data"], "val")
    rep = logit_lens(model, ds, batch_size=4, seq_len=64, max_batches=3)
    assert len(rep["kl_to_final"]) == 4
    assert rep["kl_to_final"][-1] == pytest.approx(0.0, abs=1e-7)
    assert min(rep["kl_to_final"][:-1]) > 1e-4
    assert rep["top1_agreement"][-1] == 1.0
    arr = eval_pass(model, ds, {"baseline": mode_baseline}, batch_size=4, seq_len=64, max_batches=3)
    assert rep["early_exit_loss"][-1] == pytest.approx(arr.nll["baseline"].mean(), rel=1e-5)


def test_linear_cka_properties(env: dict[str, Path]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    y = torch.randn(200, 20, generator=g, dtype=torch.float64)
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0)  # orthogonal, scale and shift invariant
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(feature_form))
    assert linear_cka(x, y) < 0.5
    model = load_trained_model(env["engram"]).model
    ds = TokenDataset(env["data"], "val")
    states = collect_states(model, ds, max_tokens=200, batch_size=2, seq_len=64)
    assert len(states) == 4 and states[0].shape == (200, 2 * 64)
    mat = cka_matrix(states, states, minibatch=64)
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-9)
    np.testing.assert_allclose(mat, mat.T, atol=1e-9)


def _hsic1_literal(k: np.ndarray, l: np.ndarray) -> float:
    """Spec §9.8 written out term by term with explicit ones vectors (the reference for ``hsic1``)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(kt @ lt)
            + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ kt @ lt @ one)
        )
        / (n * (n - 3))
    )


def test_minibatch_cka_is_the_spec_estimator() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    y = x[:, :8] @ torch.randn(8, 10, generator=g, dtype=torch.float64) + torch.randn(
        300, 10, generator=g, dtype=torch.float64
    )
    k, l = (x[:50] @ x[:50].T), (y[:50] @ y[:50].T)
    assert hsic1(k, l) == pytest.approx(_hsic1_literal(k.numpy(), l.numpy()), rel=1e-10)
    # minibatches of 128: 128 + 128 + 44 samples, each summed into numerator and denominators
    parts = [(x[i : i + 128], y[i : i + 128]) for i in (0, 128, 256)]
    num = sum(_hsic1_literal((a @ a.T).numpy(), (b @ b.T).numpy()) for a, b in parts)
    dx = sum(_hsic1_literal((a @ a.T).numpy(), (a @ a.T).numpy()) for a, _ in parts)
    dy = sum(_hsic1_literal((b @ b.T).numpy(), (b @ b.T).numpy()) for _, b in parts)
    mat = cka_matrix([x, y], [y], minibatch=128)
    assert mat[0, 0] == pytest.approx(num / math.sqrt(dx * dy), rel=1e-9) and mat[1, 0] == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert cka_matrix([x], [2.0 * x @ q + 3.0])[0, 0] == pytest.approx(1.0)  # rotation, scale and shift
    with pytest.raises(ValueError, match="at least 4"):
        hsic1(k[:3, :3], l[:3, :3])


def test_alignment_index_weights_the_most_similar_layers() -> None:
    mat = np.array([[0.9, 0.5, 0.1, 0.0], [0.2, 0.4, 0.8, 0.6], [0.0, 0.1, 0.3, 0.9]])
    assert alignment_index(mat, top_k=1) == [0.0, 2.0, 3.0]
    assert alignment_index(mat, top_k=2) == pytest.approx(
        [(0.9 * 0 + 0.5 * 1) / 1.4, (0.8 * 2 + 0.6 * 3) / 1.4, 3 * 0.9 / 1.2 + 2 * 0.3 / 1.2]
    )
    assert alignment_index(mat, top_k=9) == pytest.approx(alignment_index(mat, top_k=4))  # clipped to the layers


def test_recurring_ngram_ends_match_a_brute_force_count(env: dict[str, Path]) -> None:
    ds = TokenDataset(env["data"], "val")
    tokens = np.asarray(ds.tokens).tolist()
    starts = set(np.asarray(ds.doc_offsets).tolist())
    for n in (1, 3):
        grams = {}
        for end in range(n - 1, len(tokens)):
            if not any(end - b in starts for b in range(n - 1)):
                grams.setdefault(tuple(tokens[end - n + 1 : end + 1]), []).append(end)
        want = sorted(e for ends in grams.values() if len(ends) >= 2 for e in ends)
        got = np.flatnonzero(recurring_ngram_ends(ds, n)).tolist()
        assert got == want and 0 < len(got) < len(tokens)
    model = load_trained_model(env["engram"]).model
    where = recurring_ngram_ends(ds, 3)
    picked = collect_states(model, ds, max_tokens=40, batch_size=2, seq_len=64, positions=where)
    every = collect_states(model, ds, max_tokens=400, batch_size=2, seq_len=64)
    assert picked[0].shape[0] == 40
    # the picked rows are the first scored positions that end a recurring trigram, in order
    scored = [p for p in range(ds.n_tokens - 1) if tokens[p + 1] != ds.bos_id]  # the loader scores these inputs
    first = [i for i, p in enumerate(scored[:400]) if where[p]][:40]
    torch.testing.assert_close(picked[2], every[2][first])
    with pytest.raises(ConfigError, match="no scored position"):
        collect_states(model, ds, max_tokens=40, batch_size=2, seq_len=64, positions=np.zeros_like(where))


def test_cli_writes_json_and_pictures(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = env["root"] / "out"
    ck, data = str(env["engram"]), str(env["data"])
    assert main(["analyze", "gates", ck, "--text", "import os", "--data", data, "--out", str(out)]) == 0
    assert main(["analyze", "fired", ck, "--text", "import os", "--data", data, "--out", str(out)]) == 0
    common = ["--data", data, "--out", str(out), "--no-progress", "--batch-size", "2", "--seq-len", "64"]
    assert main(["analyze", "knockout", ck, *common, "--max-batches", "1"]) == 0
    assert main(["analyze", "rows", ck, *common, "--max-batches", "1", "--max-tokens", "5000"]) == 0
    assert main(["analyze", "logit-lens", ck, str(env["plain"]), *common, "--max-batches", "1"]) == 0
    assert main(["analyze", "cka", ck, str(env["plain"]), *common, "--max-tokens", "64"]) == 0
    capsys.readouterr()
    for name in ("gates", "fired", "knockout", "rows", "logit_lens", "cka"):
        doc = json.loads((out / f"{name}.json").read_text())
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert doc["files"]["json"].endswith(f"{name}.json")
    assert (out / "gates.html").read_text().startswith("<!DOCTYPE html>")
    ko = json.loads((out / "knockout.json").read_text())
    assert set(ko["modes"]) == {"baseline", "no_engram", "capacity1", "no_engram@0", "no_engram@2"}
    assert set(ko["sets"]["prep/val"]["classes"]) == {"kind", "position", "freq"}
    cka = json.loads((out / "cka.json").read_text())
    assert cka["positions"] == "recurring 3-gram ends" and cka["tokens"] == 64
    assert len(cka["alignment_index"]["a"]) == len(cka["layers_a"]) == 4
    with pytest.raises(SystemExit):
        main(["analyze", "cka", ck, str(env["plain"]), *common, "--minibatch", "2"])
    assert "argument --minibatch: must be an integer >= 4, got '2'" in capsys.readouterr().err
    # a tokenizer other than the one the checkpoint was hashed with is refused
    other = env["root"] / "other"
    prepare("stdlib", other, 300, max_bytes=30_000, progress=False)
    assert main(["analyze", "gates", ck, "--text", "x", "--data", str(other), "--out", str(out)]) == 2
    assert "compression map" in capsys.readouterr().err
