"""Held-out evaluation: mean token loss and bits per byte over an :class:`EvalLoader` sweep.

Here, below ``train`` and ``analysis``, because it is not training: the trainer's periodic evals and
``engramlm eval`` (a saved model, no training code) run the same loop.

Bits per byte = sum of NLL (nats) over scored targets / (ln 2 * UTF-8 bytes those targets stand
for), with bytes from ``EvalLoader``'s ``target_bytes``; over a full sweep the denominator is the
split's byte count, so models with different tokenizers compare fairly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from engramlm.data.loader import EvalLoader


@torch.no_grad()
def evaluate(model, loader: EvalLoader, max_batches: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """{"loss", "bpb", "tokens", "bytes", "full_sweep"} of ``model`` on ``loader``'s split.

    ``threads``: torch threads for the sweep (None: leave the current setting).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    nll = 0.0
    n_tok = 0
    n_bytes = 0
    batches = 0
    try:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                break
            engram = model.engram_inputs(batch["input_ids"], batch["doc_start"], row_ids=batch.get("row_ids"))
            out = model(batch["input_ids"], engram=engram)
            logits = out.logits.float()
            losses = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), reduction="none"
            )
            mask = batch["loss_mask"].reshape(-1)
            nll += float(losses[mask].double().sum())
            n_tok += int(mask.sum())
            n_bytes += int(batch["target_bytes"].sum())
            batches += 1
    finally:
        model.train(was_training)
    return {
        "loss": nll / max(n_tok, 1),
        "bpb": nll / (math.log(2) * max(n_bytes, 1)),
        "tokens": n_tok,
        "bytes": n_bytes,
        "full_sweep": batches == len(loader),
    }
