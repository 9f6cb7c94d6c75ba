"""Whole-slide scale: tissue masks choose the blocks (background blocks leave no chunks), output
pyramids in the multiscales (read back with the ome-zarr package), labels under the image."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import storage
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.jobs.predict import PredictSettings, predict
from pipeline.numerics.downsample import downsample
from pipeline.jobs.tissue import compute_mask
from pipeline.numerics.threshold import blocks_touching

from conftest import cells, make_model, write_zarr


def brute_force(mask, factor, shape, block, margin):
    grid = [math.ceil(s / b) for s, b in zip(shape, block)]
    out = np.zeros(grid, bool)
    for index in itertools.product(*map(range, grid)):
        sl = []
        for a, i in enumerate(index):
            lo = max(i * block[a] - margin, 0) / factor[a]
            hi = min((i + 1) * block[a] + margin, shape[a]) / factor[a]
            lo = min(int(math.floor(lo)), mask.shape[a] - 1)
            sl.append(slice(lo, max(int(math.ceil(hi)), lo + 1)))
        out[index] = mask[tuple(sl)].any()
    return out


@pytest.mark.parametrize("seed", range(4))
def test_blocks_touching_equals_a_loop_over_blocks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(100, 700, 2))
    factor = tuple(float(f) for f in rng.uniform(1.5, 9, 2))
    mask = rng.random(tuple(math.ceil(s / f) for s, f in zip(shape, factor))) > 0.97
    block = tuple(int(b) for b in rng.integers(16, 120, 2))
    margin = int(rng.integers(0, 40))
    np.testing.assert_array_equal(blocks_touching(mask, factor, shape, block, margin),
                                  brute_force(mask, factor, shape, block, margin))


def rgb_slide(path: Path, shape=(512, 640), blob=((60, 200), (80, 260))) -> tuple[str, np.ndarray]:
    """White glass with noise, and one pink 'tissue' region: an OME-Zarr RGB image (c, y, x)."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(235, 6, (3, *shape)), 0, 255).astype(np.uint8)
    (y0, y1), (x0, x1) = blob
    tissue = np.array([200, 110, 170])[:, None, None] + rng.normal(0, 15, (3, y1 - y0, x1 - x0))
    image[:, y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    storage.create_image(str(path), image.shape, (3, 128, 128), "uint8", "cyx", name="slide")[...] = image
    return str(path), image


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("rgb") / "rgb.pt", in_channels=3, base_channels=2)


def stored_blocks(url: str) -> set[tuple[int, ...]]:
    array = zarr.open_array(url, mode="r")
    return {tuple(map(int, key.split("/")[1:])) for key in _keys(array)}


def _keys(array) -> list[str]:
    """The chunk keys (``c/i/j/...``) that exist in the store: what was written."""
    from zarr.core.sync import sync

    prefix = f"{array.store_path.path}/" if array.store_path.path else ""

    async def listing():
        return [k async for k in array.store_path.store.list_prefix(prefix + "c/")]

    return [k[len(prefix):] for k in sync(listing())]


@pytest.mark.slow
def test_tissue_mask_computes_only_blocks_near_tissue(client, tmp_path, rgb_model):
    url, image = rgb_slide(tmp_path / "slide.zarr")
    base = dict(input=url, model=str(rgb_model), block_size=64, pyramid=False)
    job, full = predict(PredictSettings(output=str(tmp_path / "all.zarr"), **base), client=client)
    job, masked = predict(PredictSettings(output=str(tmp_path / "tissue.zarr"), tissue="saturation", **base), client=client)
    assert job.tissue.startswith("saturation")
    truth = np.zeros((512, 640), bool)
    truth[60:200, 80:260] = True  # blocks within the model's context of the tissue are computed
    expected = brute_force(truth, (1.0, 1.0), (512, 640), (64, 64), load_margin(rgb_model) + 1)
    computed = stored_blocks(str(tmp_path / "tissue.zarr" / "0"))
    assert computed == {(0, *map(int, i)) for i in np.argwhere(expected)}
    assert masked.done == int(expected.sum()) and masked.background == expected.size - expected.sum()
    assert masked.total == full.total == expected.size
    a = zarr.open_array(str(tmp_path / "all.zarr" / "0"), mode="r")[...]
    b = zarr.open_array(str(tmp_path / "tissue.zarr" / "0"), mode="r")[...]
    for i, j in np.argwhere(expected):
        sl = (slice(None), slice(64 * i, 64 * i + 64), slice(64 * j, 64 * j + 64))
        np.testing.assert_array_equal(a[sl], b[sl])
    assert np.isnan(b[:, 400:, 500:]).all()  # far from tissue: the fill value, no chunk
    again = predict(PredictSettings(output=str(tmp_path / "tissue.zarr"), tissue="saturation", **base), client=client)[1]
    assert again.done == 0 and again.skipped == masked.done and again.background == masked.background


