"""bench_train_step end to end at a tiny size: every contender trains on the same tokens, the HF Llama has
the dense arm's activated parameters exactly, losses start near ln(vocab), and the README table renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_train_step as bts
from benchmarks import make_tables as mt
from engramlm.data import prepare

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 400
TINY = ["data.batch_size=2", "data.seq_len=32", f"model.overrides.vocab_size={VOCAB}", "model.overrides.hidden_size=64",
        "model.overrides.mlp_hidden=96", "model.overrides.engram.head_dim=8"]  # fmt: skip
WARMUP, REPEATS = 1, 2


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("train_step")
    data = root / "stdlib"
    prepare("stdlib", data, VOCAB, max_bytes=60_000, progress=False)
    bts.main(["--data", str(data), "--warmup", str(WARMUP), "--repeats", str(REPEATS), "--threads", "1",
              "--results-dir", str(root / "results"), "--set", *TINY])  # fmt: skip
    doc = json.loads((root / "results" / "train_step.json").read_text(encoding="utf-8"))
    doc["_dir"] = str(root / "results")
    return doc


def test_every_contender_trains_on_the_same_tokens_from_a_loss_near_ln_vocab(result: dict) -> None:
    (run,) = result["runs"]
    arms = run["arms"]
    assert set(arms) == {*bts.ARMS, "hf llama", "hf qwen2_moe"}
    sums = {n: a["token_checksums"] for n, a in arms.items()}
    assert len(set(map(tuple, sums.values()))) == 1, sums
    assert len(sums["hf llama"]) == WARMUP + REPEATS and len(set(sums["hf llama"])) == WARMUP + REPEATS
    for n, a in arms.items():
        assert all(math.isfinite(x) for x in a["losses"]), n
        assert abs(a["losses"][0] - math.log(VOCAB)) < 0.5, (n, a["losses"][0])  # random init: near uniform
        assert a["step_s"]["n"] == REPEATS and a["step_s"]["median"] > 0
        assert 0 < a["optimizer_share"]["median"] < 1, n
        assert 0 < a["matmul_rate_fraction"] < a["matmul_rate_fraction_with_head"], n


def test_peers_have_the_arms_shapes_and_every_arm_is_paired(result: dict) -> None:
    arms = result["runs"][0]["arms"]
    # same backbone: the Llama's activated parameters (no embedding, no head) equal the dense arm's exactly
    assert arms["hf llama"]["p_act"] == arms["engramlm dense"]["p_act"] == arms["engramlm dense adamw"]["p_act"]
    assert arms["hf llama"]["lm_head_params"] == arms["engramlm dense"]["lm_head_params"] == VOCAB * 64
    # Qwen2-MoE adds a d x 1 shared-expert gate per MoE layer and nothing else
    moe_layers = 4 - result["model"]["moe"]["n_dense_layers"]
    assert arms["hf qwen2_moe"]["p_act"] - arms["engramlm moe"]["p_act"] == 64 * moe_layers
    for n, peer in bts.HF_PEER.items():
        assert arms[n]["hf_peer"] == peer
        ratio = arms[n]["speedup_vs_hf"]
        assert ratio["n"] == REPEATS and ratio["median"] > 0
        assert arms[n]["speedup_vs_hf_without_optimizer"]["median"] > 0


def test_result_renders_a_row_per_contender(result: dict) -> None:
    body = mt.render(mt.load_results(Path(result["_dir"])))["train_step"]
    for n in result["runs"][0]["arms"]:
        assert f"| {n} |" in body
    assert "vs hf llama" in body and "vs hf qwen2_moe" in body and "`stdlib`" in body
    assert body.count("| engramlm") == len(bts.ARMS)
