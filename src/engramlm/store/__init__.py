"""Tiered Engram table stores: one ``RowTable`` interface over memory, mmap, O_DIRECT, cache, Mooncake
and safetensors files read in place, plus the per-layer ``Prefetcher`` and store directories.
``Tier`` (``store.tiers``) is the one tier vocabulary every CLI, the planner and ``open_store_dir`` share.

Lower layer: imports only ``engramlm.errors``, ``engramlm.utils.io``, numpy and torch.
"""

from engramlm.store.base import RowTable, StoreStats, TableHeader
from engramlm.store.cache import CachedTable
from engramlm.store.direct import DirectFileTable
from engramlm.store.file import StoreHeader, open_store, read_header, verify_store, write_store
from engramlm.store.formats import BF16, FP8, FP32, RowFormat, decode_split, get_format
from engramlm.store.memory import MemoryTable
from engramlm.store.mmap import MmapTable
from engramlm.store.prefetch import Prefetcher, PrefetchHandle
from engramlm.store.safetensors_tables import SafetensorsTable, open_safetensors_tables
from engramlm.store.storedir import export_tables, open_store_dir, read_index
from engramlm.store.tiers import LayerPlacement, Medium, Placement, Tier

__all__ = [
    "BF16",
    "FP8",
    "FP32",
    "CachedTable",
    "DirectFileTable",
    "LayerPlacement",
    "Medium",
    "MemoryTable",
    "MmapTable",
    "Placement",
    "PrefetchHandle",
    "Prefetcher",
    "RowFormat",
    "RowTable",
    "SafetensorsTable",
    "StoreHeader",
    "StoreStats",
    "TableHeader",
    "Tier",
    "decode_split",
    "export_tables",
    "get_format",
    "open_safetensors_tables",
    "open_store",
    "open_store_dir",
    "read_header",
    "read_index",
    "verify_store",
    "write_store",
]