def load_margin(path) -> int:
    from pipeline.numerics.unet import load_model

    return load_model(path).margin


def test_otsu_on_saturation_finds_the_tissue(tmp_path):
    url, _ = rgb_slide(tmp_path / "slide.zarr")
    mask = compute_mask(storage.open_image(url), "auto")
    assert mask.method == "saturation" and mask.factor == (1.0, 1.0)
    truth = np.zeros((512, 640), bool)
    truth[60:200, 80:260] = True
    assert (mask.mask == truth).mean() > 0.99
    with pytest.raises(ValueError, match="RGB"):
        compute_mask(storage.open_image(write_zarr(tmp_path / "gray.zarr", cells((64, 64)))), "saturation")


def test_otsu_equals_scikit_image():
    """overtile's numpy Otsu (no skimage import on the plan's path) equals skimage's, to the
    bit, on bimodal and skewed feature maps like the tissue features (near ties between bins
    included: 600 draws), with unset pixels, and on a single value."""
    from skimage.filters import threshold_otsu

    from pipeline.numerics.threshold import otsu

    for seed in range(600):  # draws 344 and 550 are near ties: variances in float64 pick the next bin
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3000, 8000))
        values = np.concatenate([rng.normal(rng.uniform(0.1, 0.4), rng.uniform(0.02, 0.1), n),
                                 rng.normal(rng.uniform(0.5, 0.9), rng.uniform(0.02, 0.1), n)]).astype(np.float32)
        assert otsu(values) == float(threshold_otsu(values)), seed
    values[:100] = np.nan  # unset: ignored by overtile's, dropped before skimage's
    assert otsu(values) == float(threshold_otsu(values[100:]))
    assert otsu(np.full(10, 0.3, np.float32)) == np.inf  # one value: nothing to separate


@pytest.mark.slow
def test_user_mask_at_low_resolution_and_cli_summary(client, tmp_path, rgb_model, capsys):
    url, _ = rgb_slide(tmp_path / "slide.zarr")
    low = np.zeros((64, 80), np.uint8)  # 1/8 of the slide
    low[0:8, 0:8] = 1  # only the top-left 64×64
    mask = write_zarr(tmp_path / "mask.zarr", low)
    code = main(["predict", url, str(tmp_path / "o.zarr"), "--model", str(rgb_model), "--block-size", "128",
                 "--tissue-mask", mask, "--quiet", "--scheduler", client.scheduler.address])
    assert code == 0
    out = capsys.readouterr().out
    assert "without tissue (not computed)" in out
    computed = stored_blocks(str(tmp_path / "o.zarr" / "0"))
    margin = load_margin(rgb_model) + 1
    assert computed == {(0, 0, 0)} | ({(0, 0, 1), (0, 1, 0), (0, 1, 1)} if margin > 64 else set())


