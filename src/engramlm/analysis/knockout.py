"""Knockout: how much of a model's quality survives without its Engram memory.

Each evaluation set is scored once per mode in the same ordered sweep (identical tokens, windows and
row ids): ``baseline`` (the model as trained), ``no_engram`` (every Engram block bypassed: its output
is suppressed, the rest of the network unchanged), ``capacity1`` (a one-row memory: every n-gram of
every head reads row 0 of its layer's table, so the block still runs and its gate and value path see a
constant row; this is the "a capacity-1 table would do as well" claim made testable) and, with more
than one Engram layer, ``no_engram@L`` per layer.

**Share of baseline quality kept** for a mode m on a set of targets S is

    kept(m, S) = (L_ref(S) - L_m(S)) / (L_ref(S) - L_base(S))

with L the mean NLL and L_ref the loss of a no-context reference: the add-one-smoothed unigram
distribution of the train split. Why this and not L_base / L_m: a loss ratio has no meaningful zero
(a model that only knows token frequencies already gets most of the way from ln V), so it would
report "97 % kept" for a model that lost everything it learned from context. The gap to the unigram
reference measures exactly what the model learned beyond frequencies: 1 = all of it survives the
knockout, 0 = the knocked-out model is no better than frequencies, < 0 worse (a network that relies
on the memory and gets a wrong signal). It is undefined (None) when the baseline does not beat the
reference on S. The uniform loss ln V is reported alongside for the same formula with a weaker
reference. Token classes are defined in :mod:`engramlm.analysis.classes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engramlm.analysis.classes import TokenClasses
from engramlm.analysis.common import (
    EvalArrays,
    ModeFn,
    eval_pass,
    loss_and_bpb,
    mode_baseline,
    mode_capacity1,
    mode_no_engram,
    mode_skip_layers,
    new_figure,
)
from engramlm.models.model import EngramLM


def knockout_modes(model: EngramLM, per_layer: bool = True) -> dict[str, ModeFn]:
    modes: dict[str, ModeFn] = {"baseline": mode_baseline}
    if model.layout is None:
        return modes
    modes["no_engram"] = mode_no_engram
    modes["capacity1"] = mode_capacity1
    if per_layer and len(model.layout.layer_ids) > 1:
        for lid in model.layout.layer_ids:
            modes[f"no_engram@{lid}"] = mode_skip_layers({lid})
    return modes


def unigram_nll(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """-ln p(v) per id under the add-one-smoothed unigram distribution of ``counts``."""
    c = np.zeros(vocab_size, dtype=np.float64)
    c[: min(vocab_size, counts.shape[0])] = counts[:vocab_size]
    return -np.log((c + 1.0) / (c.sum() + vocab_size))


def share_kept(l_ref: float | None, l_mode: float | None, l_base: float | None) -> float | None:
    """(L_ref - L_mode) / (L_ref - L_base); None when undefined (see module doc)."""
    if l_ref is None or l_mode is None or l_base is None or not (l_ref - l_base) > 1e-12:
        return None
    return float((l_ref - l_mode) / (l_ref - l_base))


def _summarise(arr: EvalArrays, sel: np.ndarray, ref_nll: np.ndarray, vocab_size: int) -> dict[str, Any]:
    nb = arr.target_bytes[sel]
    modes = {m: loss_and_bpb(v[sel], nb) for m, v in arr.nll.items()}
    ref = float(ref_nll[sel].mean()) if sel.any() else None
    base = modes["baseline"]["loss"]
    return {
        "modes": modes,
        "reference": {"unigram_loss": ref, "uniform_loss": float(np.log(vocab_size))},
        "share_kept": {m: share_kept(ref, v["loss"], base) for m, v in modes.items() if m != "baseline"},
        "share_kept_vs_uniform": {
            m: share_kept(float(np.log(vocab_size)), v["loss"], base) for m, v in modes.items() if m != "baseline"
        },
    }


def summarise(arr: EvalArrays, classes: TokenClasses, ref_nll: np.ndarray, vocab_size: int) -> dict[str, Any]:
    """Overall and per-class loss/bpb/share kept of one evaluation set."""
    everything = np.ones(arr.n, dtype=bool)
    out = {"overall": _summarise(arr, everything, ref_nll[arr.targets], vocab_size), "classes": {}}
    ref = ref_nll[arr.targets]
    for family, (labels, names) in classes.label(arr.inputs, arr.targets).items():
        out["classes"][family] = {
            name: _summarise(arr, labels == i, ref, vocab_size) for i, name in enumerate(names) if (labels == i).any()
        }
    out["complete_sweep"] = arr.complete
    return out


def run_knockout(
    model: EngramLM,
    sets: Mapping[str, tuple[Any, TokenClasses, np.ndarray]],
    *,
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = None,
    per_layer: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Knockout report for every evaluation set: name -> (``TokenDataset``, its token classes, the
    reference unigram counts, normally its corpus's train split)."""
    modes = knockout_modes(model, per_layer)
    v = model.config.vocab_size
    out = {}
    for name, (ds, classes, ref_counts) in sets.items():
        arr = eval_pass(
            model, ds, modes, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches, progress=progress
        )
        out[name] = summarise(arr, classes, unigram_nll(ref_counts, v), v)
    return {
        "modes": list(modes),
        "engram_layers": list(model.layout.layer_ids) if model.layout is not None else [],
        "share_kept_definition": "(L_unigram - L_mode) / (L_unigram - L_baseline), mean NLL per target; "
        "L_unigram = add-one-smoothed train-split unigram",
        "sets": out,
    }


def plot_knockout(report: dict[str, Any]):
    """One panel per evaluation set: share kept per class (overall, kind, position, freq) per mode."""
    sets = report["sets"]
    modes = [m for m in report["modes"] if m != "baseline"]
    fig = new_figure(12, 3.2 * max(1, len(sets)))
    for row, (name, rep) in enumerate(sets.items()):
        ax = fig.add_subplot(max(1, len(sets)), 1, row + 1)
        labels = ["overall"]
        groups = [rep["overall"]]
        for family, by in rep["classes"].items():
            for cname, r in by.items():
                labels.append(f"{family}:{cname}")
                groups.append(r)
        x = np.arange(len(labels))
        width = 0.8 / max(1, len(modes))
        for j, m in enumerate(modes):
            vals = [g["share_kept"].get(m) for g in groups]
            ax.bar(x + j * width, [np.nan if s is None else s for s in vals], width, label=m)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(x + width * (len(modes) - 1) / 2, labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("share of quality kept")
        ax.set_title(f"{name}: baseline loss {rep['overall']['modes']['baseline']['loss']:.3f} nats")
        if modes:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
