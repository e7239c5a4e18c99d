import numpy as np
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
    np.testing.assert_array_equal(seq.slots(np.arange(12)), [seq.slot(p) for p in range(12)])
    all_slots = {seq.slot(p) for p in range(12)} | {other.slot(p) for p in range(8)}
    assert len(all_slots) == 20  # no two live positions share a slot
    with pytest.raises(IndexError):
        seq.slot(12)
    seq.release()
    assert seq.block_table == [] and alloc.num_free == 8 - 2


def test_ensure_capacity_is_all_or_nothing():
    alloc = BlockAllocator(3)
    seq = SequenceBlocks(alloc, 2)
    with pytest.raises(RuntimeLimitError, match="4 more block"):
        seq.ensure_capacity(8)
    assert seq.block_table == [] and alloc.num_free == 3