@pytest.mark.slow
def test_pyramid_levels_are_means_of_probabilities_and_nearest_labels(client, image_2d, model_2d, tmp_path):
    url, _ = image_2d  # 333 × 270
    predict(PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), block_size=64), client=client)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    p0, p1 = group["0"][...], group["1"][...]
    assert p1.shape == (2, 167, 135) and "2" not in group  # stops at 256 px
    np.testing.assert_allclose(p1, downsample(p0, (2, 2), "mean"), rtol=1e-6)
    np.testing.assert_allclose(p1[:, 10, 20], p0[:, 20:22, 40:42].mean(axis=(1, 2)), rtol=1e-6)
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]

    predict(PredictSettings(input=url, output=str(tmp_path / "l.zarr"), model=str(model_2d), block_size=64,
                            output_kind="labels"), client=client)
    labels = zarr.open_group(str(tmp_path / "l.zarr"), mode="r")
    np.testing.assert_array_equal(labels["1"][...], labels["0"][:, ::2, ::2])


def placements(url: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each listed level's scale and translation (zeros when it has none)."""
    ms = storage.ome_metadata(dict(zarr.open_group(url, mode="r").attrs))
    return [(np.array(storage.scale_from_ome(ms, k)), np.array(storage.translation_from_ome(ms, k) or [0.0] * 3))
            for k in range(len(ms["datasets"]))]


@pytest.mark.slow
def test_outputs_sit_where_the_input_is_and_each_level_where_its_pixels_came_from(client, image_2d, model_2d,
                                                                                  tmp_path):
    """An input placed in space (OME scale and translation) gives outputs placed the same, so a
    viewer draws them over it; a level's pixel centre is the centre of the level-0 pixels it was
    made from: the mean of a 2×2 window is half a level-0 pixel on, the nearest (top-left) is not."""
    _, data = image_2d
    url = str(tmp_path / "placed.zarr")
    storage.create_image(url, (1, *data.shape), (1, 128, 128), data.dtype, "cyx", scale=[1.0, 0.5, 0.25],
                         translation=[0.0, 10.0, -3.0], units={"y": "micrometer", "x": "micrometer"})[...] = data[None]
    assert storage.open_image(url).origin == {"c": 0.0, "y": 10.0, "x": -3.0}
    for kind, window in (("probabilities", np.array([0.5, 0.5])), ("labels", np.array([0.0, 0.0]))):
        out = str(tmp_path / f"{kind}.zarr")
        predict(PredictSettings(input=url, output=out, model=str(model_2d), block_size=128, output_kind=kind),
                client=client)
        (s0, t0), (s1, t1) = placements(out)
        np.testing.assert_array_equal(s0, [1.0, 0.5, 0.25])
        np.testing.assert_array_equal(t0, [0.0, 10.0, -3.0])
        np.testing.assert_array_equal(s1, [1.0, 1.0, 0.5])
        # level 1's pixel (i, j) is made from level 0's (2i, 2j) and the window after it
        for i, j in ((0, 0), (7, 11), (100, 60)):
            made_from = t0[1:] + s0[1:] * (2 * np.array([i, j]) + window)
            np.testing.assert_allclose(t1[1:] + s1[1:] * np.array([i, j]), made_from)
    for job, source in (("weights", "labels"), ("objects", "probabilities")):  # the jobs that read outputs
        out = str(tmp_path / f"{job}.zarr")
        assert main([job, str(tmp_path / f"{source}.zarr"), out, "--block-size", "128", "--quiet",
                     "--scheduler", client.scheduler.address]) == 0
        np.testing.assert_array_equal(placements(out)[0][1][-2:], [10.0, -3.0])


@pytest.mark.slow
def test_ome_zarr_reader_sees_the_pyramid_and_the_labels_on_the_image(client, tmp_path, rgb_model):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    url, _ = rgb_slide(tmp_path / "slide.zarr", shape=(600, 520))
    label_url = f"{url}/labels/unet"
    predict(PredictSettings(input=url, output=label_url, model=str(rgb_model), block_size=128, output_kind="labels"),
            client=client)
    nodes = list(Reader(parse_url(url))())
    image = nodes[0]
    assert image.load(Multiscales) is not None
    labels = [n for n in nodes if n.load(Label)]
    assert labels, "the reader finds no label image under the slide"
    label = labels[0]
    assert [tuple(d.shape) for d in label.data] == [(1, 600, 520), (1, 300, 260), (1, 150, 130)]
    colors = label.metadata["color"]  # class 0 transparent, class 1 coloured and half opaque
    assert colors[0][3] == 0 and colors[1][3] == pytest.approx(160 / 255)
    np.testing.assert_array_equal(np.asarray(label.data[0]), zarr.open_array(label_url + "/0", mode="r")[...])

    with pytest.raises(ValueError, match="only labels"):
        predict(PredictSettings(input=url, output=f"{url}/labels/probs", model=str(rgb_model)), client=client)


def test_read_tasks_need_no_gpu(tmp_path, rgb_model):
    """With prefetch, read tasks may land on CPU-only workers of a mixed cluster: they use the
    model's geometry on the CPU, never CUDA (planned here on trust, as for a remote cluster)."""
    import dask

    from pipeline.jobs.predict import plan_prediction

    url, _ = rgb_slide(tmp_path / "slide.zarr", shape=(300, 260))
    settings = PredictSettings(input=url, output=str(tmp_path / "o.zarr"), model=str(rgb_model), device="cuda",
                               block_size=128)
    with dask.config.set({"scheduler-address": "tcp://10.0.0.5:8786"}):  # e.g. DASK_SCHEDULER_ADDRESS in a pod
        job, pending = plan_prediction(settings)
    assert job.device == "cuda"
    image = job.read_block(pending.blocks[0])  # as stored: the GPU normalises it (--device-stitch, on by default)
    assert image.dtype == np.uint8 and image.shape[0] == 3
    normalised = dataclasses.replace(job, settings=settings.model_copy(update={"device_stitch": False}))
    assert normalised.read_block(pending.blocks[0]).dtype == np.float32


@pytest.mark.slow
def test_an_interrupted_pyramid_rebuild_is_redone_by_the_next_run(client, tmp_path, rgb_model, monkeypatch):
    from pipeline.jobs import pyramid

    url, _ = rgb_slide(tmp_path / "slide.zarr")
    settings = PredictSettings(input=url, output=str(tmp_path / "o.zarr"), model=str(rgb_model), block_size=128)
    predict(settings, client=client)
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    levels = len(group.attrs["ome"]["multiscales"][0]["datasets"])
    assert levels == 3

    def interrupted(*args, **kwargs):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(pyramid, "run_blocks", interrupted)
    with pytest.raises(RuntimeError):
        pyramid.build_pyramid(client, str(tmp_path / "o.zarr"), "mean")
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert len(group.attrs["ome"]["multiscales"][0]["datasets"]) == 1  # the emptied level is not listed
    monkeypatch.undo()
    again = predict(settings, client=client)[1]
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert again.done == 0 and len(group.attrs["ome"]["multiscales"][0]["datasets"]) == levels
    assert not np.isnan(group["1"][...]).any()


def test_labels_into_a_zarr_v2_image_are_refused_clearly(tmp_path, rgb_model):
    image = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    image.create_array("0", shape=(3, 64, 64), chunks=(3, 64, 64), dtype="uint8")
    image.attrs["multiscales"] = [storage.multiscales("cyx", [[1.0, 1.0, 1.0]], "v2")]
    settings = PredictSettings(input=str(tmp_path / "v2.zarr"), output=str(tmp_path / "v2.zarr" / "labels" / "unet"),
                               model=str(rgb_model), output_kind="labels")
    with pytest.raises(ValueError, match="Zarr v2"):
        predict(settings)


@pytest.mark.slow
def test_a_boolean_mask_is_a_tissue_mask(client, tmp_path, rgb_model):
    url, _ = rgb_slide(tmp_path / "slide.zarr")
    low = np.zeros((64, 80), bool)
    low[:8, :8] = True
    mask = write_zarr(tmp_path / "mask.zarr", low)
    summary = predict(PredictSettings(input=url, output=str(tmp_path / "o.zarr"), model=str(rgb_model), block_size=128,
                                      tissue_mask=mask), client=client)[1]
    assert summary.background > 0 and summary.done >= 1


@pytest.mark.slow
def test_tiff_slides_are_closed_with_their_source(tmp_path):
    import gc

    import psutil
    import tifffile

    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint8), tile=(64, 64), photometric="rgb")
    process = psutil.Process()
    before = process.num_fds()
    for _ in range(10):
        source = storage.open_image(str(path))
        source.read(source_box(source))
        del source
    gc.collect()  # once: a collection takes about a second in a process that holds torch
    assert process.num_fds() - before < 5


