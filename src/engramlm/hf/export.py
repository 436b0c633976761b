"""``export_hf``: a trained engramlm model as a directory HF ``Auto*`` classes load.

The export is the model's saved-model directory (``model.safetensors`` and ``engram_hash.safetensors``
copied byte for byte, so a store built from the run still matches the export's weights sha256), with a
``config.json`` that is both engramlm's and an :class:`~engramlm.hf.configuration.EngramConfig`, plus:

- ``tokenizer.json`` (the training tokenizer, byte for byte: the one the compression map was built from,
  found and checked by :func:`~engramlm.models.locate.find_tokenizer`) and ``tokenizer_config.json``
  (``PreTrainedTokenizerFast``; BOS/EOS/PAD as the project tokenizer defines them, BOS prepended as
  ``engramlm generate`` does);
- ``generation_config.json`` (the same special ids; ids past the tokenizer's vocabulary suppressed, as the
  engine never samples them);
- ``checksums.json`` rewritten for the new ``config.json``.

The directory is built next to ``OUT`` and renamed into place, so a failure leaves nothing behind. It is
itself an engramlm saved model: ``engramlm generate OUT``, ``engramlm store build OUT`` work on it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.models.io import write_checksums
from engramlm.utils.io import atomic_write_json, fsync_path, make_temp_dir

__all__ = ["export_hf", "write_hf_files"]

_COPIED = ("model.safetensors", "engram_hash.safetensors")


def write_hf_files(directory: str | os.PathLike[str], config: Any, generation_config: Any = None) -> None:
    """Merge the HF config into a saved model's ``config.json``, write ``generation_config.json``, re-checksum."""
    out = Path(directory)
    doc = json.loads((out / "config.json").read_text(encoding="utf-8"))
    hf = config.to_diff_dict()
    for key in ("format", "version", "hash_fingerprint", "model"):  # engramlm's own fields stay as saved
        hf.pop(key, None)
    atomic_write_json(out / "config.json", {**doc, **hf})
    if generation_config is not None:
        generation_config.save_pretrained(out)
    write_checksums(out)


def _special_ids(tok: Any) -> dict[str, int | None]:
    """BOS/EOS/PAD as the project tokenizer defines them (ids 0/1/2), else none (e.g. a DeepSeek tokenizer)."""
    from engramlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

    if [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]:
        return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _write_tokenizer(tok_path: Path, tok: Any, ids: dict[str, int | None], out: Path, max_len: int) -> None:
    from transformers import PreTrainedTokenizerFast

    names = {k.removesuffix("_id"): (None if v is None else tok.id_to_token(v)) for k, v in ids.items()}
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        bos_token=names["bos_token"],
        eos_token=names["eos_token"],
        pad_token=names["pad_token"],
        add_bos_token=names["bos_token"] is not None,
        clean_up_tokenization_spaces=False,
        model_max_length=max_len,
    )
    # tokenizer.json gets a post-processor that prepends BOS (HF reads add_bos_token from it, not from
    # tokenizer_config.json); the vocabulary, hence the compression map, is the training tokenizer's.
    fast.save_pretrained(out)
    doc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    doc["add_bos_token"] = names["bos_token"] is not None  # for readers; save_pretrained leaves it out
    atomic_write_json(out / "tokenizer_config.json", doc)


def export_hf(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None
) -> Path:
    """Write the HF export of the model at ``source`` (run, checkpoint or saved model) to ``out``; returns it.

    ``tokenizer``: the tokenizer.json (or known name) it was trained with, if it is not found next to the
    model or its data (a foreign one is refused). ``out`` must not exist, or be an empty directory.
    """
    from transformers import GenerationConfig

    from engramlm.hf.configuration import EngramConfig
    from engramlm.models.io import NO_ENGRAM
    from engramlm.models.locate import find_tokenizer, load_trained_model, read_tokenizer

    dst = Path(out)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"{dst} exists and is not an empty directory; choose a new OUT for the export", "OUT")
    trained = load_trained_model(source)  # every file checked against its recorded sha256
    model, files = trained.model, trained.files
    tok_path = find_tokenizer(files, model, explicit=tokenizer)
    tok = read_tokenizer(tok_path)
    ids = _special_ids(tok)
    fingerprint = model.layout.fingerprint if model.layout is not None else NO_ENGRAM
    config = EngramConfig.from_model_config(model.config, fingerprint, **ids)
    generation = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok < model.config.vocab_size:  # a padded embedding: ids the tokenizer cannot decode or hash
        generation.suppress_tokens = list(range(n_tok, model.config.vocab_size))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(dst.parent, f".{dst.name}.export-")
    try:
        for name in _COPIED:
            if (files.model_dir / name).is_file():
                shutil.copyfile(files.model_dir / name, tmp / name)
                fsync_path(tmp / name)
        shutil.copyfile(files.config_file, tmp / "config.json")
        write_hf_files(tmp, config, generation)
        _write_tokenizer(tok_path, tok, ids, tmp, model.config.max_seq_len)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(tmp, dst)
        fsync_path(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
