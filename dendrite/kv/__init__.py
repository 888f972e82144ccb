"""Paged KV memory: the page pool and the KV tree of segments with O(1) fork."""

from dendrite.kv.pool import PagePool, PoolConfig
from dendrite.kv.tree import KVBranch, KVTree, Segment, TreeStats

__all__ = ["KVBranch", "KVTree", "PagePool", "PoolConfig", "Segment", "TreeStats"]