def source_box(source):
    from pipeline.numerics.geometry import Box

    return Box.from_shape(source.spatial_shape)


def test_auto_tissue_is_saturation_for_8_bit_rgb_only():
    """Three 16-bit channels are fluorescence (tissue bright on black), not an RGB scan."""
    from pipeline.jobs.tissue import compute_mask

    rng = np.random.default_rng(0)
    fluorescence = rng.integers(0, 200, (3, 96, 96)).astype(np.uint16)
    fluorescence[:, 20:60, 30:70] += 3000  # tissue: bright in every channel, grey in colour
    mask = compute_mask(storage.ImageSource("mem://f", fluorescence, "cyx"), "auto")
    assert mask.method == "bright"
    assert mask.mask[20:60, 30:70].all() and mask.mask.sum() == 40 * 40
    rgb = np.full((3, 96, 96), 230, np.uint8)
    rgb[:, 20:60, 30:70] = np.array([200, 110, 170], np.uint8)[:, None, None]
    assert compute_mask(storage.ImageSource("mem://r", rgb, "cyx"), "auto").method == "saturation"


def test_auto_tissue_is_dark_for_brightfield_grey_and_keeps_everything_without_contrast():
    """One channel on a bright border is brightfield (tissue darker than the glass); an image
    whose feature has no contrast (a grey RGB scan's saturation) keeps every block, never
    none; and an RGB crop that is all tissue keeps its pale eosin, not only the haematoxylin."""
    from pipeline.jobs.tissue import compute_mask

    grey = np.full((1, 96, 96), 235, np.uint8)
    grey[:, 20:60, 30:70] = 120
    mask = compute_mask(storage.ImageSource("mem://g", grey, "cyx"), "auto")
    assert mask.method == "dark" and mask.relation == "<" and mask.mask.sum() == 40 * 40
    crop = np.full((1, 96, 96), 2200, np.uint16)  # fluorescence tissue reaching the border, a dark hole
    crop[:, 30:60, 30:60] = 100
    mask = compute_mask(storage.ImageSource("mem://b", crop, "cyx"), "auto")
    assert mask.method == "bright" and mask.mask.sum() == 96 * 96 - 30 * 30
    flat = np.full((3, 64, 64), 200, np.uint8)
    flat[:, 10:30, 10:30] = 90  # tissue, but grey: saturation 0 everywhere
    mask = compute_mask(storage.ImageSource("mem://f", flat, "cyx"), "auto")
    assert mask.mask.all() and "no contrast" in mask.method and mask.threshold is None
    crop = np.empty((3, 64, 64), np.uint8)
    crop[:, :, :32] = np.array([240, 190, 215], np.uint8)[:, None, None]  # pale eosin, saturation 0.21
    crop[:, :, 32:] = np.array([90, 60, 160], np.uint8)[:, None, None]  # haematoxylin, saturation 0.62
    assert compute_mask(storage.ImageSource("mem://c", crop, "cyx"), "auto").mask.all()


