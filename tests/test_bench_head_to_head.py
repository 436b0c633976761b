"""bench_head_to_head on your own corpus: never overwrites committed results, always renders, says what it scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import bench_head_to_head as h2h
from benchmarks import make_tables as mt


def test_result_name_carries_a_non_default_corpus() -> None:
    assert h2h.result_name("full", ["sotu", "stdlib"], None) == "head_to_head"
    assert h2h.result_name("medium", ["stdlib", "sotu"], None) == "head_to_head_medium"
    # the committed medium results are for sotu + stdlib: a run on one corpus gets its own file
    assert h2h.result_name("medium", ["sotu"], None) == "head_to_head_medium_sotu"
    assert h2h.result_name("medium", ["my texts/v2"], None) == "head_to_head_medium_my-texts-v2"
    assert h2h.result_name("quick", ["sotu"], "mine") == "mine"


def _doc_with_heldout(documents: int) -> dict:
    doc = json.loads((mt.RESULTS_DIR / "head_to_head_quick.json").read_text(encoding="utf-8"))
    for c in doc["corpora"].values():
        c["heldout"] = {"split": "val", "tokens_scored": 1234, "documents": documents,
                        "few_documents": documents < h2h.MIN_HELDOUT_DOCUMENTS}  # fmt: skip
    return doc


def test_any_out_name_renders_with_tokens_scored_and_a_few_documents_warning(tmp_path: Path) -> None:
    doc = {**_doc_with_heldout(3), "benchmark": "my_corpus_result", "kind": "head_to_head"}
    (tmp_path / "my_corpus_result.json").write_text(json.dumps(doc), encoding="utf-8")
    shutil.copy(mt.RESULTS_DIR / Path(doc["plot"]).name, tmp_path)
    grouped = mt.load_results(tmp_path)
    assert list(grouped) == ["head_to_head"]
    body = mt.render(grouped)["head_to_head"]
    assert "1,234 tokens of 3 val documents" in body
    assert body.count("**Warning**") == len(doc["corpora"])
    ok = mt.render(mt.load_results(_write(tmp_path / "ok", _doc_with_heldout(500))))["head_to_head"]
    assert "**Warning**" not in ok and "1,234 tokens of 500 val documents" in ok


def _write(d: Path, doc: dict) -> Path:
    d.mkdir()
    (d / "head_to_head_x.json").write_text(json.dumps({**doc, "kind": "head_to_head"}), encoding="utf-8")
    shutil.copy(mt.RESULTS_DIR / Path(doc["plot"]).name, d)
    return d


def test_console_table_lists_every_arm_with_parameters_and_warns() -> None:
    name, entry = next(iter(_doc_with_heldout(2)["corpora"].items()))
    lines = h2h.console_table(name, entry)
    assert "1,234 tokens of the val split (2 documents)" in lines[0]
    for arm, a in entry["arms"].items():
        row = next(line for line in lines if line.strip().startswith(arm + " "))
        assert f"{a['params']['P_act']:,}" in row and f"{a['bpb']['mean']:.4f}" in row
    assert "WARNING" in lines[-1]
    assert not any("WARNING" in line for line in h2h.console_table(name, _doc_with_heldout(50)["corpora"][name]))


def test_trend_fit_finds_the_crossing_of_a_known_line() -> None:
    from benchmarks import h2h_trend

    # gap = 0.04 - 0.01 ln(x): zero at x = e^4 ~ 54.6 tokens per row
    points = [{"tokens_per_row": x, "gap_mean": 0.04 - 0.01 * np.log(x), "gap_se": 1e-4} for x in (5.0, 17.0, 40.0)]
    fit = h2h_trend.fit(points, draws=20_000)
    assert abs(fit["slope_per_ln_tokens_per_row"] + 0.01) < 1e-6
    assert abs(fit["cross_tokens_per_row"]["point"] - np.exp(4)) < 1e-3
    assert fit["direction"] == "engram overtakes moe" and fit["p_slope_sign"] == 1.0
    assert fit["cross_tokens_per_row"]["q16"] < np.exp(4) < fit["cross_tokens_per_row"]["q84"]


def test_trend_reads_the_committed_results() -> None:
    from benchmarks import h2h_trend

    pts = h2h_trend.budget_points(mt.RESULTS_DIR, "sotu", 256, 4)
    multi = [p for p in pts if p["se_from"] == "seeds"]
    assert [p["result"] for p in multi] == ["head_to_head_medium.json", "head_to_head.json"]
    assert all(p["seeds"] == 3 and p["gap_se"] > 0 for p in multi)
    # larger budgets trained with one seed (the prose trend) borrow the pooled spread
    assert all(p["seeds"] == 1 and p["gap_se"] > 0 for p in pts if p not in multi)
    assert [p["tokens_per_row"] for p in pts] == sorted(p["tokens_per_row"] for p in pts)


def _trend_doc(tokens: int, gaps: list[float]) -> dict:
    def runs(bpbs: list[float]) -> list[dict]:
        return [{"heldout": {"bpb": b, "loss": b * 3}, "curve": [[i, 4.0 + b] for i in range(10)]} for b in bpbs]

    return {"kind": "head_to_head", "settings": {"d": 256, "layers": 4, "tokens": tokens},
            "corpora": {"sotu": {"arms": {"engram_moe": {"runs": runs([2.0 + g for g in gaps]),
                                                         "params": {"engram_rows": [40, 60]}},
                                          "moe": {"runs": runs([2.0] * len(gaps))}}}}}  # fmt: skip


def test_trend_gives_one_seed_budgets_the_pooled_seed_spread_and_predicts_them(tmp_path: Path) -> None:
    from benchmarks import h2h_trend

    docs = {"a": _trend_doc(500, [0.03, 0.02, 0.04]), "b": _trend_doc(1700, [0.01, 0.0, 0.005]),
            "c": _trend_doc(3400, [-0.01])}  # fmt: skip
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc), encoding="utf-8")
    pts = h2h_trend.budget_points(tmp_path, "sotu", 256, 4)
    assert [(p["tokens_per_row"], p["seeds"], p["se_from"]) for p in pts] == [
        (5.0, 3, "seeds"), (17.0, 3, "seeds"), (34.0, 1, "pooled")]  # fmt: skip
    pooled = np.sqrt((2 * np.var([0.03, 0.02, 0.04], ddof=1) + 2 * np.var([0.01, 0.0, 0.005], ddof=1)) / 4)
    assert abs(pts[2]["gap_se"] - pooled) < 1e-12 and abs(h2h_trend.pooled_sd(pts) - pooled) < 1e-12
    # the nats view: the training curve's late mean and the held-out loss, paired per seed
    assert abs(pts[0]["train_loss_gap"] - 0.03) < 1e-9 and abs(pts[0]["heldout_loss_gap"] - 0.09) < 1e-9
    prior = h2h_trend.fit(pts[:2], draws=20_000)
    pred = h2h_trend.predict(prior, 34.0, pooled)
    line = prior["intercept"] + prior["slope_per_ln_tokens_per_row"] * np.log(34.0)
    assert abs(pred["gap"] - line) < 1e-12 and pred["sd"] > max(pred["fit_sd"], pooled)


def test_chi2_survival_matches_known_values() -> None:
    from benchmarks import h2h_trend

    # chi^2 critical values at p = 0.05 for 1, 2, 3 and 4 degrees of freedom
    for dof, x in ((1, 3.841459), (2, 5.991465), (3, 7.814728), (4, 9.487729)):
        assert abs(h2h_trend.chi2_sf(x, dof) - 0.05) < 1e-6
