"""LogitLens and linear CKA: does Engram make early layers "deeper"?

**LogitLens.** The residual stream after the embedding and after every block is sent through the
model's own readout + final norm + LM head (``model.head``, an early exit). Per layer we report
KL(p_final || p_layer), averaged over the scored targets of a split (nats), the early-exit loss
against the true next token, and top-1 agreement with the final prediction. The last layer's exit
*is* the final prediction, so its KL is exactly 0. The paper's claim is that with Engram the KL
falls faster with depth: static lookups no longer have to be rebuilt by early layers.

**CKA.** Linear centred kernel alignment between every layer of model A and every layer of model B
on the same tokens: ``CKA(X, Y) = <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F)`` with ``K = X_c X_c^T``
(column-centred features), which equals ``||X_c^T Y_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)``.
It is invariant to orthogonal transforms and isotropic scaling and CKA(X, X) = 1. Features are the
residual stream with its M branches concatenated ([N, M*d]); the Gram form costs O(N^2 D) per
layer and O(N^2) per pair, so all pairs are cheap once the Grams exist. "Engram makes layer i of A
look like a deeper layer j > i of B" shows up as the high-CKA ridge lying above the diagonal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engramlm.analysis.common import new_figure
from engramlm.models.model import EngramLM


def layer_names(model: EngramLM) -> list[str]:
    return ["embed"] + [f"block {i}" for i in range(model.config.num_layers)]


def logit_lens(
    model: EngramLM, dataset, *, batch_size: int = 8, seq_len: int = 256, max_batches: int | None = None
) -> dict[str, Any]:
    """Per-layer KL to the final distribution, early-exit loss and top-1 agreement over a split."""
    from engramlm.data.loader import EvalLoader

    loader = EvalLoader(dataset, batch_size, min(seq_len, model.config.max_seq_len))
    n_states = model.config.num_layers + 1
    kl = np.zeros(n_states)
    ce = np.zeros(n_states)
    agree = np.zeros(n_states)
    count = 0
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            mask = batch["loss_mask"]
            out = model(batch["input_ids"], doc_start=batch["doc_start"], output_hidden_states=True)
            final = F.log_softmax(out.logits.float()[mask], dim=-1)
            top_final = final.argmax(-1)
            tgt = batch["targets"][mask]
            for li, h in enumerate(out.hidden_states):
                lp = F.log_softmax(model.head(h).float()[mask], dim=-1)
                kl[li] += float(F.kl_div(lp, final, log_target=True, reduction="sum"))
                ce[li] += float(F.nll_loss(lp, tgt, reduction="sum"))
                agree[li] += float((lp.argmax(-1) == top_final).sum())
            count += int(mask.sum())
    denom = max(count, 1)
    return {
        "layers": layer_names(model),
        "targets": count,
        "kl_to_final": (kl / denom).tolist(),
        "early_exit_loss": (ce / denom).tolist(),
        "top1_agreement": (agree / denom).tolist(),
    }


def plot_logit_lens(reports: dict[str, dict[str, Any]]):
    fig = new_figure(11, 4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, rep in reports.items():
        x = np.arange(len(rep["layers"]))
        ax1.plot(x, rep["kl_to_final"], marker="o", label=name)
        ax2.plot(x, rep["early_exit_loss"], marker="o", label=name)
    for ax, label in ((ax1, "KL(final || layer) [nats]"), (ax2, "early-exit loss [nats]")):
        ax.set_xlabel("residual stream after (0 = embedding)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ CKA


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """K = X_c X_c^T in float64 for features x [N, D]."""
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def cka_from_grams(kx: torch.Tensor, ky: torch.Tensor) -> float:
    num = float((kx * ky).sum())
    den = float(kx.norm() * ky.norm())
    return num / den if den > 0 else 0.0


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same rows ([N, Dx], [N, Dy])."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both: {x.shape[0]} vs {y.shape[0]} rows")
    return cka_from_grams(centered_gram(x), centered_gram(y))


def collect_states(
    model: EngramLM, dataset, *, max_tokens: int = 1024, batch_size: int = 8, seq_len: int = 256
) -> list[torch.Tensor]:
    """Residual streams [N, M*d] (branches concatenated) after the embedding and each block, for the
    first ``max_tokens`` scored positions of the split (deterministic, so two models see the same)."""
    from engramlm.data.loader import EvalLoader

    loader = EvalLoader(dataset, batch_size, min(seq_len, model.config.max_seq_len))
    parts: list[list[torch.Tensor]] = []
    got = 0
    with torch.inference_mode():
        for batch in loader:
            mask = batch["loss_mask"]
            out = model(batch["input_ids"], doc_start=batch["doc_start"], output_hidden_states=True)
            take = min(int(mask.sum()), max_tokens - got)
            parts.append([h[mask][:take].flatten(1).float() for h in out.hidden_states])
            got += take
            if got >= max_tokens:
                break
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def cka_matrix(states_a: list[torch.Tensor], states_b: list[torch.Tensor]) -> np.ndarray:
    """CKA between every layer of A (rows) and every layer of B (columns)."""
    ga = [centered_gram(x) for x in states_a]
    gb = [centered_gram(y) for y in states_b]
    return np.array([[cka_from_grams(a, b) for b in gb] for a in ga])


def plot_cka(mat: np.ndarray, names_a: list[str], names_b: list[str], label_a: str, label_b: str):
    fig = new_figure(1.5 + 0.45 * len(names_b), 1.2 + 0.4 * len(names_a))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mat, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
    ax.set_xticks(np.arange(len(names_b)), names_b, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(names_a)), names_a, fontsize=7)
    ax.set_xlabel(label_b)
    ax.set_ylabel(label_a)
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    return fig
