"""The paper's optimiser recipe as one object: Muon + AdamW for the dense model, sparse Adam for tables.

Parameter assignment (by module, not by shape, so gains such as RMSNorm weights or the
hyper-connection's ``[M, d]`` gains never land in Muon):

* Muon: weights of every ``nn.Linear`` except the LM head (attention, SwiGLU, router, Engram's
  fused ``wkv``, hyper-connection projections) and the stacked expert weights ``[E, out, in]``;
* AdamW: everything else (token embedding, LM head, norms, gates, biases, conv taps); weight
  decay only on the embedding and the LM head (matrices), none on gains and biases;
* :class:`SparseRowAdam` at ``engram_lr_mult`` x the base LR and ``engram_weight_decay`` (0):
  the Engram tables, which are frozen for autograd (``requires_grad=False``) and so belong to
  no dense optimiser and never get a dense ``.grad``.

The learning rates follow :func:`engramlm.train.schedule.lr_multiplier`, set before each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engramlm.models.model import EngramLM
from engramlm.nn.moe import Experts
from engramlm.train.config import OptimConfig
from engramlm.train.muon import Muon
from engramlm.train.sparse_adam import SparseRowAdam


def split_parameters(model: EngramLM) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter], dict[int, Any]]:
    """(muon params, adamw params, engram tables), each keyed by a stable name."""
    tables = {lid: blk.embed.weight for lid, blk in model.engram_layers.items()}
    table_ids = {id(t) for t in tables.values()}
    matrix_ids: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and mod is not model.lm_head:
            matrix_ids.add(id(mod.weight))
        elif isinstance(mod, Experts):
            matrix_ids.update(id(w) for w in (mod.gate_proj, mod.up_proj, mod.down_proj))
    matrix_ids.discard(id(model.embed.weight))
    matrix_ids.discard(id(model.lm_head.weight))
    muon, adamw = {}, {}
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if id(p) in table_ids:
            continue
        (muon if id(p) in matrix_ids else adamw)[name] = p
    return muon, adamw, tables


class OptimizerSet:
    """Muon, AdamW and sparse table Adam driven together; ``set_lr(mult)`` then ``step()``."""

    def __init__(
        self,
        model: EngramLM,
        cfg: OptimConfig,
        tables: dict[int, torch.Tensor] | None = None,
        process_group: Any = None,
        table_backends: dict[int, Any] | None = None,
    ) -> None:
        """``tables``: the Engram tables the sparse Adam steps instead of the model's (a row-sharded run
        passes each table's local shard; the model's own tables are then empty placeholders).
        ``process_group``: data-parallel ranks that share Muon's Newton-Schulz work (None: one process).
        ``table_backends``: layer id -> a ``RowStateBackend`` holding that table outside the model (SSD)."""
        self.cfg = cfg
        muon, adamw, model_tables = split_parameters(model)
        for t in model_tables.values():
            t.requires_grad_(False)
        if tables is None:
            tables = model_tables
        elif set(tables) != set(model_tables):
            raise ValueError(f"tables cover Engram layers {sorted(tables)}, the model has {sorted(model_tables)}")
        if not cfg.use_muon:
            adamw = {**muon, **adamw}
            muon = {}
        self.muon_names, self.adamw_names = list(muon), list(adamw)
        self.muon = Muon(list(muon.values()), lr=cfg.lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay,
                         ns_steps=cfg.muon_ns_steps, ns_dtype=cfg.muon_ns_dtype, ns_schedule=cfg.muon_ns_schedule,
                         process_group=process_group) if muon else None  # fmt: skip
        decay = [p for p in adamw.values() if p.dim() >= 2]
        no_decay = [p for p in adamw.values() if p.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # fmt: skip
        # Not fused=True (3 ms a step here against ~12-22 ms): torch's fused kernel updates the weights without
        # bumping their version counters, which the packed-weight caches (nn.packed, nn.hyper) key on, so an eval
        # after it ran on stale weights (tests/test_train_cli.py's resume check caught it).
        self.adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
        self.adamw_order = [n for n, p in adamw.items() if p.dim() >= 2] + [n for n, p in adamw.items() if p.dim() < 2]
        outside = dict(table_backends or {})
        in_ram = {lid: t for lid, t in tables.items() if lid not in outside}
        lr = cfg.lr * cfg.engram_lr_mult
        self.sparse = (
            SparseRowAdam(in_ram, lr, cfg.betas, cfg.engram_eps, cfg.engram_weight_decay, backends=outside)
            if tables
            else None
        )
        self.dense_params = list(muon.values()) + list(adamw.values())

    def set_lr(self, mult: float) -> None:
        for opt in (self.muon, self.adamw):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = self.cfg.lr * mult
        if self.sparse is not None:
            self.sparse.lr = self.cfg.lr * self.cfg.engram_lr_mult * mult

    def grad_tensors(self) -> list[torch.Tensor]:
        """Every tensor with a gradient this step: dense parameters and the sparse row leaves."""
        leaves = self.sparse.leaves() if self.sparse is not None else []
        return [p for p in self.dense_params + leaves if p.grad is not None]

    def clip(self, max_norm: float | None, reduce_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Global grad norm over dense and sparse-row grads; scales all of them when above ``max_norm``.

        ``reduce_rows``: row-sharded runs, where each rank holds its own rows' grads and identical dense
        grads: sums the local rows' squared norm over ranks (an all-reduce), so every rank clips alike.
        """
        if reduce_rows is not None:
            return self._clip_sharded(max_norm, reduce_rows)
        grads = [t.grad for t in self.grad_tensors()]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if max_norm is not None:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        self.nonfinite = not bool(torch.isfinite(norm))
        return float(norm)

    def _clip_sharded(self, max_norm: float | None, reduce_rows: Callable[[torch.Tensor], torch.Tensor]) -> float:
        dense = [p.grad for p in self.dense_params if p.grad is not None]
        rows = [t.grad for t in (self.sparse.leaves() if self.sparse is not None else []) if t.grad is not None]
        zero = torch.zeros((), dtype=torch.float32)
        sq = [torch.linalg.vector_norm(g.float()).square() for g in dense]
        dense_sq = torch.stack(sq).sum() if sq else zero
        rsq = [torch.linalg.vector_norm(g.float()).square() for g in rows]
        row_sq = reduce_rows((torch.stack(rsq).sum() if rsq else zero).to(dense_sq.device))
        norm = (dense_sq + row_sq).sqrt()
        if max_norm is not None:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in dense + rows:
                g.mul_(coef.to(g.dtype))
        self.nonfinite = not bool(torch.isfinite(norm))
        return float(norm)

    # Trainer sets this when config.skip_nonfinite > 0: a step whose gradient norm (computed by clip) is
    # NaN/inf then changes nothing, so the batch is skipped with every weight and moment as it was.
    skip_nonfinite = False
    nonfinite = False

    def step(self) -> bool:
        """Apply the update; False when a non-finite step was skipped (nothing changed)."""
        if self.skip_nonfinite and self.nonfinite:  # (the sparse rows gathered for it are dropped at the next gather)
            return False
        if self.muon is not None:
            self.muon.step()
        self.adamw.step()
        if self.sparse is not None:
            self.sparse.step()
        return True

    def zero_grad(self) -> None:
        for p in self.dense_params:
            p.grad = None

    # ---- state for checkpoints -----------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors for safetensors, JSON-able metadata) covering all three optimisers."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"muon": self.muon_names, "adamw": self.adamw_order, "sparse": None}
        for prefix, opt, names in (("muon", self.muon, self.muon_names), ("adamw", self.adamw, self.adamw_order)):
            if opt is None:
                continue
            params = [p for g in opt.param_groups for p in g["params"]]
            for name, p in zip(names, params, strict=True):
                for key, value in opt.state.get(p, {}).items():
                    t = value if torch.is_tensor(value) else torch.tensor(value)
                    tensors[f"{prefix}/{name}/{key}"] = t.detach().clone().contiguous()
        if self.sparse is not None:
            for k, v in self.sparse.state_tensors().items():
                tensors[f"sparse/{k}"] = v.contiguous()
            meta["sparse"] = sorted(self.sparse.backends)
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("muon") != self.muon_names or meta.get("adamw") != self.adamw_order:
            raise ValueError("optimizer parameter lists differ from the checkpoint's (different model config?)")
        for prefix, opt, names in (("muon", self.muon, self.muon_names), ("adamw", self.adamw, self.adamw_order)):
            if opt is None:
                continue
            params = [p for g in opt.param_groups for p in g["params"]]
            for name, p in zip(names, params, strict=True):
                head = f"{prefix}/{name}/"
                entry = {k[len(head) :]: v.clone() for k, v in tensors.items() if k.startswith(head)}
                if entry:
                    opt.state[p] = entry
        if self.sparse is not None:
            self.sparse.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("sparse/")})

    @property
    def sparse_state_bytes(self) -> int:
        return self.sparse.state_bytes if self.sparse is not None else 0
