"""Gate map: where the memory fires. For a text, the gate alpha per token, Engram layer and branch.

The gate is the block's own decision to use the retrieved row (sigmoid of the query-key score), so a
map of it shows where memory is read: the paper's examples have it high where a familiar phrase
completes ("Alexander the *Great*"). Output: JSON (decoded tokens, gates[layer][token][branch]), a
coloured-text HTML page (one line per layer, background = gate averaged over branches, every branch
in the tooltip; all text HTML-escaped) and a PNG heatmap (rows = layer/branch, columns = tokens).
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import torch

from engramlm.analysis.common import check_length, new_figure
from engramlm.errors import ConfigError
from engramlm.models.model import EngramLM


def compute_gates(
    model: EngramLM, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None
) -> dict[int, np.ndarray]:
    """layer id -> gate [T, M] for a single sequence ``input_ids`` [1, T]."""
    if model.layout is None:
        raise ConfigError("checkpoint: this model has no Engram layers, so it has no gates")
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence [1, T], got {tuple(input_ids.shape)}")
    check_length(model, input_ids)
    with torch.inference_mode():
        out = model(input_ids, engram=model.engram_inputs(input_ids, doc_start))
    return {lid: g[0, :, :, 0].float().numpy() for lid, g in sorted(out.gates.items())}


def gate_report(tokens: list[str], ids: list[int], gates: dict[int, np.ndarray]) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "ids": ids,
        "layers": list(gates),
        "gates": {str(lid): np.round(g, 6).tolist() for lid, g in gates.items()},  # [T][M]
        "mean_gate": {str(lid): float(g.mean()) for lid, g in gates.items()},
    }


def _colour(v: float) -> str:
    """White (0) to saturated orange (1): readable black text at every value."""
    v = min(max(float(v), 0.0), 1.0)
    g, b = int(255 - 120 * v), int(255 - 230 * v)
    return f"rgb(255,{g},{b})"


def _show(token: str) -> str:
    """Visible form of whitespace so a token of spaces or a newline still has a box."""
    return token.replace("\n", "\u21b5\n").replace("\t", "\u2192") or "\u2205"


def render_html(report: dict[str, Any], title: str = "Engram gate map") -> str:
    """Coloured-text page; every token and title is escaped (the text is untrusted)."""
    rows = []
    for lid in report["layers"]:
        g = np.asarray(report["gates"][str(lid)])
        spans = []
        for t, tok in enumerate(report["tokens"]):
            branches = ", ".join(f"{x:.3f}" for x in g[t])
            tip = html.escape(f"#{t} {tok!r} gate per branch: {branches}", quote=True)
            spans.append(
                f'<span class="tok" style="background:{_colour(g[t].mean())}" title="{tip}">'
                f"{html.escape(_show(tok))}</span>"
            )
        rows.append(f'<h2>layer {int(lid)} (mean gate {g.mean():.3f})</h2><div class="text">{"".join(spans)}</div>')
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em}.text{font-family:monospace;white-space:pre-wrap;line-height:1.8}"
        ".tok{border-right:1px solid #eee;padding:1px 0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Background: gate averaged over branches "
        "(white 0, orange 1); hover a token for every branch.</p>" + "".join(rows) + "</body></html>\n"
    )


def plot_gates(report: dict[str, Any]):
    """Heatmap: one row per (layer, branch), one column per token."""
    labels, mats = [], []
    for lid in report["layers"]:
        g = np.asarray(report["gates"][str(lid)])
        mats.append(g.T)
        labels += [f"L{lid} b{m}" for m in range(g.shape[1])]
    mat = np.concatenate(mats, axis=0)
    t = mat.shape[1]
    fig = new_figure(min(40.0, max(6.0, 0.22 * t)), 1.0 + 0.3 * mat.shape[0])
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mat, aspect="auto", cmap="Oranges", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
    if t <= 160:
        ax.set_xticks(np.arange(t), [repr(s)[1:-1][:12] for s in report["tokens"]], rotation=90, fontsize=6)
    ax.set_xlabel("token")
    fig.colorbar(im, ax=ax, label="gate")
    fig.tight_layout()
    return fig
