import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.numerics.geometry import Box, block_grid, iter_blocks, mirror_indices


def test_box_grow_shift_intersect_union():
    b = Box((10, 20), (30, 40))
    assert b.stop == (40, 60)
    assert b.grow(5) == Box((5, 15), (40, 50))
    assert b.grow((1, 2), (3, 4)) == Box((9, 18), (34, 46))
    assert b.shift((-10, 5)) == Box((0, 25), (30, 40))
    assert b.intersect(Box((35, 0), (100, 30))) == Box((35, 20), (5, 10))
    assert b.intersect(Box((100, 100), (1, 1))).empty
    assert b.union(Box((0, 0), (1, 1))) == Box((0, 0), (40, 60))
    assert Box((-3, 5), (10, 10)).clip((4, 12)) == Box((0, 5), (4, 7))


def test_snap_grows_to_grid():
    assert Box((17, -3), (10, 20)).snap(16) == Box((16, -16), (16, 48))


def test_relative_to_cuts_inner_box_out_of_outer_array():
    outer = Box((-5, 10), (20, 20))
    inner = Box((0, 12), (3, 4))
    array = np.arange(400).reshape(20, 20)
    assert array[inner.relative_to(outer)].shape == (3, 4)
    assert array[inner.relative_to(outer)][0, 0] == array[5, 2]
    with pytest.raises(ValueError):
        outer.relative_to(inner)


@pytest.mark.slow  # 1-7 s: up to 50³ arrays in blocks of 1
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=3), st.integers(1, 20))
def test_blocks_tile_the_array_exactly_once(shape, block):
    count = np.zeros(shape, dtype=int)
    blocks = list(iter_blocks(shape, (block,) * len(shape)))
    assert len(blocks) == np.prod(block_grid(shape, (block,) * len(shape)))
    for b in blocks:
        assert all(o % block == 0 for o in b.write.offset)  # chunk-aligned
        count[b.write.slices()] += 1
    assert (count == 1).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.integers(0, 40), st.sampled_from(["reflect", "symmetric"]))
def test_mirror_indices_match_numpy_pad(size, before, after, mode):
    data = np.arange(size)
    expected = np.pad(data, (before, after), mode=mode)
    assert (data[mirror_indices(-before, size + after, size, mode)] == expected).all()
