"""Sparse, lazy Adam for Engram tables: per step, only the rows the batch used are read and written.

How a step works (see :class:`SparseRowAdam`):

1. :meth:`gather` takes the batch's row ids [L, B, T, H_e] (computed in the input pipeline), finds
   each layer's unique rows, copies them into a small leaf tensor ``[U, d_h]`` with
   ``requires_grad`` and returns ``engram_rows`` (layer id -> ``leaf[inverse]`` [B, T, H_e, d_h])
   for :meth:`EngramLM.forward`. The table itself never takes part in autograd, so no dense
   ``.grad`` of the table ever exists.
2. After ``backward``, :meth:`step` applies Adam to those U rows and writes them back with one
   ``index_copy_``.

State is lazy: a slot map (sorted row ids -> slot) assigns a slot in growable moment tensors
the first time a row is touched, so state is proportional to the rows ever touched, and a
step costs O(rows in the batch) plus O(slots) memmove when new rows appear: nothing is
proportional to the table size.

Where rows and state live is a *backend* (:class:`RowStateBackend`): :class:`RamRowState` (the table
tensor in the model plus :class:`RowSlots`) or the SSD tier (:class:`engramlm.train.ssd.SsdRowState` over a
:class:`engramlm.store.trainable.TrainableTable`). The optimizer math is here, once: a backend only reads a
step's rows with their state (zeros for a row never updated) and writes the updated ones back, so both
backends give bit-identical results.

Semantics (documented choice, as torch's ``SparseAdam``): a row's moments only advance when the
row is in the batch, and bias correction uses the row's own update count ``n_r``:
``m_hat = m / (1 - beta1^n_r)``, ``v_hat = v / (1 - beta2^n_r)``. Rows absent from a batch get
no update, not even from momentum. Weight decay (default 0 for tables) is decoupled and also
applied only to touched rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class RowSlots:
    """Lazy per-row Adam state of one table: slot map + growable moments + per-row update counts."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, capacity: int = 1024) -> None:
        self.dim = dim
        self.keys = np.empty(0, dtype=np.int64)  # sorted row ids with a slot
        self.key_slot = np.empty(0, dtype=np.int64)  # slot of keys[i]
        self.n = 0
        self.exp_avg = torch.zeros(capacity, dim, dtype=dtype)
        self.exp_avg_sq = torch.zeros(capacity, dim, dtype=dtype)
        self.count = torch.zeros(capacity, dtype=torch.int64)

    def _grow(self, need: int) -> None:
        cap = self.exp_avg.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        for name in ("exp_avg", "exp_avg_sq", "count"):
            old = getattr(self, name)
            grown = torch.zeros((new_cap, *old.shape[1:]), dtype=old.dtype)
            grown[: self.n] = old[: self.n]
            setattr(self, name, grown)

    def find(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, slots of the found rows) for sorted unique ``rows``; allocates nothing."""
        pos = np.searchsorted(self.keys, rows)
        found = pos < self.keys.size
        found[found] = self.keys[pos[found]] == rows[found]
        return found, self.key_slot[pos[found]]

    def slots(self, rows: np.ndarray) -> np.ndarray:
        """Slots of the sorted unique ``rows``, allocating slots for rows seen for the first time."""
        pos = np.searchsorted(self.keys, rows)
        found = pos < self.keys.size
        found[found] = self.keys[pos[found]] == rows[found]
        out = np.empty(rows.size, dtype=np.int64)
        out[found] = self.key_slot[pos[found]]
        new = ~found
        k = int(new.sum())
        if k:
            fresh = np.arange(self.n, self.n + k, dtype=np.int64)
            out[new] = fresh
            self.keys = np.insert(self.keys, pos[new], rows[new])
            self.key_slot = np.insert(self.key_slot, pos[new], fresh)
            self._grow(self.n + k)
            self.n += k
        return out

    @property
    def state_bytes(self) -> int:
        """Bytes held by this table's optimizer state (allocated capacity, slot map included)."""
        t = sum(x.numel() * x.element_size() for x in (self.exp_avg, self.exp_avg_sq, self.count))
        return t + self.keys.nbytes + self.key_slot.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes of state for the rows that have a slot (allocated capacity beyond them excluded)."""
        per_row = 2 * self.dim * self.exp_avg.element_size() + self.count.element_size()
        return self.n * per_row + self.keys.nbytes + self.key_slot.nbytes

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Slot-ordered state: ``rows[s]`` is the row id of slot s."""
        rows = np.empty(self.n, dtype=np.int64)
        rows[self.key_slot] = self.keys
        return {
            "rows": torch.from_numpy(rows),
            "exp_avg": self.exp_avg[: self.n].clone(),
            "exp_avg_sq": self.exp_avg_sq[: self.n].clone(),
            "count": self.count[: self.n].clone(),
        }

    def load_state_tensors(self, st: dict[str, torch.Tensor]) -> None:
        rows = st["rows"].numpy().astype(np.int64)
        n = rows.size
        if st["exp_avg"].shape != (n, self.dim) or st["exp_avg_sq"].shape != (n, self.dim) or st["count"].shape != (n,):
            raise ValueError(f"sparse Adam state shapes disagree: {n} rows of dim {self.dim}")
        order = np.argsort(rows, kind="stable")
        self.keys, self.key_slot = rows[order], order.astype(np.int64)
        if np.any(np.diff(self.keys) <= 0):
            raise ValueError("sparse Adam state has duplicate row ids")
        self.n = 0
        self.exp_avg = torch.zeros(max(n, 1), self.dim, dtype=self.exp_avg.dtype)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.count = torch.zeros(max(n, 1), dtype=torch.int64)
        self.exp_avg[:n] = st["exp_avg"]
        self.exp_avg_sq[:n] = st["exp_avg_sq"]
        self.count[:n] = st["count"]
        self.n = n


