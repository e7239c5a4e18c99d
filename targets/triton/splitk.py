"""Deterministic split-K in one launch, shared by linear and qlinear.

Each program of a tile computes the partial product of its split of k, stores it to the tile's
slot in `splitk_workspace` (`splitk_arrive`) and counts itself on the tile's int32 counter
(after a CTA barrier; on HIP every thread first releases its own stores at gpu scope, as
s_barrier does not wait for them). The program that arrives last resets the counter to 0 and
sums the partials in split order (`splitk_total`), so the result does not depend on which split
finished first; it then applies the epilogue.

The counters must be zero when the workspace is first used (zero_init) and are zero after every
launch, so calls that run one after another on one stream share a workspace: every variant of a
rule (the loader gives a rule's variants one workspace). So the counters sit at the front, one
per tile of the rule's largest split variant (MAX_TILES, the same in each of its kernels), and
each variant's partial tiles after them: a variant's partials never overwrite another's
counters. Layout, in 4-byte elements: MAX_TILES int32 counters padded to 64 elements (256
bytes), then tiles x SPLIT_K partial tiles of TILE_ELEMS f32.
"""

from __future__ import annotations

import triton
import triton.language as tl


def workspace(variants: list[tuple[int, int, int]]) -> tuple[int, dict]:
    """(MAX_TILES, the `splitk_workspace` buffer) of a rule whose variants are `variants`: (tiles,
    splits, tile elements) each, those of one split needing none. MAX_TILES is the most tiles of
    a split variant (its kernels all take it); the buffer holds that many counters (padded to
    64) and the largest variant's partial tiles."""
    split = [v for v in variants if v[1] > 1]
    max_tiles = max((tiles for tiles, _, _ in split), default=0)
    counters = -(-max_tiles // 64) * 64
    floats = max((counters + tiles * splits * elems for tiles, splits, elems in split), default=0)
    return max_tiles, {"name": "splitk_workspace", "type": "*fp32", "bytes": 4 * floats, "zero_init": True}


@triton.jit
def splitk_arrive(splitk_workspace, acc, offs, tile, split, SPLIT_K: tl.constexpr, MAX_TILES: tl.constexpr,
                  TILE_ELEMS: tl.constexpr, RELEASE_ALL: tl.constexpr, THREADS: tl.constexpr):
    """Stores this split's partial tile `acc` (its elements at `offs`) and counts it; returns how
    many splits of the tile had arrived before (SPLIT_K - 1: this one is the last)."""
    COUNTERS: tl.constexpr = (MAX_TILES + 63) // 64 * 64
    parts = splitk_workspace + COUNTERS + tile.to(tl.int64) * (SPLIT_K * TILE_ELEMS)
    tl.store(parts + split * TILE_ELEMS + offs, acc)
    return arrive(splitk_workspace.to(tl.pointer_type(tl.int32)) + tile, RELEASE_ALL, THREADS)


@triton.jit
def arrive(counter, RELEASE_ALL: tl.constexpr, THREADS: tl.constexpr):
    """Counts this program on `counter` (int32) once all its threads' stores are visible at gpu
    scope; returns the count before it (also for paged_attention's fused split merge)."""
    if RELEASE_ALL:  # every thread's stores released at gpu scope before the barrier
        tl.atomic_add(counter + tl.zeros([THREADS], tl.int32), tl.zeros([THREADS], tl.int32), sem="release",
                      scope="gpu")
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")


@triton.jit
def splitk_total(splitk_workspace, acc, offs, tile, SPLIT_K: tl.constexpr, MAX_TILES: tl.constexpr,
                 TILE_ELEMS: tl.constexpr):
    """For the last program of a tile: resets its counter and returns the sum of its partials
    in split order (`acc` gives the shape)."""
    COUNTERS: tl.constexpr = (MAX_TILES + 63) // 64 * 64
    parts = splitk_workspace + COUNTERS + tile.to(tl.int64) * (SPLIT_K * TILE_ELEMS)
    counter = splitk_workspace.to(tl.pointer_type(tl.int32)) + tile
    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    total = tl.zeros_like(acc)
    for s in range(SPLIT_K):
        total += tl.load(parts + s * TILE_ELEMS + offs, cache_modifier=".cg")
    return total
