"""What crosses the model's boundary: :class:`EngramInputs` in, :class:`LMOutput` out.

Why a separate object: the Engram side of a step (row ids or rows, lookback windows, DEAD
positions, skipped layers, and in decoding the conv history and real lengths) depends on the
tokens alone, so whoever owns the data builds it before the forward: the loader and sparse
optimiser in training, :class:`~engramlm.models.decode.DecodeCache` in generation, the analysis
tools in knockouts. The forward only reads it. Ids are range-checked here, on the host, once per
step, so the forward never synchronises with an accelerator to validate them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engramlm.hashing.batch import NgramHasher, window_starts
from engramlm.hashing.spec import HashLayout
from engramlm.nn.engram import ConvState, check_row_ids


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    gates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer id -> alpha [B, T, M, 1]
    hidden_states: list[torch.Tensor] | None = None  # residual stream [B, T, M, d] after embed and each block


@dataclass(frozen=True)
class EngramInputs:
    """The Engram side of one forward pass, keyed by layer id.

    Each Engram layer not in ``skip`` reads either ``rows[layer]`` ([B, T, H_e, d_h], gathered from a
    store, by the sparse optimiser or by a prefetch handle; read lazily, so a handle blocks only for
    the layer that needs it) or ``row_ids[layer]`` ([B, T, H_e] offset-applied ids into its own table).
    ``window_start`` [B, T] confines lookbacks (document reset, DEAD rule); ``dead`` [B, T] zeroes the
    output at DEAD positions. Decoding adds ``conv`` (per layer ShortConv history, which the forward
    advances in place like the KV cache) and ``lengths`` [B] (real tokens of a right-padded chunk).
    Build it with :meth:`from_tokens` (or ``EngramLM.engram_inputs``), which hashes what is missing.
    """

    row_ids: Mapping[int, torch.Tensor] = field(default_factory=dict)
    rows: Mapping[int, torch.Tensor] = field(default_factory=dict)
    window_start: torch.Tensor | None = None
    dead: torch.Tensor | None = None
    skip: frozenset[int] = frozenset()
    conv: Mapping[int, ConvState] | None = None
    lengths: torch.Tensor | None = None

    def __post_init__(self) -> None:
        both = set(self.row_ids) & set(self.rows)
        if both:
            raise ValueError(f"engram: layers {sorted(both)} have both row ids and rows; give each layer one source")

    @classmethod
    def from_tokens(
        cls,
        layout: HashLayout,
        input_ids: torch.Tensor,
        doc_start: torch.Tensor | None = None,
        dead: torch.Tensor | None = None,
        *,
        row_ids: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
        rows: Mapping[int, torch.Tensor] | None = None,
        skip_engram: bool | Collection[int] = False,
        hasher: NgramHasher | None = None,
    ) -> EngramInputs:
        """Inputs for a full (uncached) forward over ``input_ids`` [B, T].

        ``row_ids`` (stacked [L, B, T, H_e] as the hashers and the loader produce them, or by layer)
        and ``rows`` are used where given and range-checked against the layout; the layers still
        without a source are hashed from the tokens (``hasher``, default a new one for ``layout``).
        ``skip_engram`` (True, or layer ids) bypasses those Engram blocks (knockout).
        """
        if isinstance(skip_engram, bool):
            skipped = frozenset(layout.layer_ids if skip_engram else ())
        else:
            skipped = frozenset(int(i) for i in skip_engram)
        rows = dict(rows or {})
        if row_ids is None:
            ids_by_layer: dict[int, torch.Tensor] = {}
        elif isinstance(row_ids, Mapping):
            ids_by_layer = {int(k): v for k, v in row_ids.items()}
        else:
            ids_by_layer = layout.split(row_ids)
        ids_by_layer = {lid: v for lid, v in ids_by_layer.items() if lid not in rows}
        for lid, ids in ids_by_layer.items():
            check_row_ids(ids, layout.rows_of(lid), layout.heads_per_layer, what=f"row_ids[{lid}]")
        missing = [
            lid for lid in layout.layer_ids if lid not in rows and lid not in ids_by_layer and lid not in skipped
        ]
        if missing:
            hashed = (hasher or NgramHasher(layout))(input_ids, doc_start, dead)
            ids_by_layer.update(layout.split(hashed, missing))
        reset = layout.spec.boundary_mode == "reset" and doc_start is not None
        window = None
        if reset or dead is not None:
            b, t = input_ids.shape
            window = window_starts(doc_start if reset else None, dead, (b, t), input_ids.device)
        return cls(row_ids=ids_by_layer, rows=rows, window_start=window, dead=dead, skip=skipped)

    def with_rows(self, rows: Mapping[int, torch.Tensor]) -> EngramInputs:
        """The same inputs with ``rows`` serving their layers instead of the row ids."""
        keep = {lid: v for lid, v in self.row_ids.items() if lid not in rows}
        return dataclasses.replace(self, row_ids=keep, rows=rows)

    def for_layer(self, layer_id: int, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of :class:`~engramlm.nn.engram.EngramBlock` for ``layer_id``, on ``device``."""
        if layer_id in self.rows:
            source: dict[str, Any] = {"rows": self.rows[layer_id]}
        elif layer_id in self.row_ids:
            source = {"row_ids": self.row_ids[layer_id].to(device, non_blocking=True)}
        else:
            raise KeyError(f"engram: no rows or row ids for Engram layer {layer_id} (and it is not skipped)")

        def dev(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device, non_blocking=True)

        return {
            **source,
            "window_start": dev(self.window_start),
            "dead": dev(self.dead),
            "conv_state": None if self.conv is None else self.conv.get(layer_id),
            "lengths": dev(self.lengths),
        }