@dataclass
class RowBatch:
    """A step's rows of one table with their Adam state (zeros and count 0 for rows never updated)."""

    rows: torch.Tensor  # [U, d_h]
    exp_avg: torch.Tensor  # [U, d_h]
    exp_avg_sq: torch.Tensor  # [U, d_h]
    count: torch.Tensor  # [U] int64: the row's own update count


class RowStateBackend(Protocol):
    """Where one table's rows and per-row optimizer state live (RAM or SSD); ids are sorted unique."""

    def read(self, unique: torch.Tensor) -> RowBatch: ...

    def write(self, unique: torch.Tensor, batch: RowBatch) -> None: ...


class RamRowState:
    """Rows in the model's table tensor, state in :class:`RowSlots` (allocated at the first write)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.slots = RowSlots(table.shape[1], table.dtype)

    def read(self, unique: torch.Tensor) -> RowBatch:
        st = self.slots
        rows = self.table.detach().index_select(0, unique)
        found, slot = st.find(unique.numpy())
        n = unique.numel()
        m = torch.zeros(n, st.dim, dtype=st.exp_avg.dtype)
        v = torch.zeros_like(m)
        count = torch.zeros(n, dtype=torch.int64)
        if found.any():
            f, s = torch.from_numpy(found), torch.from_numpy(slot)
            m[f], v[f], count[f] = st.exp_avg[s], st.exp_avg_sq[s], st.count[s]
        return RowBatch(rows, m, v, count)

    def write(self, unique: torch.Tensor, batch: RowBatch) -> None:
        st = self.slots
        slot = torch.from_numpy(st.slots(unique.numpy()))
        st.exp_avg.index_copy_(0, slot, batch.exp_avg)
        st.exp_avg_sq.index_copy_(0, slot, batch.exp_avg_sq)
        st.count.index_copy_(0, slot, batch.count)
        self.table.index_copy_(0, unique, batch.rows)


@dataclass
class Gathered:
    """One table's rows for the current step: unique ids, the leaf holding them, and their state."""

    layer_id: int
    unique: torch.Tensor  # [U] int64, sorted
    leaf: torch.Tensor  # [U, d_h], requires_grad
    state: RowBatch


