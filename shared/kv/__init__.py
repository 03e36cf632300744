"""Paged KV cache bookkeeping: block hashes, the block pool, per-request block tables (no torch)."""

from splitserve.shared.kv.block_hash import BlockHash, hash_block_tokens, hash_prompt_blocks
from splitserve.shared.kv.block_pool import BlockPool, NoFreeBlocksError
from splitserve.shared.kv.kv_cache_manager import KVCacheManager

__all__ = [
    "BlockHash",
    "BlockPool",
    "KVCacheManager",
    "NoFreeBlocksError",
    "hash_block_tokens",
    "hash_prompt_blocks",
]
