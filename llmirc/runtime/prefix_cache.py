"""Automatic prefix caching: a radix tree over full KV blocks (SGLang's RadixAttention, at block
granularity as in vLLM's automatic prefix caching).

Each node is one full block of `block_size` tokens; its path from the root is the token prefix
whose K/V the block holds (the K/V of a token depends only on the tokens before it, and its
position is its index in that prefix). Requests that share a prefix share its blocks.

Nodes are reference-counted: a running sequence holds a reference on every node of its path,
so a referenced node's ancestors are referenced too and every unreferenced node heads an
unreferenced subtree. Unreferenced nodes stay cached until their block is needed: the pool
then evicts unreferenced leaves, least recently used first (a lazily invalidated heap keyed by
last use). Blocks that are not full are never cached; a sequence keeps those to itself.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Node:
    __slots__ = ("key", "block", "parent", "children", "ref", "last_use")

    def __init__(self, key: tuple[int, ...], block: int, parent: Node | None):
        self.key, self.block, self.parent = key, block, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.ref = 0
        self.last_use = 0


class PrefixCache:
    """The tree; `free_block` returns an evicted node's block to the pool's free list."""

    def __init__(self, block_size: int, free_block: Callable[[int], None]):
        self.block_size = block_size
        self.root = Node((), -1, None)
        self.root.ref = 1  # never evicted
        self._free_block = free_block
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []  # (last_use, tie, node): evictable leaf candidates
        self._tie = itertools.count()
        self.num_cached = 0  # blocks held by nodes
        self.num_evictable = 0  # nodes with no reference
        self.queried_tokens = 0  # prompt tokens looked up, and found (for the hit rate)
        self.hit_tokens = 0

    def match(self, tokens: list[int], max_tokens: int) -> list[Node]:
        """The nodes of the longest cached prefix of `tokens`, at most `max_tokens` long (whole blocks)."""
        nodes, node, bs = [], self.root, self.block_size
        for start in range(0, max_tokens - bs + 1, bs):
            node = node.children.get(tuple(tokens[start:start + bs]))
            if node is None:
                break
            nodes.append(node)
        return nodes

    def record_lookup(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def acquire(self, nodes: list[Node]) -> None:
        now = next(self._clock)
        for node in nodes:
            if node.ref == 0:
                self.num_evictable -= 1
            node.ref += 1
            node.last_use = now

    def release(self, nodes: list[Node]) -> None:
        now = next(self._clock)
        for node in reversed(nodes):  # leaf first: a parent is used at least as recently as its child
            node.ref -= 1
            node.last_use = now
            if node.ref == 0:
                self.num_evictable += 1
                if not node.children:
                    self._push(node)

    def insert(self, parent: Node | None, key: tuple[int, ...], block: int) -> Node:
        """Cache `block` (holding `key`'s K/V after `parent`'s prefix) and return its node, acquired.

        When that block is cached already (another sequence computed the same tokens), the
        existing node is returned instead; the caller then frees its own copy and uses this one."""
        parent = parent or self.root
        node = parent.children.get(key)
        if node is None:
            node = parent.children[key] = Node(key, block, parent)
            self.num_cached += 1
            self.num_evictable += 1  # acquired just below
        self.acquire([node])
        return node

    def evict(self, count: int) -> int:
        """Free up to `count` unreferenced blocks, least recently used leaves first; returns how many."""
        freed = 0
        while freed < count and self._heap:
            last_use, _, node = heapq.heappop(self._heap)
            if node.ref or node.children or node.last_use != last_use or node.parent is None:
                continue  # stale entry: used again, grown, or evicted already
            del node.parent.children[node.key]
            parent, node.parent = node.parent, None
            self._free_block(node.block)
            self.num_cached -= 1
            self.num_evictable -= 1
            freed += 1
            if parent is not self.root and parent.ref == 0 and not parent.children:
                self._push(parent)
        return freed

    def _push(self, node: Node) -> None:
        heapq.heappush(self._heap, (node.last_use, next(self._tie), node))
        if len(self._heap) > 4 * max(self.num_cached, 64):  # drop stale entries now and then
            self._heap = [e for e in self._heap if e[2].ref == 0 and not e[2].children and e[2].parent is not None
                          and e[2].last_use == e[0]]
            heapq.heapify(self._heap)