@pytest.mark.slow
def test_a_slide_stored_as_one_z_slice_gets_a_tissue_mask(client, tmp_path, rgb_model):
    """OME-Zarr from bioformats2raw is tczyx with z = 1: a slide, whose tissue mask is 2-D."""
    _, image = rgb_slide(tmp_path / "flat.zarr")
    url = str(tmp_path / "tczyx.zarr")
    storage.create_image(url, (1, 3, 1, *image.shape[1:]), (1, 3, 1, 128, 128), "uint8", "tczyx")[...] = \
        image[None, :, None]
    source = storage.open_image(url)
    assert source.spatial_shape == (1, 512, 640)
    mask = compute_mask(source, "auto")
    assert mask.mask.shape == (1, 512, 640) and mask.factor == (1.0, 1.0, 1.0) and mask.method == "saturation"
    flat = compute_mask(storage.open_image(str(tmp_path / "flat.zarr")), "auto")
    assert np.array_equal(mask.mask[0], flat.mask)


def test_a_boolean_tiff_is_a_tissue_mask(tmp_path):
    import tifffile

    from pipeline.jobs.tissue import read_mask

    low = np.zeros((64, 80), bool)
    low[:8, :8] = True
    tifffile.imwrite(tmp_path / "mask.tif", low)
    mask = read_mask(str(tmp_path / "mask.tif"), (512, 640))
    assert mask.factor == (8.0, 8.0) and np.array_equal(mask.mask, low)


