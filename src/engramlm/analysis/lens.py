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
from engramlm.errors import ConfigError
from engramlm.models.model import EngramLM


def layer_names(model: EngramLM) -> list[str]:
    return ["embed"] + [f"block {i}" for i in range(model.config.num_layers)]


def logit_lens(
    model: EngramLM,
    dataset,
    *,
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-layer KL to the final distribution, early-exit loss and top-1 agreement over a split
    (``progress``: a tqdm bar on stderr, one tick per batch)."""
    from tqdm import tqdm

    from engramlm.data.loader import EvalLoader

    loader = EvalLoader(dataset, batch_size, min(seq_len, model.config.max_seq_len))
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = tqdm(total=total, desc="logit-lens", unit="batch", disable=not progress, dynamic_ncols=True)
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
            out = model.forward_with_hidden_states(
                batch["input_ids"], engram=model.engram_inputs(batch["input_ids"], batch["doc_start"])
            )
            final = F.log_softmax(out.logits.float()[mask], dim=-1)
            top_final = final.argmax(-1)
            tgt = batch["targets"][mask]
            for li, h in enumerate(out.hidden_states):
                lp = F.log_softmax(model.head(h).float()[mask], dim=-1)
                kl[li] += float(F.kl_div(lp, final, log_target=True, reduction="sum"))
                ce[li] += float(F.nll_loss(lp, tgt, reduction="sum"))
                agree[li] += float((lp.argmax(-1) == top_final).sum())
            count += int(mask.sum())
            bar.update(1)
    bar.close()
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
    """Linear CKA of two feature matrices with the same rows ([N, Dx], [N, Dy]), full-batch (biased) form."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both: {x.shape[0]} vs {y.shape[0]} rows")
    return cka_from_grams(centered_gram(x), centered_gram(y))


def hsic1(k: torch.Tensor, l: torch.Tensor) -> float:
    """The unbiased HSIC estimator of the spec (§9.8) for Gram matrices K, L [n, n], n >= 4."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"HSIC_1 needs a minibatch of at least 4 samples, got {n}")
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    k1, l1 = k.sum(dim=1), l.sum(dim=1)
    value = (k * l).sum() + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)
    return float(value / (n * (n - 3)))


def cka_matrix(states_a: list[torch.Tensor], states_b: list[torch.Tensor], minibatch: int = 256) -> np.ndarray:
    """CKA between every layer of A (rows) and every layer of B (columns), spec §9.8: linear kernels
    K = X X^T per minibatch of ``minibatch`` samples, CKA = sum_b HSIC_1(K_b, L_b) /
    sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)). A last partial minibatch under 4 samples is dropped."""
    n = states_a[0].shape[0]
    if any(x.shape[0] != n for x in (*states_a, *states_b)):
        raise ValueError("CKA needs the same samples in every layer of both models")
    cross = np.zeros((len(states_a), len(states_b)))
    self_a, self_b = np.zeros(len(states_a)), np.zeros(len(states_b))
    for lo in range(0, n, minibatch):
        if min(n, lo + minibatch) - lo < 4:
            break
        ga = [(x[lo : lo + minibatch].double() @ x[lo : lo + minibatch].double().T) for x in states_a]
        gb = [(y[lo : lo + minibatch].double() @ y[lo : lo + minibatch].double().T) for y in states_b]
        self_a += [hsic1(g, g) for g in ga]
        self_b += [hsic1(g, g) for g in gb]
        cross += [[hsic1(x, y) for y in gb] for x in ga]
    den = np.sqrt(np.outer(self_a, self_b))
    return np.divide(cross, den, out=np.zeros_like(cross), where=den > 0)


def alignment_index(mat: np.ndarray, top_k: int = 5) -> list[float]:
    """Spec §9.8: for each layer j of A, the CKA-weighted mean index of its ``top_k`` most similar layers
    of B. a_j > j means layer j of A looks like a deeper layer of B (the paper: Engram-27B layer 5 ~ MoE 12)."""
    k = min(top_k, mat.shape[1])
    out = []
    for row in mat:
        top = np.argsort(-row, kind="stable")[:k]
        w = np.clip(row[top], 0.0, None)
        out.append(float((w * top).sum() / w.sum()) if w.sum() > 0 else float("nan"))
    return out


def recurring_ngram_ends(dataset, n: int = 3, min_count: int = 2) -> np.ndarray:
    """Spec §9.8 [D]: True at each position of the split that ends an n-gram (inside one document) seen at
    least ``min_count`` times in the split: the offline stand-in for the paper's named-entity final tokens."""
    tokens = np.asarray(dataset.tokens, dtype=np.int64)
    total = tokens.size
    mask = np.zeros(total, dtype=bool)
    if total < n:
        return mask
    ends = np.arange(n - 1, total, dtype=np.int64)
    inside = np.ones(ends.size, dtype=bool)
    for back in range(n - 1):  # a document may not start at any of the n-gram's later positions
        inside &= ~dataset.doc_start_mask(ends - back)
    key = np.zeros(ends.size, dtype=np.int64)
    for back in range(n - 1, -1, -1):
        key = key * int(dataset.vocab_size) + tokens[ends - back]
    _, inverse, counts = np.unique(key[inside], return_inverse=True, return_counts=True)
    mask[ends[inside]] = counts[inverse] >= min_count
    return mask


def collect_states(
    model: EngramLM,
    dataset,
    *,
    max_tokens: int = 1024,
    batch_size: int = 8,
    seq_len: int = 256,
    positions: np.ndarray | None = None,
) -> list[torch.Tensor]:
    """Residual streams [N, M*d] (branches concatenated) after the embedding and each block, for the
    first ``max_tokens`` scored positions of the split (deterministic, so two models see the same); with
    ``positions`` (a bool mask over the split's tokens, e.g. :func:`recurring_ngram_ends`) only those."""
    from engramlm.data.loader import EvalLoader

    t = min(seq_len, model.config.max_seq_len)
    loader = EvalLoader(dataset, batch_size, t)
    parts: list[list[torch.Tensor]] = []
    got = 0
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            mask = batch["loss_mask"]
            if positions is not None:
                b = mask.shape[0]
                pos = (i * batch_size + np.arange(b))[:, None] * t + np.arange(t)
                mask = mask & torch.from_numpy(positions[np.minimum(pos, positions.size - 1)])
            if not bool(mask.any()):
                continue
            out = model.forward_with_hidden_states(
                batch["input_ids"], engram=model.engram_inputs(batch["input_ids"], batch["doc_start"])
            )
            take = min(int(mask.sum()), max_tokens - got)
            parts.append([h[mask][:take].flatten(1).float() for h in out.hidden_states])
            got += take
            if got >= max_tokens:
                break
    if not parts:
        raise ConfigError("positions: no scored position of this split is selected (try --positions all)")
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


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
