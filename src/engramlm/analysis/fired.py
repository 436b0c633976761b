"""Which rows fired: for one token of a text, the n-grams it reads, their row ids and the gate.

For position t and each Engram layer: per order n and head k, the n-gram ending at t (decoded tokens;
positions before the window start, i.e. before the document or the text began, read as padding
exactly as the hasher does), its compressed ids, the head-local row ``z`` (``0 <= z < p``), the
offset-applied row ``r = z + o`` (the index into the layer's table), the head's prime ``p``, the
L2 norm of the row, and the gate per branch at t. This is the row-level view of the gate map.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engramlm.analysis.common import check_length, new_figure
from engramlm.errors import ConfigError
from engramlm.hashing.batch import window_starts
from engramlm.models.model import EngramLM

PAD_SHOWN = "<pad>"


def fired_rows(
    model: EngramLM, input_ids: torch.Tensor, doc_start: torch.Tensor | None, position: int, texts: list[str]
) -> dict[str, Any]:
    """Report for token ``position`` (negative counts from the end) of one sequence ``input_ids`` [1, T]."""
    layout = model.layout
    if layout is None:
        raise ConfigError("checkpoint: this model has no Engram layers")
    check_length(model, input_ids)
    t_len = input_ids.shape[1]
    t = position + t_len if position < 0 else position
    if not 0 <= t < t_len:
        raise ConfigError(f"position: {position} is outside the text's {t_len} tokens")
    with torch.inference_mode():
        out = model(input_ids, engram=model.engram_inputs(input_ids, doc_start))
    rows = model.hasher(input_ids, doc_start)[:, 0, t].numpy()  # [L, H_e] offset-applied
    local = model.hasher(input_ids, doc_start, head_local=True)[:, 0, t].numpy()
    reset = doc_start if layout.spec.boundary_mode == "reset" else None
    start = int(window_starts(reset, None, tuple(input_ids.shape), input_ids.device)[0, t])
    ids = input_ids[0].tolist()
    comp = layout.compression.compress(np.asarray(ids, dtype=np.int64))
    pad_c = layout.compressed_pad_id
    k_heads = layout.spec.n_head_per_ngram
    layers = []
    for li, lid in enumerate(layout.layer_ids):
        table = model.engram_layers[lid].embed.weight
        heads = []
        for oi, n in enumerate(layout.spec.orders):
            span = range(t - n + 1, t + 1)
            toks = [texts[ids[p]] if p >= start else PAD_SHOWN for p in span]
            cids = [int(comp[p]) if p >= start else pad_c for p in span]
            for k in range(k_heads):
                col = oi * k_heads + k
                r = int(rows[li, col])
                heads.append(
                    {
                        "order": n,
                        "head": k,
                        "ngram_ids": [ids[p] if p >= start else None for p in span],
                        "ngram_tokens": toks,
                        "compressed_ids": cids,
                        "row_local": int(local[li, col]),
                        "row": r,
                        "prime": int(layout.primes[li, oi, k]),
                        "offset": int(layout.offsets[li, oi, k]),
                        "row_norm": float(table[r].float().norm()),
                    }
                )
        gate = out.gates[lid][0, t, :, 0].float().tolist()
        layers.append({"layer": lid, "gate": gate, "mean_gate": float(np.mean(gate)), "heads": heads})
    return {
        "position": t,
        "token": texts[ids[t]],
        "context": [texts[i] for i in ids[max(0, t - 8) : t + 1]],
        "window_start": start,
        "layers": layers,
    }


def plot_fired(report: dict[str, Any]):
    """Per layer: the row norm of every head's row, labelled with its n-gram and row id; gate in the title."""
    layers = report["layers"]
    n_heads = max(len(layer["heads"]) for layer in layers)
    fig = new_figure(9, 1.0 + 0.32 * n_heads * len(layers))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(len(layers), 1, i + 1)
        heads = layer["heads"]
        labels = [f"n={h['order']} h{h['head']} {''.join(h['ngram_tokens'])!r} -> row {h['row']}" for h in heads]
        ax.barh(np.arange(len(heads)), [h["row_norm"] for h in heads], color="tab:orange")
        ax.set_yticks(np.arange(len(heads)), labels, fontsize=7)
        ax.invert_yaxis()
        gates = ", ".join(f"{g:.2f}" for g in layer["gate"])
        ax.set_title(f"layer {layer['layer']}: token {report['token']!r} #{report['position']}, gate [{gates}]")
        ax.set_xlabel("row L2 norm")
    fig.tight_layout()
    return fig
