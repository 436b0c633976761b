"""Held-out evaluation: mean token loss and bits per byte over an :class:`EvalLoader` sweep.

Here, below ``train`` and ``analysis``, because it is not training: the trainer's periodic evals and
``engramlm eval`` (a saved model, no training code) run the same loop.

Bits per byte = sum of NLL (nats) over scored targets / (ln 2 * UTF-8 bytes those targets stand
for), with bytes from ``EvalLoader``'s ``target_bytes``; over a full sweep the denominator is the
split's byte count, so models with different tokenizers compare fairly.

Every result says what it scored (``scope``, ``batches``): the trainer's periodic evals usually stop
after ``data.eval_max_batches`` batches, ``engramlm eval`` sweeps the whole split, and the two figures
for one checkpoint differ accordingly.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from engramlm.data.loader import EvalLoader


def eval_scope(split: str, batches: int, of: int) -> str:
    """What a sweep covered, in words: ``"full val split (40 batches)"`` or ``"first 16 of 40 batches of val"``."""
    if batches >= of:
        return f"full {split} split ({of} batches)"
    return f"first {batches} of {of} batches of {split}"


@torch.no_grad()
def evaluate(
    model,
    loader: EvalLoader,
    max_batches: int | None = None,
    threads: int | None = None,
    *,
    progress: bool = False,
    tables: Mapping[int, Any] | None = None,
) -> dict[str, Any]:
    """{"loss", "bpb", "tokens", "bytes", "full_sweep", "batches", "split", "scope"} of ``model`` on
    ``loader``'s split (the first ``max_batches`` batches of it, None: all).

    ``threads``: torch threads for the sweep (None: leave the current setting). ``progress``: a tqdm
    bar on stderr, one tick per batch, with an ETA. ``tables``: layer id -> a ``store`` RowTable serving
    that layer's rows (tables kept outside the model, e.g. trained on SSD).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    split = str(getattr(loader.dataset, "split", "?"))
    was_training = model.training
    model.eval()
    nll = 0.0
    n_tok = 0
    n_bytes = 0
    batches = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"eval {split}", unit="batch", dynamic_ncols=True, file=sys.stderr)
    try:
        for batch in loader:
            if batches >= total:
                break
            if tables:
                ids = batch["row_ids"]
                rows = {lid: tables[lid].gather(ids[i]) for i, lid in enumerate(model.layout.layer_ids)}
                engram = model.engram_inputs(batch["input_ids"], batch["doc_start"], rows=rows)
            else:
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
            if bar is not None:
                bar.update(1)
            if batches >= total:  # do not build a batch that would not be scored
                break
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return {
        "loss": nll / max(n_tok, 1),
        "bpb": nll / (math.log(2) * max(n_bytes, 1)),
        "tokens": n_tok,
        "bytes": n_bytes,
        "full_sweep": batches == len(loader),
        "batches": batches,
        "split": split,
        "scope": eval_scope(split, batches, len(loader)),
    }
