"""Paged KV cache bookkeeping: which pool blocks are free, cached or in use, and each sequence's block table.

The pool itself (`[layers, 2, num_blocks, kv_heads, block_size, head_dim]`, see DESIGN.md) is a
plain array owned by the executor; this module only hands out block numbers. A token at
position `p` of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.

A block is free, private to one sequence (being filled), or held by the prefix cache
(`prefix_cache.PrefixCache`: full blocks, shared and reference-counted). Cached blocks that no
sequence references are reclaimed, least recently used first, when the free list runs out.
"""

from __future__ import annotations

import numpy as np

from llmirc.errors import LlmircError, RuntimeLimitError

from .prefix_cache import Node, PrefixCache


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def cache_full_error(needed: int, free: int, num_blocks: int) -> RuntimeLimitError:
    return RuntimeLimitError(
        f"KV cache full: {needed} more block(s) needed but only {free} of its {num_blocks} blocks "
        f"are free; load the model with a larger KV cache (--kv-cache-tokens, load(kv_cache_tokens=...)) "
        f"or run fewer sequences at once"
    )


class BlockAllocator:
    """The pool's block numbers: a free list, plus the prefix cache's evictable blocks when caching is on."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise LlmircError(f"the KV cache needs at least 1 block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        # A stack: low block numbers first, recently freed blocks reused first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()
        self.cache = PrefixCache(block_size, self._free_one) if enable_prefix_caching else None

    @property
    def num_free(self) -> int:
        """Blocks on the free list (not counting evictable cached blocks)."""
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Blocks that can be allocated now: free ones plus cached ones no sequence uses."""
        return len(self._free) + (self.cache.num_evictable if self.cache else 0)

    def can_allocate(self, n: int = 1) -> bool:
        return n <= self.num_available

    def allocate(self) -> int:
        if not self._free and self.cache:
            self.cache.evict(1)
        if not self._free:
            raise cache_full_error(1, 0, self.num_blocks)
        block = self._free.pop()
        self._used.add(block)
        return block

    def free(self, blocks) -> None:
        for block in blocks:
            self._free_one(block)

    def _free_one(self, block: int) -> None:
        if block not in self._used:  # a double free would hand one block to two sequences
            raise ValueError(f"block {block} is not allocated")
        self._used.remove(block)
        self._free.append(block)


class SequenceBlocks:
    """The block table of one sequence: cached nodes it shares first, then its private blocks.

    Grows on demand, released all at once."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size
        self.block_table: list[int] = []
        self.nodes: list[Node] = []  # prefix-cache nodes held: block_table[:len(nodes)]

    @property
    def capacity(self) -> int:
        """Tokens the allocated blocks can hold."""
        return len(self.block_table) * self.block_size

    def adopt(self, nodes: list[Node]) -> None:
        """Start the (empty) table with cached blocks holding the sequence's first tokens."""
        assert not self.block_table
        self.allocator.cache.acquire(nodes)
        self.nodes = list(nodes)
        self.block_table = [n.block for n in nodes]

    def blocks_needed(self, num_tokens: int) -> int:
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.block_table))

    def ensure_capacity(self, num_tokens: int) -> None:
        """Allocate blocks so positions 0..num_tokens-1 have slots; all or nothing."""
        needed = self.blocks_needed(num_tokens)
        if needed == 0:
            return
        if not self.allocator.can_allocate(needed):
            raise cache_full_error(needed, self.allocator.num_available, self.allocator.num_blocks)
        self.block_table.extend(self.allocator.allocate() for _ in range(needed))

    def cache_full_blocks(self, tokens: list[int], num_computed: int) -> None:
        """Hand every block whose K/V is complete (`num_computed` tokens written) to the prefix cache.

        When another sequence cached the same block first, this one switches to the shared copy
        and frees its own (their contents are equal)."""
        cache = self.allocator.cache
        if cache is None:
            return
        bs = self.block_size
        for i in range(len(self.nodes), num_computed // bs):
            parent = self.nodes[-1] if self.nodes else None
            node = cache.insert(parent, tuple(tokens[i * bs:(i + 1) * bs]), self.block_table[i])
            if node.block != self.block_table[i]:
                self.allocator.free([self.block_table[i]])
                self.block_table[i] = node.block
            self.nodes.append(node)

    def slot(self, position: int) -> int:
        if not 0 <= position < self.capacity:
            raise IndexError(f"position {position} is outside the {self.capacity} allocated slots")
        return self.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, start: int, n: int) -> list[int]:
        """The slots of positions start..start+n-1 (`slot` of each; a prefill chunk's at once)."""
        if n < 64:
            return [self.slot(p) for p in range(start, start + n)]
        if start < 0 or start + n > self.capacity:
            raise IndexError(f"positions {start}..{start + n - 1} are outside the {self.capacity} allocated slots")
        p = np.arange(start, start + n)
        return (np.asarray(self.block_table)[p // self.block_size] * self.block_size + p % self.block_size).tolist()

    def release(self) -> None:
        if self.nodes:
            self.allocator.cache.release(self.nodes)
        self.allocator.free(self.block_table[len(self.nodes):])
        self.block_table, self.nodes = [], []
