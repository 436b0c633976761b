"""Batches from a prepared split: seeded random windows for training, a full sweep for eval.

Training (:class:`BatchLoader`) samples ``batch_size`` windows of ``seq_len + 1`` contiguous
tokens at uniform random offsets (windows may span document boundaries: the corpus is packed).
Batch ``k`` uses its own generator, ``PCG64(SeedSequence([seed, k]))``, so the whole RNG state
is ``(seed, step)``: resuming from ``state_dict()`` replays the identical batch sequence, and
any batch can be recomputed alone with :meth:`BatchLoader.batch_at`.

Eval (:class:`EvalLoader`) walks the split in order: window ``k`` holds tokens
``[k*T, k*T + T]``, so consecutive windows share one token and every token except the split's
first (a BOS) is a target exactly once. Bits per byte = sum of NLL over ``loss_mask`` targets /
(ln 2 * split UTF-8 bytes). ``target_bytes`` attributes to each target the exact bytes its
byte-level token stands for (0 for BOS/EOS/PAD), and over a full sweep it sums to the split's
byte count, so partial sums give exact per-window or per-bucket bits per byte. ``loss_mask``
scores text tokens and EOS (ending a document is part of the modelled text) but not the BOS
that follows every EOS by construction, nor padding.

Every batch is a dict of ``input_ids``/``targets`` (LongTensor[B, T]), ``doc_start``
(BoolTensor[B, T]: a document begins at that input position; position 0 only if one truly
begins there), ``loss_mask`` (BoolTensor[B, T]) and, with ``row_ids_fn``, ``row_ids =
row_ids_fn(input_ids, doc_start)`` computed here so hashing overlaps the model's step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from engramlm.data.dataset import TokenDataset
from engramlm.errors import ConfigError

RowIdsFn = Callable[[torch.Tensor, torch.Tensor], Any]
Batch = dict[str, Any]

__all__ = ["Batch", "BatchLoader", "EvalLoader", "TokenDataset"]


def _check_shape(dataset: TokenDataset, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if dataset.n_tokens < seq_len + 1:
        raise ConfigError(f"{dataset.split} split has {dataset.n_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}")


def _make_batch(
    dataset: TokenDataset,
    window: np.ndarray,
    positions: np.ndarray,
    valid: np.ndarray,
    row_ids_fn: RowIdsFn | None,
) -> Batch:
    """Split ``[B, T+1]`` windows into inputs/targets and attach masks (``valid`` marks tokens)."""
    window = window.astype(np.int64)
    inputs, targets = window[:, :-1], window[:, 1:]
    doc_start = dataset.doc_start_mask(positions[:, :-1]) & valid[:, :-1]
    loss_mask = valid[:, 1:] & (targets != dataset.bos_id)
    batch: Batch = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
        "targets": torch.from_numpy(np.ascontiguousarray(targets)),
        "doc_start": torch.from_numpy(np.ascontiguousarray(doc_start)),
        "loss_mask": torch.from_numpy(np.ascontiguousarray(loss_mask)),
    }
    if row_ids_fn is not None:
        batch["row_ids"] = row_ids_fn(batch["input_ids"], batch["doc_start"])
    return batch


class BatchLoader:
    """Endless, seeded, exactly resumable training batches of random contiguous windows."""

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        row_ids_fn: RowIdsFn | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> None:
        _check_shape(dataset, batch_size, seq_len)
        rank, world = part
        if not 0 <= rank < world or world > batch_size:
            raise ConfigError(f"batch_size {batch_size} cannot be split over {world} ranks (rank {rank})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = int(seed)
        self.row_ids_fn = row_ids_fn
        self.step = 0
        # data parallelism: rank r reads the contiguous rows [lo, hi) of every global batch (sizes differ by at
        # most one); the windows, and so the global batch, do not depend on the number of ranks
        base, extra = divmod(batch_size, world)
        self.rows = (rank * base + min(rank, extra), (rank + 1) * base + min(rank + 1, extra))

    def window_starts(self, step: int) -> np.ndarray:
        """Token offsets of batch ``step``'s windows (uniform, so every window fits)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        high = self.dataset.n_tokens - self.seq_len  # exclusive: last start keeps T+1 tokens
        return rng.integers(0, high, size=self.batch_size, dtype=np.int64)

    def batch_at(self, step: int) -> Batch:
        """The batch number ``step`` (this rank's rows of it); a pure function of (data, seed, shape, step)."""
        starts = self.window_starts(step)[self.rows[0] : self.rows[1]]
        positions = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)
        window = np.asarray(self.dataset.tokens[positions])
        valid = np.ones(positions.shape, dtype=bool)
        return _make_batch(self.dataset, window, positions, valid, self.row_ids_fn)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: the RNG of batch k is PCG64(SeedSequence([seed, k]))."""
        return {
            "step": self.step,
            "rng": {"bit_generator": "PCG64", "seed_sequence": [self.seed, self.step]},
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "split": self.dataset.split,
            "content_hash": self.dataset.manifest.content_hash,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]``; refuse a state saved for other data, shape or seed."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "seq_len", "split", "content_hash"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"loader state {key}={state.get(key)!r} does not match this loader's {mine[key]!r}")
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ConfigError(f"loader state step must be a non-negative int, got {step!r}")
        self.step = step


class EvalLoader:
    """One ordered pass over a split in windows that score every token once (see module doc)."""

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        seq_len: int,
        row_ids_fn: RowIdsFn | None = None,
    ) -> None:
        _check_shape(dataset, batch_size, seq_len)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.row_ids_fn = row_ids_fn
        self.n_windows = -(-(dataset.n_tokens - 1) // seq_len)

    @property
    def total_bytes(self) -> int:
        """The bits-per-byte denominator: UTF-8 bytes of every document in the split."""
        return self.dataset.n_bytes

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n, t = self.dataset.n_tokens, self.seq_len
        for first in range(0, self.n_windows, self.batch_size):
            ks = np.arange(first, min(first + self.batch_size, self.n_windows), dtype=np.int64)
            positions = ks[:, None] * t + np.arange(t + 1, dtype=np.int64)
            valid = positions < n
            window = np.full(positions.shape, self.dataset.pad_id, dtype=np.int64)
            window[valid] = self.dataset.tokens[positions[valid]]
            batch = _make_batch(self.dataset, window, positions, valid, self.row_ids_fn)
            target_bytes = self.dataset.token_bytes[window[:, 1:]] * valid[:, 1:]
            batch["target_bytes"] = torch.from_numpy(np.ascontiguousarray(target_bytes))
            yield batch
