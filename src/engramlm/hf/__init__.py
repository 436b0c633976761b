"""engramlm in the Hugging Face world (the ``hf`` extra: ``pip install 'engramlm[hf]'``).

Light on purpose: importing ``engramlm.hf`` imports no transformers. The names below load on first use;
``EngramConfig``, ``EngramForCausalLM``, ``EngramCache`` and ``register`` come from
:mod:`engramlm.hf.modeling`, whose import registers ``model_type = "engramlm"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (so ``from engramlm.hf import EngramForCausalLM`` before
``AutoModelForCausalLM.from_pretrained(OUT)``); ``export_hf`` writes an export (:mod:`engramlm.hf.export`).

:mod:`engramlm.hf.adapter`: Engram added to an existing HF causal LM (``add_engram``, ``engram_optimizers``,
``save_engram`` / ``load_engram``). :mod:`engramlm.hf.harness`: the ``engramlm`` model for
lm-evaluation-harness and the offline tasks built from prepared corpora (:mod:`engramlm.hf.evaltasks`).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EngramConfig": "engramlm.hf.modeling",
    "EngramForCausalLM": "engramlm.hf.modeling",
    "EngramCache": "engramlm.hf.modeling",
    "register": "engramlm.hf.modeling",
    "export_hf": "engramlm.hf.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engramlm.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
