"""Overlap-tile on in-memory arrays against one forward pass over the whole mirror-padded image."""

import numpy as np
import pytest
import torch

from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import gaussian_window, overlap_tile, plan_tiles, predict_whole
from pipeline.numerics.unet import UNet

from conftest import cells


def net(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(**{"base_channels": 4, **kwargs}).eval()


PAPER = net()  # depth 5: tiles on the 16-px grid, margin 92


@pytest.mark.parametrize("shape", [(333, 270), (97, 401), (5, 7), (1, 1)])
@pytest.mark.parametrize("tile", [204, 236, 317, 600])
@pytest.mark.parametrize("mirror", ["reflect", "symmetric"])
def test_tiled_equals_whole_image_2d(shape, tile, mirror):
    image = cells(shape, dtype=np.float32)[None]
    whole = predict_whole(PAPER, image, mirror)
    tiled = overlap_tile(PAPER, image, tile_size=tile, batch_size=3, mirror=mirror)
    assert tiled.shape == (2, *shape)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 41, 29), (9, 70, 13)])
@pytest.mark.parametrize("tile", [44, 60, (52, 44, 76)])
def test_tiled_equals_whole_image_3d(shape, tile):
    model = net(dims=3, depth=3, base_channels=2)
    image = cells(shape, dtype=np.float32)[None]
    np.testing.assert_allclose(overlap_tile(model, image, tile, batch_size=2), predict_whole(model, image), atol=1e-5)


def test_multichannel_input_and_many_classes():
    model = net(in_channels=3, num_classes=5, depth=3)
    image = np.stack([cells((90, 77), seed=s, dtype=np.float32) for s in range(3)])
    np.testing.assert_allclose(overlap_tile(model, image, 60), predict_whole(model, image), atol=1e-5)


def test_image_smaller_than_one_tile_uses_one_tile():
    plan = plan_tiles(PAPER, Box.from_shape((50, 30)), 1212)
    assert len(plan.tiles) == 1


def test_tile_outputs_start_on_the_16_grid_and_overlap_by_4():
    plan = plan_tiles(PAPER, Box((2048, 4096), (2048, 1000)), 572)
    for tile in plan.tiles:
        assert all(o % 16 == 0 for o in tile.output.offset)
        assert all((s - 4) % 16 == 0 for s in tile.output.shape)
        assert tile.input == tile.output.grow(92)
    ys = sorted({t.output.offset[0] for t in plan.tiles})
    assert ys[1] - ys[0] == plan.tiles[0].output.shape[0] - 4
    # the plan covers the region with little waste: < one 16-px step per tile and axis
    covered = plan.tiles[0].output
    for t in plan.tiles[1:]:
        covered = covered.union(t.output)
    assert covered.contains(plan.region)
    per_axis = [len({t.output.offset[a] for t in plan.tiles}) for a in range(2)]
    assert all(c - r < 16 * n + 4 for c, r, n in zip(covered.shape, plan.region.shape, per_axis))


def test_too_small_tile_is_refused():
    with pytest.raises(ValueError, match="smallest is 204"):
        plan_tiles(PAPER, Box.from_shape((100, 100)), 190)


def test_same_padding_blend_has_no_seams():
    """Blended same-padding tiles: the error against whole-image inference is no larger at
    tile seams than away from them (same-padding tiles cannot be exact)."""
    model = net(depth=4, padding="same")
    image = cells((400, 352), dtype=np.float32)[None]
    whole = predict_whole(model, image, context=64)
    for tile in (96, 128):
        tiled = overlap_tile(model, image, tile)
        err = np.abs(tiled - whole).max(axis=0)
        seam = np.zeros(err.shape, bool)
        for t in plan_tiles(model, Box.from_shape(err.shape), tile).tiles:
            for axis in range(2):
                for edge in (t.output.offset[axis], t.output.stop[axis]):
                    if 0 < edge < err.shape[axis]:
                        index = [slice(None)] * 2
                        index[axis] = slice(edge - 2, edge + 2)
                        seam[tuple(index)] = True
        inner = np.zeros(err.shape, bool)
        inner[40:-40, 40:-40] = True  # the image border has its own (mirror) error
        assert err[seam & inner].mean() <= err[~seam & inner].mean()
        assert err[seam & inner].max() <= err[~seam & inner].max()
        assert err.mean() < 0.01


def test_gaussian_window_peaks_in_the_middle_and_is_positive():
    w = gaussian_window((32, 48))
    assert w.max() == w[15:17, 23:25].max() == pytest.approx(1.0, abs=1e-3)
    assert w.min() > 0
