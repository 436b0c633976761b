"""Table/memory planner: known preset sizes, bytes = rows x bytes/row, per-step and per-second needs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engramlm.analysis.planner import (
    REFERENCE,
    DistRequest,
    PlanRequest,
    expected_unique_rows,
    fit_zipf_s,
    format_distributed,
    format_plan,
    plan,
    plan_distributed,
    zipf_distinct,
)
from engramlm.cli.main import main
from engramlm.errors import ConfigError
from engramlm.hashing.primes import prime_plan
from engramlm.models.accounting import count_parameters, engram_table_rows
from engramlm.models.presets import get_preset


def test_v41_known_numbers() -> None:
    p = plan(get_preset("deepseek-v4.1"), PlanRequest(dtype="fp8"))
    assert [layer["rows"] for layer in p["layers"]] == [384_006_168, 384_016_682]
    assert [layer["layer"] for layer in p["layers"]] == [1, 14]
    assert p["row_bytes"] == 264  # 256 e4m3 values + 8 ue8m0 scales
    assert p["table_rows"] == 768_022_850
    assert p["table_bytes"] == 768_022_850 * 264
    assert all(layer["bytes"] == layer["rows"] * 264 for layer in p["layers"])
    assert p["per_token"] == {"rows_read": 2 * 3 * 8, "bytes_read": 48 * 264}
    assert plan(get_preset("deepseek-v4.1"), PlanRequest(dtype="bf16"))["row_bytes"] == 512
    assert plan(get_preset("deepseek-v4.1"), PlanRequest(dtype="fp32"))["table_bytes"] == 768_022_850 * 1024


def test_paper27b_rows_are_prime_sums() -> None:
    cfg = get_preset("paper-27b")
    p = plan(cfg, PlanRequest(dtype="bf16", tier="ram"))
    h = cfg.engram.hash
    want = [sum(sum(order) for order in layer) for layer in prime_plan(h.layer_ids, h.engram_vocab_size, 8)]
    assert [layer["rows"] for layer in p["layers"]] == want
    assert p["row_bytes"] == 80 * 2
    assert p["table_bytes"] == sum(want) * 160
    assert p["bytes_per_tier"]["ram"] == p["table_bytes"]
    assert p["bytes_per_tier"]["hbm"] == p["dense_bytes_bf16"] > 0
    assert p["per_token"]["rows_read"] == 2 * 2 * 8


def test_batch_and_throughput_arithmetic() -> None:
    cfg = get_preset("deepseek-v4.1")
    req = PlanRequest(dtype="fp8", tier="ssd", batch=1000, tokens_per_s=20_000, dedup=1.5)
    p = plan(cfg, req)
    b, t = p["per_batch"], p["throughput"]
    assert b["rows_read"] == 1000 * 48
    assert b["unique_rows"] == math.ceil(48_000 / 1.5) == 32_000
    assert b["bytes_read"] == 32_000 * 264
    assert b["bytes_transferred"] == 32_000 * 4096  # one 4 KiB page per 264-byte row on SSD
    assert t["steps_per_s"] == pytest.approx(20.0)
    assert t["iops"] == pytest.approx(32_000 * 20)
    assert t["bytes_per_s"] == pytest.approx(32_000 * 20 * 4096)
    assert t["iops_utilisation"] == pytest.approx(32_000 * 20 / REFERENCE["ssd"]["iops"])
    hbm = plan(cfg, PlanRequest(tier="hbm", batch=1000, tokens_per_s=20_000, dedup=1.5))
    assert hbm["throughput"]["bytes_per_s"] == pytest.approx(32_000 * 20 * 264)
    assert hbm["bytes_per_tier"]["hbm"] == hbm["table_bytes"] + hbm["dense_bytes_bf16"]
    own = plan(cfg, PlanRequest(tier="remote", reference_bytes_per_s=1e9))
    assert own["throughput"]["bandwidth_utilisation"] == pytest.approx(own["throughput"]["bytes_per_s"] / 1e9)
    # unique rows can never exceed the table
    tiny = plan(get_preset("tiny"), PlanRequest(batch=1_000_000))
    assert tiny["per_batch"]["unique_rows"] == tiny["table_rows"]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"tier": "tape"}, "tier"), ({"dtype": "int4"}, "dtype"), ({"dedup": 0.5}, "dedup"), ({"batch": 0}, "batch"),
     ({"tokens_per_s": 0}, "tokens_per_s"), ({"page_bytes": 1000}, "page_bytes")],
)  # fmt: skip
def test_bad_requests_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        PlanRequest(**kwargs)


def test_no_engram_config_refused() -> None:
    with pytest.raises(ConfigError, match="engram"):
        plan(get_preset("tiny").replace(engram=None), PlanRequest())


def test_cli_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["analyze", "plan", "deepseek-v4.1", "--tier", "ssd", "--batch", "256", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "384,006,168" in text and "264 B/row" in text and "IOPS utilisation" in text
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["dtype"] == "fp8_e4m3_ue8m0"  # the preset's table dtype is the default
    assert doc["table_bytes"] == 768_022_850 * 264
    assert "\n" in format_plan(doc)
    assert main(["analyze", "plan", "deepseek-v4.1", "--tier", "floppy", "--out", str(tmp_path)]) == 2
    assert "tier" in capsys.readouterr().err


# ---- distributed view (issue 13, item 6)


def test_distributed_bytes_per_rank_follow_the_shard_split() -> None:
    cfg = get_preset("deepseek-v4.1")
    p = plan_distributed(cfg, DistRequest(ranks=8, batch=1280 * 4096, row_dtype="bf16"))
    # 384,006,168 and 384,016,682 rows over 8 ranks: the first ranks hold ceil(rows / 8)
    assert p["table_rows_per_rank"] == -(-384_006_168 // 8) + -(-384_016_682 // 8) == 96_002_857
    assert p["row_bytes"] == 512
    assert p["table_bytes_per_rank"] == 96_002_857 * 512
    assert p["optimizer_state_bytes_per_rank"] == 96_002_857 * (2 * 256 * 4 + 8 + 16)
    assert p["tokens_per_rank"] == 655_360
    assert p["per_rank_step"]["row_reads"] == 655_360 * 48
    one = plan_distributed(cfg, DistRequest(ranks=1, batch=1000))
    assert one["table_rows_per_rank"] == 768_022_850
    assert one["per_rank_step"]["bytes_off_rank"] == 0  # a single rank sends nothing off itself


def test_distributed_exchange_bytes_for_a_measured_unique_fraction() -> None:
    cfg = get_preset("tiny")
    reads = 4096 // 4 * cfg.engram.hash.heads_per_layer * len(cfg.engram.hash.layer_ids)
    p = plan_distributed(cfg, DistRequest(ranks=4, batch=4096, unique_model="measured", unique_fraction=0.25))
    s = p["per_rank_step"]
    u = 0.25 * reads
    rb = 4 * cfg.engram.head_dim
    assert s["unique_rows"] == pytest.approx(u)
    assert s["forward_bytes"] == pytest.approx(u * (8 + rb))
    assert s["backward_bytes"] == pytest.approx(u * rb)
    assert s["bytes_sent"] == pytest.approx(u * (8 + 2 * rb))
    assert s["bytes_off_rank"] == pytest.approx(u * (8 + 2 * rb) * 3 / 4)
    assert p["all_to_all_bytes_per_step"] == pytest.approx(4 * s["bytes_sent"])
    for link in p["links"]:
        assert link["exchange_s"] == pytest.approx(s["bytes_off_rank"] / (link["gbps"] * 1e9 / 8))
        assert link["hidden"] == (link["gbps"] >= p["break_even_gbps"])
    flops = 6 * count_parameters(cfg).p_act * 1024
    assert p["compute"]["seconds"] == pytest.approx(flops / (989e12 * 0.4))


def test_unique_models_bound_each_other() -> None:
    cfg = get_preset("tiny")
    rows = sum(engram_table_rows(cfg))
    small = DistRequest(ranks=1, batch=16)
    # a handful of reads into 100k-row heads: hash collisions are rare, so every read is unique
    reads = 16 * cfg.engram.hash.heads_per_layer * len(cfg.engram.hash.layer_ids)
    assert sum(expected_unique_rows(cfg, 16, small)) == pytest.approx(reads, rel=1e-3)
    # a huge batch touches almost every row, never more
    assert rows * 0.99 < sum(expected_unique_rows(cfg, 10**8, small)) <= rows
    zipf = DistRequest(ranks=1, batch=16, unique_model="zipf", zipf_s=1.0, zipf_types=10**6)
    for tokens in (1000, 100_000):
        u_zipf, u_uniform = sum(expected_unique_rows(cfg, tokens, zipf)), sum(expected_unique_rows(cfg, tokens, small))
        assert u_zipf < u_uniform  # repeated n-grams dedup beyond collisions


@pytest.mark.parametrize(("draws", "types", "s"), [(1000, 10_000, 1.1), (50_000, 3_000_000, 1.0), (10**6, 10**6, 0.8)])
def test_zipf_distinct_matches_the_exact_sum(draws: int, types: int, s: float) -> None:
    k = np.arange(1, types + 1, dtype=np.float64)
    p = k**-s / (k**-s).sum()
    exact = float((1 - (1 - p) ** draws).sum())
    assert zipf_distinct(draws, types, s) == pytest.approx(exact, rel=5e-3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"ranks": 0}, "ranks"), ({"batch": 1, "ranks": 2}, "batch"), ({"row_dtype": "int4"}, "row_dtype"),
     ({"unique_model": "magic"}, "unique_model"), ({"unique_model": "measured"}, "unique_fraction"),
     ({"unique_model": "measured", "unique_fraction": 1.5}, "unique_fraction"), ({"zipf_s": 0}, "zipf_s"),
     ({"links_gbps": ()}, "links_gbps"), ({"mfu": 2.0}, "mfu"), ({"accel_flops": 0}, "accel_flops")],
)  # fmt: skip
def test_bad_distributed_requests_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DistRequest(**{"ranks": 2, "batch": 64, **kwargs})


def test_cli_plan_distributed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["analyze", "plan", "deepseek-v4.1", "--batch", "1280", "--seq-len", "4096", "--ranks", "8,64,512",
            "--row-dtype", "bf16", "--unique-model", "zipf", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "distributed: 512 ranks, 5,242,880 tokens/step (10,240 per rank)" in text
    doc = json.loads((tmp_path / "plan.json").read_text())
    views = doc["distributed"]
    assert [v["ranks"] for v in views] == [8, 64, 512]
    assert all(v["unique_model"] == {"name": "zipf", "zipf_s": 1.0, "zipf_types": 10**9} for v in views)
    assert doc["per_batch"]["tokens"] == 5_242_880
    assert views[0]["table_bytes_per_rank"] > views[1]["table_bytes_per_rank"] > views[2]["table_bytes_per_rank"]
    assert "\n" in format_distributed(views[0])
    assert main(["analyze", "plan", "tiny", "--ranks", "8,x"]) == 2
    assert "--ranks" in capsys.readouterr().err
    assert main(["analyze", "plan", "tiny", "--ranks", "2", "--unique-model", "measured"]) == 2
    err = capsys.readouterr()
    assert "unique_fraction" in err.err and "Engram table plan" not in err.out  # refused before printing


def test_zipf_fit_recovers_the_exponent_it_was_given() -> None:
    cfg = get_preset("tiny")
    heads = cfg.engram.hash.heads_per_layer * len(cfg.engram.hash.layer_ids)
    req = DistRequest(ranks=1, batch=4096, unique_model="zipf", zipf_s=1.2, zipf_types=10**7)
    frac = sum(expected_unique_rows(cfg, 4096, req)) / (4096 * heads)
    assert fit_zipf_s(cfg, 4096, frac, types=10**7) == pytest.approx(1.2, rel=1e-3)
    with pytest.raises(ConfigError, match="unique_fraction"):
        fit_zipf_s(cfg, 4096, 0.0)