class SparseRowAdam:
    """Adam over the rows a batch touches, for a set of tables (layer id -> weight [R, d_h] in RAM, or
    layer id -> a :class:`RowStateBackend` in ``backends``, e.g. on SSD)."""

    def __init__(
        self,
        tables: dict[int, torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        backends: dict[int, RowStateBackend] | None = None,
    ) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        ram = {lid: RamRowState(w) for lid, w in tables.items()}
        self.backends: dict[int, RowStateBackend] = {**ram, **(backends or {})}
        self.tables = {lid: b.table for lid, b in ram.items()}
        self.state = {lid: b.slots for lid, b in ram.items()}  # RAM state (checkpointed in optimizer.safetensors)
        self._pending: list[Gathered] = []

    def gather(self, row_ids: torch.Tensor, layer_ids: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """``engram_rows`` for the forward pass from row ids [L, B, T, H_e] (L in ``layer_ids`` order)."""
        self.reset()
        return {lid: self.gather_layer(lid, row_ids[li]) for li, lid in enumerate(layer_ids)}

    def reset(self) -> None:
        """Forget the rows gathered so far (a step that was skipped leaves them pending)."""
        self._pending = []

    def gather_layer(self, layer_id: int, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[*ids.shape, d_h]`` of one table, added to this step's pending rows (see :meth:`gather`).

        Called once per layer per step; the row owner of a sharded table calls it with the local ids its
        peers asked for (``engramlm.dist``), and repeats across peers sum in the leaf's gradient. The rows and
        their state come from the layer's backend (RAM, or an SSD table).
        """
        unique, inverse = torch.unique(ids.long(), sorted=True, return_inverse=True)
        state = self.backends[layer_id].read(unique)
        leaf = state.rows.requires_grad_(True)
        self._pending.append(Gathered(layer_id, unique, leaf, state))
        # F.embedding, not leaf[inverse]: its CPU backward is deterministic with several threads,
        # while index_put_'s accumulate is not (exact resume needs bitwise-equal row grads).
        return F.embedding(inverse, leaf)  # [*ids.shape, d_h]

    def step_rows(self) -> dict[int, torch.Tensor]:
        """Layer id -> the sorted unique rows the current step reads and will write."""
        return {g.layer_id: g.unique for g in self._pending}

    def leaves(self) -> list[torch.Tensor]:
        """The current step's row tensors (their ``.grad`` joins the global grad-norm clip)."""
        return [g.leaf for g in self._pending]

    def _merged(self) -> list[Gathered]:
        """One entry per layer with a gradient. A layer gathered several times in one step (micro-batches of
        gradient accumulation, a checkpointed layer recomputed in backward) gets its rows' gradients summed
        per row, so each row takes one update from its state as it was before the step."""
        out = []
        for lid in dict.fromkeys(g.layer_id for g in self._pending):
            parts = [g for g in self._pending if g.layer_id == lid and g.leaf.grad is not None]
            if len(parts) <= 1:
                out += parts
                continue
            ids = torch.cat([g.unique for g in parts])
            grads = torch.cat([g.leaf.grad for g in parts])
            unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            grad = torch.zeros(unique.numel(), grads.shape[1], dtype=grads.dtype, device=grads.device)
            grad.index_add_(0, inverse.to(grads.device), grads)
            state = self.backends[lid].read(unique)
            leaf = state.rows.requires_grad_(True)
            leaf.grad = grad
            out.append(Gathered(lid, unique, leaf, state))
        return out

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for g in self._merged():
            grad = g.leaf.grad
            st = g.state
            m = st.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
            v = st.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            n = st.count.add_(1)
            nf = n.to(grad.dtype)[:, None]
            bc1 = 1 - torch.pow(torch.full_like(nf, b1), nf)
            bc2 = 1 - torch.pow(torch.full_like(nf, b2), nf)
            w = g.leaf.detach()
            if self.weight_decay:
                w = w * (1 - self.lr * self.weight_decay)
            w = w - self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)
            self.backends[g.layer_id].write(g.unique, RowBatch(w, m, v, n))
        self._pending = []

    @property
    def state_bytes(self) -> int:
        return sum(s.state_bytes for s in self.state.values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for lid, st in self.state.items():
            for k, v in st.state_tensors().items():
                out[f"layer{lid}.{k}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for lid, st in self.state.items():
            keys = ("rows", "exp_avg", "exp_avg_sq", "count")
            missing = [k for k in keys if f"layer{lid}.{k}" not in tensors]
            if missing:
                raise ValueError(f"sparse Adam state for Engram layer {lid} lacks {missing}")
            st.load_state_tensors({k: tensors[f"layer{lid}.{k}"] for k in keys})
