"""The project tokenizer: byte-level BPE trained on the train split only (data.md §3.1 recipe).

Specials come first so BOS/EOS/PAD are ids 0/1/2, the DeepSeek layout, which makes Engram's
``pad_id`` = 2 everywhere. Training only on train text keeps held-out documents unseen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engramlm.errors import CorruptFileError
from engramlm.utils.io import atomic_write_bytes, sha256_bytes

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 8192
MIN_FREQUENCY = 2


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = MIN_FREQUENCY
) -> Tokenizer:
    """Train the recipe's BPE; the vocab may end smaller than asked on a tiny corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_specials(tok)
    return tok


def check_specials(tok: Tokenizer) -> None:
    """Refuse a tokenizer whose specials are not ids 0/1/2."""
    for want, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != want:
            raise CorruptFileError(f"tokenizer: {name} has id {tok.token_to_id(name)}, want {want}")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike[str]) -> str:
    """Write ``tokenizer.json`` atomically and return its sha256 (the manifest pins it)."""
    data = tok.to_str(pretty=True).encode("utf-8")
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a project tokenizer, refusing unreadable files or a wrong special-token layout."""
    try:
        tok = Tokenizer.from_file(str(Path(path)))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise CorruptFileError(f"{path}: not a readable tokenizer.json ({exc})") from exc
    check_specials(tok)
    return tok


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for specials), for exact per-token bits-per-byte.

    In byte-level BPE every character of a token string encodes one byte, so the length of the
    string is the byte count; summing it over a document's tokens gives its UTF-8 size.
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    lengths = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, idx in vocab.items():
        lengths[idx] = 0 if token in SPECIAL_TOKENS else len(token)
    return lengths
