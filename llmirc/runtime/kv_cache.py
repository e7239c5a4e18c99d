"""Paged KV cache bookkeeping: which pool blocks are free, and each sequence's block table.

The pool itself (`[layers, 2, num_blocks, kv_heads, block_size, head_dim]`, see DESIGN.md) is a
plain array owned by the loader; this module only hands out block numbers. A token at position
`p` of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

import numpy as np

from llmirc.errors import LlmircError, RuntimeLimitError


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def cache_full_error(needed: int, free: int, num_blocks: int) -> RuntimeLimitError:
    return RuntimeLimitError(
        f"KV cache full: {needed} more block(s) needed but only {free} of its {num_blocks} blocks "
        f"are free; load the model with a larger KV cache (more blocks) or run fewer sequences at once"
    )


class BlockAllocator:
    """A free list of the pool's block numbers."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise LlmircError(f"the KV cache needs at least 1 block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        # A stack: low block numbers first, recently freed blocks reused first.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int = 1) -> bool:
        return n <= len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise cache_full_error(1, 0, self.num_blocks)
        block = self._free.pop()
        self._used.add(block)
        return block

    def free(self, blocks) -> None:
        for block in blocks:
            if block not in self._used:  # a double free would hand one block to two sequences
                raise ValueError(f"block {block} is not allocated")
            self._used.remove(block)
            self._free.append(block)


class SequenceBlocks:
    """The block table of one sequence; grows on demand, released all at once."""

    def __init__(self, allocator: BlockAllocator, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size
        self.block_table: list[int] = []

    @property
    def capacity(self) -> int:
        """Tokens the allocated blocks can hold."""
        return len(self.block_table) * self.block_size

    def ensure_capacity(self, num_tokens: int) -> None:
        """Allocate blocks so positions 0..num_tokens-1 have slots; all or nothing."""
        needed = blocks_for(num_tokens, self.block_size) - len(self.block_table)
        if needed <= 0:
            return
        if not self.allocator.can_allocate(needed):
            raise cache_full_error(needed, self.allocator.num_free, self.allocator.num_blocks)
        self.block_table.extend(self.allocator.allocate() for _ in range(needed))

    def slot(self, position: int) -> int:
        if not 0 <= position < self.capacity:
            raise IndexError(f"position {position} is outside the {self.capacity} allocated slots")
        return self.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, positions: np.ndarray) -> np.ndarray:
        """Vectorized `slot` for an int array of positions (all within capacity)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and not (0 <= positions.min() and positions.max() < self.capacity):
            raise IndexError(f"positions outside the {self.capacity} allocated slots")
        table = np.asarray(self.block_table, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def release(self) -> None:
        self.allocator.free(self.block_table)
        self.block_table = []
