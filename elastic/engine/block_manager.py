"""KV-cache block allocation with prefix caching of full blocks.

A full block is identified by the hash of (previous block's hash, its tokens). Freed blocks keep their
hash and stay findable until the allocator hands them out again (least recently freed first).
"""
from __future__ import annotations

from elastic.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered set, LRU first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_hash(self, req: Request, index: int) -> int:
        parent = req.block_hashes[index - 1] if index else 0
        tokens = tuple(req.all_token_ids[index * self.block_size:(index + 1) * self.block_size])
        return hash((parent, tokens))

    def allocate_cached_prefix(self, req: Request) -> None:
        """Reuse cached blocks for the leading full blocks of a new request; at least one token stays
        to compute, so the last prompt position still yields logits."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed
        bs = self.block_size
        for index in range((req.num_tokens - 1) // bs):
            h = self._full_block_hash(req, index)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tuple(req.all_token_ids[index * bs:(index + 1) * bs]):
                break
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            req.block_table.append(block)
            req.block_hashes.append(h)
        req.num_hashed_blocks = len(req.block_table)
        req.num_computed_tokens = req.num_cached_tokens = len(req.block_table) * bs

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `req`; False (and no change) if blocks run out."""
        needed = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block = next(iter(self.free_blocks))
            del self.free_blocks[block]
            if self.block_hash[block] is not None:  # evict its cached content
                self.hash_to_block.pop(self.block_hash[block], None)  # type: ignore[arg-type]
                self.block_hash[block] = self.block_tokens[block] = None
            self.ref_counts[block] = 1
            req.block_table.append(block)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register blocks that became full (and computed) so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for index in range(req.num_hashed_blocks, req.num_computed_tokens // bs):
            h = self._full_block_hash(req, index)
            req.block_hashes.append(h)
            block = req.block_table[index]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = tuple(req.all_token_ids[index * bs:(index + 1) * bs])
        req.num_hashed_blocks = max(req.num_hashed_blocks, req.num_computed_tokens // bs)

    def free(self, req: Request) -> None:
        # Tail blocks first, so a prompt's head outlives its tail in the cache.
        for block in reversed(req.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        req.block_table = []
        req.block_hashes = []
        req.num_hashed_blocks = 0