def test_a_large_user_mask_keeps_a_single_tissue_pixel_and_must_fit_the_image(tmp_path, monkeypatch):
    """A mask bigger than the mask budget is reduced by windows (any tissue in a window is
    tissue), not strided past; one of another aspect ratio than the image is refused."""
    from pipeline.jobs import tissue

    monkeypatch.setattr(tissue, "MAX_MASK_PIXELS", 100 * 100)
    big = np.zeros((1000, 1200), bool)
    big[501, 777] = True  # between strides of 11
    url = write_zarr(tmp_path / "big.zarr", big, chunks=(256, 256))
    mask = tissue.read_mask(url, (4000, 4800))
    assert mask.mask.sum() == 1 and mask.factor == (44.0, 44.0)
    assert np.argwhere(mask.blocks((4000, 4800), (512, 512))).tolist() == [[501 * 4 // 512, 777 * 4 // 512]]
    with pytest.raises(InputError, match="aspect ratio"):
        tissue.read_mask(url, (4000, 4000))
    with pytest.raises(InputError, match="not one given with --tissue-mask"):
        from pipeline.jobs.predict import plan_prediction

        plan_prediction(PredictSettings(input=url, output=str(tmp_path / "o.zarr"), model="m.pt", tissue_mask=url,
                                        tissue_threshold=0.5))


def test_imagej_writes_its_micro_sign_escaped(tmp_path):
    import tifffile

    for unit in ("\\u00B5m", "micron"):
        path = tmp_path / f"{unit[-2:]}.tif"
        tifffile.imwrite(path, np.zeros((32, 32), np.uint8), imagej=True, resolution=(4.0, 4.0),
                         metadata={"unit": unit})
        source = storage.open_image(str(path))
        assert source.scale == {"y": 0.25, "x": 0.25} and source.units["x"] == "micrometer", (unit, source.units)


@pytest.mark.slow
def test_levels_out_of_date_are_not_listed(client, tmp_path, rgb_model):
    """A run that adds level-0 blocks makes the levels below out of date: they leave the
    multiscales before the blocks are written, so a run that stops before rebuilding them
    (here: no pyramid asked for) leaves them for the next run to build, not listed stale."""
    url, _ = rgb_slide(tmp_path / "slide.zarr")
    low = np.zeros((64, 80), bool)
    low[:8, :8] = True
    out = str(tmp_path / "o.zarr")
    base = dict(input=url, output=out, model=str(rgb_model), block_size=128)
    predict(PredictSettings(**base, tissue_mask=write_zarr(tmp_path / "mask.zarr", low)), client=client)
    listed = lambda: [d["path"] for d in storage.ome_metadata(dict(zarr.open_group(out).attrs))["datasets"]]  # noqa: E731
    assert len(listed()) > 1  # a pyramid over the masked blocks
    more = predict(PredictSettings(**base, pyramid=False), client=client)[1]  # the other blocks, no pyramid
    assert more.done > 0 and listed() == ["0"]
    predict(PredictSettings(**base), client=client)  # nothing to compute: the pyramid is built again
    level1 = zarr.open_group(out)["1"][...]
    assert len(listed()) > 1 and not np.isnan(level1).any()
