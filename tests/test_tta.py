"""Test-time augmentation exact under tiling (issue 16): each transformed image is tiled from
its own origin, so the tiled, averaged probabilities equal the same augmentation applied to
whole-image inference, for any block and tile size, in 2-D and 3-D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.numerics.geometry import Box
from pipeline.numerics.tta import TRANSFORMS, predict_region_tta, predict_whole_tta, transforms
from pipeline.numerics.unet import UNet

from conftest import cells


def net(dims: int) -> UNet:
    torch.manual_seed(0)
    return UNet(dims=dims, depth=3, base_channels=2).eval()


@pytest.mark.parametrize("transform", list(TRANSFORMS[2].values()) + list(TRANSFORMS[3].values()),
                         ids=lambda t: f"{len(t.flips)}d-{t.name}")
def test_a_transform_maps_boxes_as_it_maps_arrays(transform):
    """``box`` and ``inverse_box`` say where the pixels of a box go under ``apply``."""
    nd = len(transform.flips)
    shape = (5, 7, 9)[-nd:]
    image = np.arange(np.prod(shape)).reshape(1, *shape)
    box = Box((1, 2, 3)[-nd:], (3, 4, 5)[-nd:])
    moved = transform.apply(image)
    assert moved.shape[1:] == transform.shape(shape)
    there = transform.box(box, shape)
    assert sorted(moved[(slice(None), *there.slices())].ravel()) == sorted(image[(slice(None), *box.slices())].ravel())
    assert transform.inverse_box(there, shape) == box
    np.testing.assert_array_equal(transform.invert(moved), image)


def test_the_eight_2d_transforms_are_the_dihedral_group():
    image = np.arange(12).reshape(1, 3, 4)
    seen = {transform.apply(image).tobytes() + bytes(transform.apply(image).shape) for transform in TRANSFORMS[2].values()}
    assert len(seen) == 8
    np.testing.assert_array_equal(TRANSFORMS[2]["rot90"].apply(image)[0], np.rot90(image[0]))
    np.testing.assert_array_equal(TRANSFORMS[2]["rot270"].apply(image)[0], np.rot90(image[0], -1))


@pytest.mark.parametrize("block, tile", [pytest.param(45, 60, marks=pytest.mark.slow), (64, 108)])
def test_tiled_augmentation_equals_the_whole_image_augmentation_2d(block, tile):
    model = net(2)
    image = cells((101, 83), seed=4).astype(np.float32)[None] / 255
    chosen = transforms(2, "all")
    whole = predict_whole_tta(model, image, chosen)
    tiled = np.zeros_like(whole)
    for y in range(0, 101, block):
        for x in range(0, 83, block):
            region = Box.from_bounds((y, x), (min(y + block, 101), min(x + block, 83)))
            tiled[(slice(None), *region.slices())] = predict_region_tta(
                model, region, (101, 83), lambda b: image[(slice(None), *b.slices())], chosen, tile)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    plain = predict_whole_tta(model, image, transforms(2, "none"))
    assert np.abs(whole - plain).max() > 1e-3  # the augmentation changes the result: it was applied


@pytest.mark.slow
def test_tiled_augmentation_equals_the_whole_image_augmentation_3d():
    model = net(3)
    image = cells((21, 30, 26), seed=5).astype(np.float32)[None] / 255
    chosen = transforms(3, "all")
    whole = predict_whole_tta(model, image, chosen)
    region = Box.from_bounds((4, 8, 5), (13, 22, 26))
    tiled = predict_region_tta(model, region, image.shape[1:], lambda b: image[(slice(None), *b.slices())], chosen, 60)
    np.testing.assert_allclose(tiled, whole[(slice(None), *region.slices())], atol=1e-5)


def test_a_subset_by_name_and_unknown_names():
    assert [t.name for t in transforms(2, "identity, flip_x,rot90")] == ["identity", "flip_x", "rot90"]
    assert len(transforms(3, "all")) == 8 and [t.name for t in transforms(3, "none")] == ["identity"]
    with pytest.raises(ValueError, match="rot90: not a 3-D test-time transform"):
        transforms(3, "rot90")


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [False, True], ids=["read-in-task", "read-ahead"])
def test_predict_with_tta_equals_the_whole_image_augmentation(client, image_2d, model_2d, tmp_path, prefetch):
    """``overtile predict --tta``: blocks of 128² and tiles of 396² (the whole image is one
    pass per transform), read in the block's task or ahead of it, equal the augmentation of
    whole-image inference; labels are the argmax of the averaged probabilities."""
    from pipeline.jobs.predict import PredictSettings, predict
    from pipeline.numerics.unet import load_model

    url, data = image_2d
    kind = "labels" if prefetch else "probabilities"
    settings = PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), block_size=128,
                               tile_size=400, tta="all", prefetch=prefetch, pyramid=False, output_kind=kind)
    job, summary = predict(settings, client=client)
    out = zarr.open_array(str(tmp_path / "p.zarr" / "0"), mode="r")[...]
    model = load_model(model_2d)
    whole = predict_whole_tta(model, model.normalization(data[None]), transforms(2, "all"))
    if prefetch:
        np.testing.assert_array_equal(out[0], whole.argmax(0))
    else:
        np.testing.assert_allclose(out, whole, atol=1e-5)
    assert summary.done == 9 and "8 transforms" in job.augmentation and "exact" in job.augmentation


def test_predict_tta_names_are_checked_before_anything_is_written(image_2d, model_2d, tmp_path):
    from pipeline.errors import InputError
    from pipeline.jobs.predict import PredictSettings, plan_prediction

    url, _ = image_2d
    with pytest.raises(InputError, match="--tta: flip_z: not a 2-D test-time transform"):
        plan_prediction(PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), tta="flip_z"))
    assert not (tmp_path / "p.zarr").exists()
    job, _ = plan_prediction(PredictSettings(input=url, output=str(tmp_path / "q.zarr"), model=str(model_2d),
                                             tta="rot90, flip_x"))
    plain, _ = plan_prediction(PredictSettings(input=url, output=str(tmp_path / "r.zarr"), model=str(model_2d)))
    assert [t.name for t in job.transforms] == ["rot90", "flip_x"] and plain.augmentation == ""
    assert job.fingerprint != plain.fingerprint  # a run with another augmentation never resumes into this output
