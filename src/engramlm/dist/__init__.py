"""Distributed Engram: tables sharded by row across ranks, lookups and row gradients by all-to-all.

Layer: above ``models`` (and store), below ``train | infer | analysis``, which drive it.
"""

from engramlm.dist.rows import ExchangeStats, LocalRows, RowShard, exchange_rows, shard_ranges, sum_gradients
from engramlm.dist.tables import ShardedEngramRows, ShardedRowTable

__all__ = [
    "ExchangeStats",
    "LocalRows",
    "RowShard",
    "ShardedEngramRows",
    "ShardedRowTable",
    "exchange_rows",
    "shard_ranges",
    "sum_gradients",
]
