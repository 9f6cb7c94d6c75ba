"""Overlap-tile on in-memory arrays against one forward pass over the whole mirror-padded image."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.numerics.geometry import Box, block_at, block_grid
from pipeline.numerics.tiling import (
    TileGeometry,
    class_labels,
    gaussian_window,
    overlap_tile,
    plan_tiles,
    predict_region,
    predict_whole,
    read_mirrored,
)
from pipeline.numerics.unet import UNet

from conftest import cells


def net(seed: int = 0, **kwargs) -> UNet:
    torch.manual_seed(seed)
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


# --- models that take one input size ------------------------------------------------------------


class FixedSize(torch.nn.Module):
    """A valid U-Net that refuses every input size but one, as an ONNX export with static axes
    does: its geometry says so (``fixed``), with the net's own margin and grid."""

    def __init__(self, net: UNet, output: int):
        super().__init__()
        self.net = net
        self.size = net.min_input_size(output)
        assert net.output_size(self.size) == output

    @property
    def geometry(self) -> TileGeometry:
        g = self.net.geometry
        return replace(g, smallest=self.size - 2 * g.margin, fixed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert all(n == self.size for n in x.shape[2:]), f"input {tuple(x.shape)}: takes {self.size} px only"
        return self.net(x)


class FixedGeometry:
    """Just a geometry, for plans."""

    def __init__(self, geometry: TileGeometry):
        self.geometry = geometry


def test_a_fixed_size_geometry_has_one_valid_size_whatever_is_asked():
    g = TileGeometry(margin=92, factor=16, remainder=4, smallest=388, fixed=True)
    assert g.input_size == 572 and g.is_valid_input(572) and not g.is_valid_input(588)
    assert g.min_input_size(1) == g.min_input_size(5000) == g.max_input_size(300) == g.max_input_size(5000) == 572
    assert g.output_size(572) == 388
    assert PAPER.geometry.input_size is None and not PAPER.geometry.fixed  # range models: as before


@pytest.mark.parametrize("region", [Box((0, 0), (2048, 1000)), Box((37, 5), (3, 2)), Box((1000, 993), (390, 50))])
def test_fixed_size_tiles_have_the_one_size_start_on_the_grid_and_cover_the_region(region):
    g = TileGeometry(margin=92, factor=16, remainder=4, smallest=388, fixed=True)
    for tile_size in (204, 572, 1212):  # ignored: the model takes 572 px only
        plan = plan_tiles(FixedGeometry(g), region, tile_size)
        assert not plan.blend and {t.input.shape for t in plan.tiles} == {(572, 572)}
        assert all(o % 16 == 0 for t in plan.tiles for o in t.output.offset)
        assert all(t.input == t.output.grow(92) for t in plan.tiles)
        covered = plan.tiles[0].output
        for t in plan.tiles[1:]:
            covered = covered.union(t.output)
        assert covered.contains(region)
        per_axis = [len({t.output.offset[a] for t in plan.tiles}) for a in range(2)]
        assert per_axis == [max(1, -(-(n + o % 16 - 388) // 384) + 1) for n, o in zip(region.shape, region.offset)]


@pytest.mark.parametrize("shape, output", [((100, 130), 100), ((90, 77), 36), ((37, 90), 100), ((5, 7), 36)])
def test_fixed_size_tiles_equal_the_whole_image_for_any_block(shape, output):
    """Tiles of the one size, on the net's 4-px grid from the image origin, equal one pass of
    the range net over the whole image: blocks larger and smaller than a tile's output, at the
    image border (mirrored context, many times the image where it is small)."""
    native = net(depth=3, base_channels=2, seed=1)  # seed 0's tiny net has an almost constant output
    fixed = FixedSize(native, output)
    image = cells(shape, dtype=np.float32)[None]
    whole = predict_whole(native, image)
    np.testing.assert_allclose(overlap_tile(fixed, image, tile_size=60, batch_size=2), whole, rtol=0, atol=1e-5)
    blocks = np.zeros_like(whole)
    for index in np.ndindex(*block_grid(shape, (50, 45))):
        block = block_at(index, shape, (50, 45))
        plan = plan_tiles(fixed, block.write, 60)
        padded = read_mirrored(lambda box: image[(slice(None), *box.slices())], plan.read, shape)
        blocks[(slice(None), *block.write.slices())] = predict_region(fixed, plan, padded, batch_size=3)
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-5)


def test_fixed_size_tiles_equal_the_whole_image_3d():
    native = net(dims=3, depth=3, base_channels=2, seed=1)
    fixed = FixedSize(native, 12)
    image = cells((13, 22, 9), dtype=np.float32)[None]
    np.testing.assert_allclose(overlap_tile(fixed, image, 44), predict_whole(native, image), rtol=0, atol=1e-5)


def test_a_fixed_size_blended_model_blends_tiles_of_its_one_size():
    g = TileGeometry(margin=1, factor=1, remainder=0, smallest=38, blend=True, fixed=True)
    plan = plan_tiles(FixedGeometry(g), Box((10, 0), (100, 7)), 64)
    assert plan.blend and {t.input.shape for t in plan.tiles} == {(40, 40)}
    starts = sorted({t.output.offset[0] for t in plan.tiles})
    assert np.diff(starts).tolist() == [19] * (len(starts) - 1)  # half of the 38 px output shared


@pytest.mark.parametrize("classes", [1, 2, 3, 5])
def test_class_labels_are_numpys_argmax_ties_included(classes):
    rng = np.random.default_rng(classes)
    scores = rng.integers(-2, 3, (classes, 2, 40, 30)).astype(np.float32)  # few values: many ties
    labels = class_labels(scores)
    assert labels.dtype == np.uint8 and labels.shape == scores.shape[1:]
    np.testing.assert_array_equal(labels, scores.argmax(axis=0))
    with pytest.raises(ValueError, match="257 classes"):
        class_labels(np.zeros((257, 2, 2), np.float32))
