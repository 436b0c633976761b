"""Table/memory planner: known preset sizes, bytes = rows x bytes/row, per-step and per-second needs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engramlm.analysis.planner import REFERENCE, PlanRequest, format_plan, plan
from engramlm.cli.main import main
from engramlm.errors import ConfigError
from engramlm.hashing.primes import prime_plan
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
