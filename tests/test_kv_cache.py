import pytest

from llmirc.errors import LlmircError, RuntimeLimitError
from llmirc.runtime.kv_cache import BlockAllocator, SequenceBlocks, blocks_for


def test_allocate_and_free_round_trip():
    alloc = BlockAllocator(4)
    got = [alloc.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3] and alloc.num_free == 0
    assert not alloc.can_allocate(1) and alloc.can_allocate(0)
    alloc.free(got[:2])
    assert alloc.num_free == 2 and alloc.can_allocate(2) and not alloc.can_allocate(3)
    assert sorted(alloc.allocate() for _ in range(2)) == sorted(got[:2])


def test_running_out_names_sizes_and_remedy():
    alloc = BlockAllocator(2)
    alloc.allocate(), alloc.allocate()
    with pytest.raises(RuntimeLimitError, match=r"1 more block.*0 of its 2 blocks.*larger KV cache.*fewer sequences"):
        alloc.allocate()


def test_double_free_and_bad_size_are_refused():
    alloc = BlockAllocator(2)
    b = alloc.allocate()
    alloc.free([b])
    with pytest.raises(ValueError):
        alloc.free([b])
    with pytest.raises(LlmircError):
        BlockAllocator(0)


def test_sequence_blocks_grow_map_slots_and_release():
    alloc = BlockAllocator(8)
    other = SequenceBlocks(alloc, 4)
    other.ensure_capacity(3)  # interleave so the sequence's blocks are not contiguous
    seq = SequenceBlocks(alloc, 4)
    seq.ensure_capacity(1)
    other.ensure_capacity(5)
    seq.ensure_capacity(9)
    assert len(seq.block_table) == 3 == blocks_for(9, 4) and seq.capacity == 12
    seq.ensure_capacity(7)  # never shrinks
    assert len(seq.block_table) == 3
    for pos in range(12):
        assert seq.slot(pos) == seq.block_table[pos // 4] * 4 + pos % 4
    all_slots = {seq.slot(p) for p in range(12)} | {other.slot(p) for p in range(8)}
    assert len(all_slots) == 20  # no two live positions share a slot
    with pytest.raises(IndexError):
        seq.slot(12)
    seq.release()
    assert seq.block_table == [] and alloc.num_free == 8 - 2


def test_slots_of_a_long_chunk_match_slot():
    """`slots` (NumPy from 64 positions on) gives each position's `slot`, and refuses the same."""
    alloc = BlockAllocator(64)
    a, b = SequenceBlocks(alloc, 16), SequenceBlocks(alloc, 16)
    for n in (16, 40, 100, 200):  # interleaved: a's blocks are not contiguous
        a.ensure_capacity(n)
        b.ensure_capacity(n)
    for start, n in ((0, 200), (5, 64), (37, 63), (199, 1), (0, 0)):
        assert a.slots(start, n) == [a.slot(p) for p in range(start, start + n)]
    for start, n in ((150, 64), (190, 20), (-1, 70), (145, 64)):  # (208 slots: 145 + 64 reaches one past)
        with pytest.raises(IndexError, match="outside the 208 allocated slots"):
            a.slots(start, n)


def test_ensure_capacity_is_all_or_nothing():
    alloc = BlockAllocator(3)
    seq = SequenceBlocks(alloc, 2)
    with pytest.raises(RuntimeLimitError, match="4 more block"):
        seq.ensure_capacity(8)
    assert seq.block_table == [] and alloc.num_free == 3


# -- the prefix cache ---------------------------------------------------------------------------

def cached_sequence(alloc, tokens, block_size=2):
    """A sequence that computed `tokens` and handed its full blocks to the cache."""
    seq = SequenceBlocks(alloc, block_size)
    seq.adopt(alloc.cache.match(tokens, len(tokens)))
    seq.ensure_capacity(len(tokens))
    seq.cache_full_blocks(tokens, len(tokens))
    return seq


def test_prefix_cache_shares_counts_and_frees_blocks():
    alloc = BlockAllocator(8, 2, enable_prefix_caching=True)
    a = cached_sequence(alloc, [1, 2, 3, 4, 5])  # blocks (1,2), (3,4) cached; 5 private
    a_blocks = list(a.block_table[:2])
    assert alloc.cache.num_cached == 2 and len(a.nodes) == 2 and alloc.num_free == 5
    b = cached_sequence(alloc, [1, 2, 3, 9])  # shares (1,2); (3,9) is new
    assert b.block_table[0] == a_blocks[0] and b.block_table[1] != a_blocks[1]
    assert [n.ref for n in a.nodes] == [2, 1] and alloc.cache.num_cached == 3
    a.release()
    assert alloc.cache.num_evictable == 1 and alloc.num_available == 8 - 2  # (3,4) cached, unused
    b.release()
    assert alloc.cache.num_evictable == 3 and alloc.num_available == 8 and alloc.num_free == 5
    assert [n.block for n in alloc.cache.match([1, 2, 3, 4, 7], 5)] == a_blocks  # still cached after release


def test_prefix_cache_match_respects_the_limit_and_whole_blocks():
    alloc = BlockAllocator(8, 2, enable_prefix_caching=True)
    cached_sequence(alloc, [1, 2, 3, 4, 5, 6]).release()
    cache = alloc.cache
    assert len(cache.match([1, 2, 3, 4, 5, 6], 6)) == 3
    assert len(cache.match([1, 2, 3, 4, 5, 6], 5)) == 2  # never past the limit
    assert len(cache.match([1, 2, 3, 5, 5, 6], 6)) == 1  # diverges in block 2
    assert cache.match([2, 2], 2) == []


def test_eviction_frees_least_recently_used_unreferenced_leaves_first():
    alloc = BlockAllocator(6, 2, enable_prefix_caching=True)
    cached_sequence(alloc, [1, 2, 3, 4]).release()  # chain A: 2 blocks
    cached_sequence(alloc, [5, 6]).release()  # chain B: 1 block
    held = cached_sequence(alloc, [7, 8])  # chain C: referenced, never evicted
    touched = SequenceBlocks(alloc, 2)
    touched.adopt(alloc.cache.match([1, 2], 2))  # A's first block used again: newer than B
    touched.release()
    assert alloc.num_free == 2 and alloc.cache.num_evictable == 3
    assert alloc.cache.evict(1) == 1  # A's leaf (3,4): last used with A, before B and before the touch
    assert len(alloc.cache.match([1, 2, 3, 4], 4)) == 1 and len(alloc.cache.match([5, 6], 2)) == 1
    assert alloc.cache.evict(1) == 1  # then B, older than A's first block
    assert alloc.cache.match([5, 6], 2) == [] and len(alloc.cache.match([1, 2], 2)) == 1
    assert alloc.cache.evict(5) == 1  # A's first block; C is referenced
    assert alloc.num_free == 5 and alloc.cache.num_cached == 1 and held.nodes[0].ref == 1


def test_allocation_evicts_when_the_free_list_runs_out():
    alloc = BlockAllocator(4, 2, enable_prefix_caching=True)
    cached_sequence(alloc, [1, 2, 3, 4, 5, 6, 7, 8]).release()
    assert alloc.num_free == 0 and alloc.num_available == 4
    seq = SequenceBlocks(alloc, 2)
    seq.ensure_capacity(6)
    assert alloc.cache.num_cached == 1 and len(seq.block_table) == 3
    with pytest.raises(RuntimeLimitError, match="2 more block"):
        SequenceBlocks(alloc, 2).ensure_capacity(4)  # the last cached block alone is not enough: nothing taken
    assert alloc.cache.num_cached == 1
