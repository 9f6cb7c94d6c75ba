"""Previews: strided reads of the shown pixels only, and a PNG of input beside prediction."""

import matplotlib.image
import numpy as np
import pytest
import zarr

from pipeline.errors import InputError
from pipeline.preview import preview_png, read_preview
from pipeline.storage import create_image, open_image

SHAPE_2D = (200, 300)


def write_input(path, dims: int) -> tuple[str, str, np.ndarray]:
    shape = SHAPE_2D if dims == 2 else (5, *SHAPE_2D)
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    array = zarr.create_array(str(path), shape=shape, chunks=(1,) * (dims - 2) + (64, 64), dtype="uint8")
    array[...] = data
    return str(path), "yx" if dims == 2 else "zyx", data


def write_prediction(path, dims: int, kind: str, dtype: str) -> str:
    spatial = SHAPE_2D if dims == 2 else (5, *SHAPE_2D)
    classes = 1 if kind == "labels" else 2
    axes = "cyx" if dims == 2 else "czyx"
    array = create_image(str(path), (classes, *spatial), (classes, *spatial[:-2], 128, 128), dtype, axes,
                         name=kind, attrs={"overtile": {"output_kind": kind}})
    rng = np.random.default_rng(1)
    if kind == "labels":
        array[...] = rng.integers(0, 3, (1, *spatial), dtype=np.uint8)
        return str(path)
    p = rng.random(spatial, dtype=np.float32)
    probs = np.stack([1 - p, p])
    # leave the last block column unwritten (NaN for floats), as an interrupted run does
    written = (slice(None), ..., slice(0, 256))
    array[written] = np.rint(probs * 255).astype(np.uint8)[written] if dtype == "uint8" else probs.astype(dtype)[written]
    return str(path)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind,dtype", [("probabilities", "float32"), ("probabilities", "float16"),
                                        ("probabilities", "uint8"), ("labels", "uint8")])
def test_preview_png_shows_input_beside_prediction(tmp_path, dims, kind, dtype):
    image, axes, _ = write_input(tmp_path / "img.zarr", dims)
    prediction = write_prediction(tmp_path / "pred.zarr", dims, kind, dtype)
    out = preview_png(image, prediction, tmp_path / "sub" / "preview.png", axes=axes)
    png = matplotlib.image.imread(out)
    height, width = png.shape[:2]
    assert png.ndim == 3 and png.shape[2] in (3, 4)
    assert width > height, "two panels side by side"
    assert 300 <= width <= 3000 and 150 <= height <= 2000
    assert png[..., :3].std() > 0.05, "not a blank image"


@pytest.mark.parametrize("dims", [2, 3])
def test_read_preview_reads_every_step_th_pixel_of_the_middle_slice(tmp_path, dims):
    image, axes, data = write_input(tmp_path / "img.zarr", dims)
    view = read_preview(open_image(image, axes), max_size=100)
    assert view.step == 3 and view.data.shape == (1, 67, 100)
    expected = data[::3, ::3] if dims == 2 else data[2, ::3, ::3]
    np.testing.assert_array_equal(view.data[0], expected)
    assert view.z == (None if dims == 2 else 2)


def test_read_preview_one_channel_channel_first(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    array = zarr.create_array(str(tmp_path / "rgb.zarr"), shape=data.shape, chunks=(16, 16, 3), dtype="uint8")
    array[...] = data
    source = open_image(str(tmp_path / "rgb.zarr"), "yxc")
    np.testing.assert_array_equal(read_preview(source).data, data.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_preview(source, max_size=30, channel=1).data, data[None, ::2, ::2, 1])


def test_preview_png_rejects_a_prediction_of_another_image(tmp_path):
    image, axes, _ = write_input(tmp_path / "img.zarr", 2)
    other = create_image(str(tmp_path / "pred.zarr"), (2, 100, 100), (2, 64, 64), "float32", "cyx",
                         attrs={"overtile": {"output_kind": "probabilities"}})
    with pytest.raises(InputError, match="pred.zarr: prediction is 100×100 px"):
        preview_png(image, str(tmp_path / "pred.zarr"), tmp_path / "p.png", axes=axes)
    assert other.shape == (2, 100, 100)
    assert not (tmp_path / "p.png").exists()


def test_preview_png_rejects_an_image_that_is_not_a_prediction(tmp_path):
    image, axes, _ = write_input(tmp_path / "img.zarr", 2)
    create_image(str(tmp_path / "plain.zarr"), (2, *SHAPE_2D), (2, 64, 64), "float32", "cyx")
    with pytest.raises(InputError, match="not an overtile prediction"):
        preview_png(image, str(tmp_path / "plain.zarr"), tmp_path / "p.png", axes=axes)


def test_preview_reads_a_pyramid_level_not_the_full_resolution(tmp_path):
    """A slide's preview must not decode the whole of level 0: it reads the coarsest level
    that still has the pixels shown (here level 1 holds other values than level 0 to tell)."""
    from pipeline import storage

    url = str(tmp_path / "pyramid.zarr")
    storage.create_image(url, (2048, 1536), (512, 512), "uint8", "yx")[...] = 0
    group = zarr.open_group(url, mode="r+")
    group.create_array("1", shape=(1024, 768), chunks=(512, 512), dtype="uint8", fill_value=0)[...] = 7
    ome = dict(group.attrs["ome"])
    ome["multiscales"] = [storage.multiscales("yx", [[1.0, 1.0], [2.0, 2.0]], "pyramid")]
    group.attrs["ome"] = ome
    view = read_preview(storage.open_image(url), max_size=512)
    assert view.data.shape == (1, 512, 384) and (view.data == 7).all()
    assert view.step == 4 and view.shape == (2048, 1536)


def test_a_tall_narrow_image_gives_a_preview_of_screen_size(tmp_path):
    """The panels are sized by the longer edge: sized by its width, a 4000×20 strip made a
    figure metres high (a 20000×20 one: 368 megapixels, refused by PIL as a decompression bomb)."""
    data = np.random.default_rng(0).integers(0, 255, (4000, 20), dtype=np.uint8)
    image = str(tmp_path / "strip.zarr")
    zarr.create_array(image, shape=data.shape, chunks=(1000, 20), dtype="uint8")[...] = data
    prediction = create_image(str(tmp_path / "p.zarr"), (2, 4000, 20), (2, 1000, 20), "float32", "cyx",
                              name="probabilities", attrs={"overtile": {"output_kind": "probabilities"}})
    prediction[...] = 0.5
    png = matplotlib.image.imread(preview_png(image, str(tmp_path / "p.zarr"), tmp_path / "strip.png"))
    assert png.shape[0] * png.shape[1] < 4e6, png.shape
