"""Tiered Engram table stores: one ``RowTable`` interface over memory, mmap, O_DIRECT and cache.

Lower layer: imports only ``engramlm.errors``, ``engramlm.utils.io``, numpy and torch.
"""

from engramlm.store.base import RowTable, StoreStats
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import StoreHeader, open_store, read_header, verify_store, write_store
from engramlm.store.formats import BF16, FP8, FP32, RowFormat, decode_split, get_format
from engramlm.store.memory import MemoryTable
from engramlm.store.mmap import MmapTable

__all__ = [
    "BF16",
    "FP8",
    "FP32",
    "CachedTable",
    "DirectFileTable",
    "MemoryTable",
    "MmapTable",
    "RowFormat",
    "RowTable",
    "StoreHeader",
    "StoreStats",
    "decode_split",
    "get_format",
    "open_store",
    "read_header",
    "verify_store",
    "write_store",
]
