"""Token classes for per-class evaluation, defined for both prose and code.

Three independent families, each a label per scored target, computed from per-vocabulary tables
(one pass over the ~8k vocabulary, never over the split) and indexed with the target/input ids:

* ``kind`` (what the target token is, from its decoded text with surrounding whitespace stripped):
  ``special`` (BOS/EOS/PAD, 0 bytes), ``whitespace`` (only spaces/tabs/newlines: indentation and
  line breaks in code), ``number`` (digits only), ``word`` (letters, digits and ``_`` with at least
  one letter: English words and identifiers alike), ``punct`` (no letter or digit: operators,
  brackets, quotes), ``mixed`` (both, e.g. ``.append`` or ``("``).
  A byte-level fragment of a multi-byte character decodes to U+FFFD alone and counts as ``punct``.
* ``position`` (only for targets with a letter or digit): ``continuation`` when the target's first
  character and the previous token's last character are both word characters (``[A-Za-z0-9_]`` or
  any Unicode letter), i.e. the target continues a word split by BPE; otherwise ``word_start``.
  Others get ``none``. This is where n-gram memory should matter most: completing a word is
  almost deterministic given its first pieces.
* ``freq`` (target's rank by unigram frequency in the reference counts, normally the train split):
  ``rank_1-64``, ``rank_65-512``, ``rank_513-4096``, ``rank_4097+`` and ``unseen`` (count 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KINDS = ("special", "whitespace", "number", "word", "punct", "mixed")
POSITIONS = ("word_start", "continuation", "none")
FREQ_EDGES = (64, 512, 4096)
FREQ_BUCKETS = ("rank_1-64", "rank_65-512", "rank_513-4096", "rank_4097+", "unseen")


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def vocab_kinds(texts: Sequence[str], token_bytes: np.ndarray) -> np.ndarray:
    """Kind index (into ``KINDS``) per vocabulary id."""
    out = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):  # once per vocabulary entry, not per token
        s = t.strip()
        if i < token_bytes.shape[0] and token_bytes[i] == 0:
            k = "special"
        elif not s:
            k = "whitespace"
        elif s.isdigit():
            k = "number"
        elif all(_is_word_char(c) for c in s) and any(c.isalpha() for c in s):
            k = "word"
        elif not any(c.isalnum() for c in s):
            k = "punct"
        else:
            k = "mixed"
        out[i] = KINDS.index(k)
    return out


def vocab_edges(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per id: starts with a word character, ends with one, contains a letter or digit."""
    starts = np.fromiter((bool(t) and _is_word_char(t[0]) for t in texts), dtype=bool, count=len(texts))
    ends = np.fromiter((bool(t) and _is_word_char(t[-1]) for t in texts), dtype=bool, count=len(texts))
    alnum = np.fromiter((any(c.isalnum() for c in t) for t in texts), dtype=bool, count=len(texts))
    return starts, ends, alnum


def freq_bucket_table(counts: np.ndarray) -> np.ndarray:
    """Bucket index (into ``FREQ_BUCKETS``) per id from reference unigram counts (rank 1 = most frequent)."""
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(1, counts.shape[0] + 1)
    bucket = np.searchsorted(np.asarray(FREQ_EDGES), rank, side="left")
    bucket[counts == 0] = len(FREQ_BUCKETS) - 1
    return bucket


class TokenClasses:
    """Per-vocabulary tables; ``label(inputs, targets)`` gives each family's label arrays."""

    def __init__(self, texts: Sequence[str], token_bytes: np.ndarray, counts: np.ndarray) -> None:
        n = len(texts)
        tb = np.zeros(n, dtype=np.int64)
        tb[: min(n, token_bytes.shape[0])] = token_bytes[:n]
        self.kind = vocab_kinds(texts, tb)
        self.starts, self.ends, self.alnum = vocab_edges(texts)
        c = np.zeros(n, dtype=np.int64)
        c[: min(n, counts.shape[0])] = counts[:n]
        self.freq = freq_bucket_table(c)

    def label(self, inputs: np.ndarray, targets: np.ndarray) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        """family -> (label index per target, label names)."""
        cont = self.starts[targets] & self.ends[inputs]
        pos = np.where(self.alnum[targets], np.where(cont, 1, 0), 2)
        return {
            "kind": (self.kind[targets], KINDS),
            "position": (pos, POSITIONS),
            "freq": (self.freq[targets], FREQ_BUCKETS),
        }
