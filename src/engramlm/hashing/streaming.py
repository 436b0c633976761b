"""Streaming (decode-time) hasher: one new token per sequence in O(1), same ids as the batch hasher.

State per sequence: the last N-1 compressed ids inside the lookback window, initialised to the
compressed pad id (spec §4.7). The state is a pure function of the committed history, so forks,
rollbacks and prefix-cache hits are handled by recomputing it with :meth:`load_history`.
"""

from __future__ import annotations

import numpy as np
import torch

from engramlm.hashing.spec import HashLayout


class StreamingHasher:
    """``step(ids [B]) -> row ids [L, B, H_e]`` (offset-applied, the spec's row-id dtype)."""

    def __init__(self, layout: HashLayout, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.pad = layout.compressed_pad_id
        n_max = layout.spec.max_ngram_size
        self.mult = torch.from_numpy(layout.multipliers).to(self.device)  # [L, N]
        self.primes = torch.from_numpy(layout.primes).to(self.device)  # [L, N-1, K]
        self.offs = torch.from_numpy(layout.offsets).to(self.device)
        self.state = torch.full((batch_size, n_max - 1), self.pad, dtype=torch.long, device=self.device)
        self.out_dtype = torch.int32 if layout.spec.row_id_dtype == "int32" else torch.int64
        # the same arithmetic in NumPy for the host step without resets: one decode token per row is a few
        # dozen numbers, where a torch op's dispatch (~5 µs) costs far more than the work (int64 wraps alike)
        self._np = (
            layout.multipliers[:, None, :].astype(np.int64),  # [L, 1, N]
            layout.primes[:, None].astype(np.int64),  # [L, 1, N-1, K]
            layout.offsets[:, None].astype(np.int64),
            np.int32 if self.out_dtype == torch.int32 else np.int64,
        )

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget the history of the given sequences (all when ``rows`` is None)."""
        if rows is None:
            self.state.fill_(self.pad)
        else:
            self.state[torch.as_tensor(rows, device=self.device)] = self.pad

    def step(
        self,
        ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hash one new token per sequence and advance the state.

        ``doc_start`` (bool [B]) resets the window before this token (``reset`` mode only);
        ``dead`` (bool [B]) marks a DEAD token: its own ids are computed, then the window is
        cleared so that later tokens never look back across it (spec §11.4).
        """
        ids = ids.to(self.device).reshape(-1)
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape [{self.batch_size}], got {tuple(ids.shape)}")
        if doc_start is None and dead is None and self.device.type == "cpu":
            return self._step_host(ids)
        if doc_start is not None and self.layout.spec.boundary_mode == "reset":
            self.state[doc_start.to(self.device).reshape(-1).bool()] = self.pad
        x = self.layout.compression.compress(ids)
        window = torch.cat([x[:, None], self.state], dim=1)  # [B, N]: lookback k = column k
        products = window[None] * self.mult[:, None, :]  # [L, B, N]
        mixes = []
        mix = products[..., 0]
        for k in range(1, products.shape[-1]):
            mix = mix ^ products[..., k]
            mixes.append(mix)
        mu = torch.stack(mixes, dim=-1)  # [L, B, N-1]
        rows = torch.remainder(mu[..., None], self.primes[:, None]) + self.offs[:, None]
        self.state = window[:, :-1].clone()
        if dead is not None:
            self.state[dead.to(self.device).reshape(-1).bool()] = self.pad
        return rows.reshape(rows.shape[0], rows.shape[1], -1).to(self.out_dtype)

    def _step_host(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`step` without resets, on the host in NumPy (bit-identical: the golden tests cover both)."""
        mult, primes, offs, out = self._np
        x = self.layout.compression.compress(ids.numpy())
        window = np.concatenate([x[:, None], self.state.numpy()], axis=1)  # [B, N]: lookback k = column k
        products = window[None] * mult  # [L, B, N]
        mix = products[..., 0]
        mixes = []
        for k in range(1, products.shape[-1]):
            mix = mix ^ products[..., k]
            mixes.append(mix)
        mu = np.stack(mixes, axis=-1)  # [L, B, N-1]
        rows = np.remainder(mu[..., None], primes) + offs  # [L, B, N-1, K]
        self.state = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))
        return torch.from_numpy(rows.reshape(rows.shape[0], rows.shape[1], -1).astype(out))

    def load_history(
        self,
        histories: list[torch.Tensor],
        doc_starts: list[torch.Tensor] | None = None,
        deads: list[torch.Tensor] | None = None,
    ) -> None:
        """Recompute every sequence's state from its committed token history (1-D tensors)."""
        if len(histories) != self.batch_size:
            raise ValueError(f"need {self.batch_size} histories, got {len(histories)}")
        self.reset()
        n_keep = self.state.shape[1]
        reset_mode = self.layout.spec.boundary_mode == "reset"
        for i, hist in enumerate(histories):
            hist = hist.to(self.device).reshape(-1)
            start = 0
            if reset_mode and doc_starts is not None and doc_starts[i].any():
                start = int(torch.nonzero(doc_starts[i].reshape(-1)).max())
            if deads is not None and deads[i].any():
                start = max(start, int(torch.nonzero(deads[i].reshape(-1)).max()) + 1)
            tail = self.layout.compression.compress(hist[max(start, hist.shape[0] - n_keep) :])
            if tail.numel():
                self.state[i, : tail.numel()] = tail.flip(0)
