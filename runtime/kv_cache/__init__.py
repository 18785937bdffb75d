"""Paged KV cache: block bookkeeping (ids, ref counts, prefix hashes) and the device-resident pool."""
from runtime.kv_cache.block_manager import (Block, BlockManager, KVIntegrityError, NoFreeBlocks,
                                            block_hash)
from runtime.kv_cache.pool import MODES, KVPool, KVShape, blocks_for_budget

__all__ = ["Block", "BlockManager", "KVIntegrityError", "NoFreeBlocks", "block_hash",
           "MODES", "KVPool", "KVShape", "blocks_for_budget"]
