"""``engramlm export-hf RUN OUT``: a trained model as a directory ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.

RUN is a run directory (its latest checkpoint), a training checkpoint or a saved model; the tokenizer is the
one it was trained with (``--tokenizer``, else found next to the model or its data; a foreign one is
refused). Needs the ``hf`` extra (transformers). See :mod:`engramlm.hf.export` for what OUT holds.
"""

from __future__ import annotations

import argparse
from typing import Any

from engramlm.errors import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export-hf", help="export a trained model for Hugging Face transformers (AutoModelForCausalLM)"
    )
    p.add_argument("checkpoint", help="run directory, training checkpoint or save_pretrained dir")
    p.add_argument("out", help="directory to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", help="tokenizer.json path or known name (default: found next to the model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("export-hf: needs transformers; install the extra: pip install 'engramlm[hf]'") from None
    from engramlm.hf.export import export_hf

    out = export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer)
    print(
        f"exported {args.checkpoint} to {out} (load it with AutoModelForCausalLM.from_pretrained after "
        "importing engramlm.hf.modeling)"
    )
    return 0
