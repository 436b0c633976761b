"""Document-level split rules: which split a whole document belongs to, decided by its id alone.

Splitting by document (never by line or token window) keeps held-out text unseen (data.md §0);
rules are pure functions of the sorted id list, so every build assigns the same splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")

HASH_RULE = "sha256(utf-8 document id) as integer mod 10: 0 -> val, 1 -> test, 2..9 -> train"
SOTU_RULE = (
    "year >= 2000 -> val; among pre-2000 files in sorted filename order, 0-based index % 10 == 9 -> test; else train"
)


def hash_split(doc_id: str) -> str:
    """Stable split of one document from its relative path / id (about 80/10/10)."""
    bucket = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest(), 16) % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def hash_splits(doc_ids: Sequence[str]) -> list[str]:
    """:func:`hash_split` for every id."""
    return [hash_split(i) for i in doc_ids]


def sotu_year(doc_id: str) -> int:
    """Year of a SOTU file named ``{year}_{president}_{party}.txt``."""
    return int(doc_id.split("_", 1)[0])


def sotu_splits(doc_ids: Sequence[str]) -> list[str]:
    """data.md §1 split: needs the full id list because test picks every 10th pre-2000 file."""
    pre2000 = sorted(i for i in doc_ids if sotu_year(i) < 2000)
    test = {name for k, name in enumerate(pre2000) if k % 10 == 9}
    return ["val" if sotu_year(i) >= 2000 else "test" if i in test else "train" for i in doc_ids]


# Share of a ``max_bytes`` tiny-slice budget given to each split.
SLICE_SHARE = {"train": 0.8, "val": 0.1, "test": 0.1}


def slice_budget(sizes: Sequence[int], splits: Sequence[str], max_bytes: int) -> list[bool]:
    """Keep-mask for a tiny slice: per split, whole documents in order that fit in its share.

    Documents are never cut, so one that does not fit is skipped; a split whose documents all
    exceed its share keeps its first one, so a slice always has every split the source has.
    """
    used = dict.fromkeys(SPLITS, 0)
    first: dict[str, int] = {}
    keep = []
    for i, (size, split) in enumerate(zip(sizes, splits, strict=True)):
        first.setdefault(split, i)
        ok = used[split] + size <= SLICE_SHARE[split] * max_bytes
        keep.append(ok)
        if ok:
            used[split] += size
    for split, i in first.items():
        if used[split] == 0:
            keep[i] = True
    return keep
