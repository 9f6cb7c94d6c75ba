"""Objects blockwise (issue 12): labels equal the whole-image rule up to renumbering, ids are
deterministic, the table measures every object once, and a broken run resumes bit-identically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from pipeline import storage
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.jobs.objects import FacePass, ObjectSettings, default_table, find_objects, plan_objects
from pipeline.numerics.instances import grow, label_objects
from pipeline.storage import files


def disks(shape: tuple[int, ...], centres: list[tuple[int, ...]], radius: float, seed: int = 0) -> np.ndarray:
    """A probability map of touching blobs: high at each centre, falling off with distance,
    with noise (so thresholds cut ragged, many-block components)."""
    rng = np.random.default_rng(seed)
    free = np.ones(shape, bool)
    free[tuple(np.array(centres).T)] = False
    d = ndimage.distance_transform_edt(free)
    return np.clip(1.1 - d / (2 * radius) + rng.normal(0, 0.08, shape), 0, 1).astype(np.float32)


def write_probabilities(path: Path, p: np.ndarray, chunk: int, image: np.ndarray | None = None) -> str:
    """``p`` as the class-1 channel of a predict-like OME-Zarr output (class 0 = 1 - p)."""
    nd = p.ndim
    url = str(path)
    array = storage.create_image(url, (2, *p.shape), (2, *(chunk,) * nd), "float32", "c" + "zyx"[3 - nd:],
                                 name="probabilities", overwrite=True,
                                 scale=[1.0] + [0.5] * nd, units={a: "micrometer" for a in "zyx"[3 - nd:]},
                                 attrs={"overtile": {"output_kind": "probabilities",
                                                     **({"input": url + ".image"} if image is not None else {})}})
    array[...] = np.stack([1 - p, p])
    if image is not None:
        storage.create_image(url + ".image", image.shape, image.shape, image.dtype, "c" + "zyx"[3 - nd:],
                             overwrite=True)[...] = image
    return url


def run(url: str, output: Path, client=None, **kwargs):
    settings = ObjectSettings(probabilities=url, output=str(output), **kwargs)
    if client is None:
        return blockwise.execute(plan_objects, settings, in_process=True)
    return find_objects(settings, client=client)


def labels_of(output: Path) -> np.ndarray:
    return zarr.open_group(str(output), mode="r")["0"][...]


def one_to_one(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """The id map from ``a`` to ``b`` if the two labellings are the same partition, else fail."""
    assert np.array_equal(a > 0, b > 0), "foreground differs"
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1])), "not one object per object"
    return dict(pairs.tolist())


# Objects crossing one, two and four blocks of 32: centres inside a block, on a block edge,
# on a block corner; plus one long bar across a whole row of blocks.
CENTRES_2D = [(16, 16), (16, 64), (64, 64), (64, 96), (110, 30), (100, 128), (128, 128), (150, 150), (160, 20)]


def map_2d(shape=(190, 170)) -> np.ndarray:
    p = disks(shape, CENTRES_2D, 5.0)
    p[180:184, 5:165] = 0.95  # a bar over six blocks
    return p


@pytest.mark.parametrize("block", [16, 32, 45, 64, 256])
@pytest.mark.parametrize("rule", [dict(), dict(grow_distance=4, grow_threshold=0.3), dict(grow_distance=7, min_size=15)])
def test_tiled_labels_equal_the_whole_image_rule_2d(tmp_path, block, rule):
    p = map_2d()
    url = write_probabilities(tmp_path / "p.zarr", p, block)
    job, summary = run(url, tmp_path / "o.zarr", block_size=block, threshold=0.6, **rule)
    ref = label_objects(p, 0.6, rule.get("grow_threshold"), rule.get("grow_distance", 0), rule.get("min_size", 0))
    one_to_one(labels_of(tmp_path / "o.zarr"), ref)
    assert job.objects == len(np.unique(ref)) - 1 > 5


def test_objects_cross_one_two_and_four_blocks(tmp_path):
    """The map really has such objects (the test above would be weaker without them)."""
    ref = label_objects(map_2d(), 0.6)
    crossed = []
    for i in np.unique(ref)[1:]:
        ys, xs = np.nonzero(ref == i)
        crossed.append(len({(y // 32, x // 32) for y, x in zip(ys, xs)}))
    assert {1, 2, 4} <= set(crossed) and max(crossed) >= 6


@pytest.mark.parametrize("block", [16, 24, 64])
def test_tiled_labels_equal_the_whole_image_rule_3d(tmp_path, block):
    shape = (40, 48, 44)
    centres = [(10, 10, 10), (20, 24, 22), (12, 40, 30), (30, 12, 40), (20, 20, 3), (36, 44, 20)]
    p = disks(shape, centres, 4.0, seed=3)
    url = write_probabilities(tmp_path / "p.zarr", p, block)
    run(url, tmp_path / "o.zarr", block_size=block, threshold=0.6, grow_distance=3, grow_threshold=0.2)
    one_to_one(labels_of(tmp_path / "o.zarr"), label_objects(p, 0.6, 0.2, 3))


def test_growth_is_bounded_and_ties_do_not_depend_on_label_values():
    labels = np.zeros((1, 9), np.uint32)
    labels[0, 0], labels[0, 8] = 5, 2
    grown = grow(labels, None, 3)
    assert grown.tolist() == [[5, 5, 5, 5, 0, 2, 2, 2, 2]]
    swapped = grow(np.where(labels == 5, 2, np.where(labels == 2, 5, 0)).astype(np.uint32), None, 4)
    # the middle pixel is reached by both in step 4: the left neighbour wins, whatever its id
    assert grow(labels, None, 4)[0, 4] == 5 and swapped[0, 4] == 2


@pytest.mark.slow
def test_ids_do_not_depend_on_workers_or_block_order(tmp_path, client):
    p = map_2d()
    url = write_probabilities(tmp_path / "p.zarr", p, 32)
    run(url, tmp_path / "here.zarr", block_size=32, grow_distance=3)
    run(url, tmp_path / "cluster.zarr", client=client, block_size=32, grow_distance=3)
    assert np.array_equal(labels_of(tmp_path / "here.zarr"), labels_of(tmp_path / "cluster.zarr"))
    assert _table_digest(default_table(str(tmp_path / "here.zarr"))) == \
        _table_digest(default_table(str(tmp_path / "cluster.zarr")))


def test_table_measures_every_object_once_and_correctly(tmp_path):
    p = map_2d()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (3, *p.shape)).astype(np.uint8)
    url = write_probabilities(tmp_path / "p.zarr", p, 32, image=image)
    job, _ = run(url, tmp_path / "o.zarr", block_size=32, grow_distance=3)
    got = labels_of(tmp_path / "o.zarr")
    table = files.read_parquet(job.table)
    assert sorted(table["id"].tolist()) == sorted(np.unique(got)[1:].tolist())  # each object exactly once
    order = np.argsort(table["id"])
    table = {k: v[order] for k, v in table.items()}
    ids = table["id"].astype(np.int64)
    area = ndimage.sum_labels(np.ones_like(got), got, ids)
    assert np.array_equal(table["area_px"], area)
    assert np.allclose(table["area_um2"], area * 0.25)  # 0.5 µm pixels
    cy, cx = np.array(ndimage.center_of_mass(np.ones_like(got), got, ids)).T
    assert np.allclose(table["centroid_y"], cy) and np.allclose(table["centroid_x"], cx)
    boxes = ndimage.find_objects(got.astype(np.int64))
    for n, i in enumerate(ids):
        box = boxes[i - 1]
        assert (table["bbox_y0"][n], table["bbox_y1"][n], table["bbox_x0"][n], table["bbox_x1"][n]) == \
            (box[0].start, box[0].stop, box[1].start, box[1].stop)
    assert np.allclose(table["mean_probability"], ndimage.mean(p, got, ids), rtol=1e-6)
    for c in range(3):
        assert np.allclose(table[f"mean_intensity_{c}"], ndimage.mean(image[c].astype(float), got, ids))


def test_table_is_a_parquet_dataset_pandas_and_dask_read(tmp_path):
    import dask.dataframe as dd
    import pandas as pd

    url = write_probabilities(tmp_path / "p.zarr", map_2d(), 32)
    job, _ = run(url, tmp_path / "o.zarr", block_size=32)
    frame = pd.read_parquet(job.table)
    assert len(frame) == job.objects and frame["id"].is_unique
    assert len(dd.read_parquet(job.table).compute()) == job.objects


def test_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch):
    p = map_2d()
    url = write_probabilities(tmp_path / "p.zarr", p, 32)
    kwargs = dict(block_size=32, grow_distance=3, min_size=10)
    run(url, tmp_path / "clean.zarr", geojson=str(tmp_path / "clean.geojson.gz"), **kwargs)
    kwargs["geojson"] = str(tmp_path / "o.geojson.gz")

    calls = []
    original = FacePass.run_block

    def dies_in_the_face_pass(self, block):
        calls.append(block)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return original(self, block)

    monkeypatch.setattr(FacePass, "run_block", dies_in_the_face_pass)
    with pytest.raises(KeyboardInterrupt):
        run(url, tmp_path / "o.zarr", **kwargs)
    monkeypatch.undo()
    seen = []

    def stop_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt

    settings = ObjectSettings(probabilities=url, output=str(tmp_path / "o.zarr"), **kwargs)
    with pytest.raises(KeyboardInterrupt):
        blockwise.execute(plan_objects, settings, on_result=stop_after_three, in_process=True)
    _, resumed = run(url, tmp_path / "o.zarr", **kwargs)
    assert resumed.skipped == 3
    assert np.array_equal(labels_of(tmp_path / "o.zarr"), labels_of(tmp_path / "clean.zarr"))
    assert _table_digest(default_table(str(tmp_path / "o.zarr"))) == _table_digest(default_table(str(tmp_path / "clean.zarr")))
    assert (tmp_path / "o.geojson.gz").read_bytes() == (tmp_path / "clean.geojson.gz").read_bytes()
    assert not (tmp_path / "o.zarr" / "work").exists()
    _, again = run(url, tmp_path / "o.zarr", **kwargs)  # finished: nothing to do
    assert again.done == 0


def test_qupath_geojson_has_every_object_once_as_a_valid_polygon(tmp_path, monkeypatch):
    import shapely
    from shapely.geometry import shape

    from pipeline.storage.geojson import read_features

    # the blocks' feature files are copied in pieces: pieces far shorter than a block's
    # features (1 MiB in a run, some 2,300 cells) must not cut a feature in two
    monkeypatch.setattr(files, "TEXT_PIECE", 333)

    p = map_2d()
    p[40:60, 120:150] = 0.95
    p[47:52, 130:136] = 0.0  # a cell with a hole, on a block edge
    url = write_probabilities(tmp_path / "p.zarr", p, 32)
    job, _ = run(url, tmp_path / "o.zarr", block_size=32, grow_distance=2, geojson=str(tmp_path / "cells.geojson"),
                 class_name="Nucleus")
    labels = labels_of(tmp_path / "o.zarr")
    features = read_features(str(tmp_path / "cells.geojson"))
    ids = [f["properties"]["object_id"] for f in features]
    assert sorted(ids) == sorted(files.read_parquet(job.table)["id"].tolist()) == list(range(1, job.objects + 1))
    area = ndimage.sum_labels(np.ones_like(labels), labels, ids)
    holes = 0
    for feature, pixels in zip(features, area):
        geometry = shape(feature["geometry"])
        assert feature["geometry"]["type"] == "Polygon" and geometry.is_valid
        assert geometry.exterior.is_ccw and all(not ring.is_ccw for ring in geometry.interiors)
        assert geometry.area == pixels  # pixel-edge outlines: exact, not within 2 %
        holes += len(geometry.interiors)
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
        assert props["measurements"]["area_px"] == pixels
    assert holes >= 1
    # the outline of an object is its pixels: rasterising a polygon gives the label's mask back
    one = features[int(np.argmax(area))]
    i = one["properties"]["object_id"]
    ys, xs = np.nonzero(labels == i)
    centres = shapely.points(xs + 0.5, ys + 0.5)
    assert shapely.contains(shape(one["geometry"]), centres).all()


def _table_digest(table: str) -> str:
    """The table's parts, byte for byte."""
    digest = hashlib.sha256()
    for name in sorted(files.listdir(table)):
        digest.update(name.encode() + Path(table, name).read_bytes())
    return digest.hexdigest()


def test_uint8_probabilities_and_a_tissue_masked_prediction(tmp_path):
    """uint8 outputs hold 255·p; blocks a tissue mask left unwritten are skipped."""
    p = map_2d()
    url = str(tmp_path / "p.zarr")
    array = storage.create_image(url, (2, *p.shape), (2, 32, 32), "uint8", "cyx", overwrite=True)
    q = np.rint(np.stack([1 - p, p]) * 255).astype(np.uint8)
    q[:, :, 96:] = 0
    array[:, :, :96] = q[:, :, :96]  # the right blocks never written, as without tissue
    job, summary = run(url, tmp_path / "o.zarr", block_size=32, grow_distance=3, grow_threshold=0.25)
    assert summary.total < 6 * 6
    one_to_one(labels_of(tmp_path / "o.zarr"), label_objects(q[1] / np.float32(255), 0.5, 0.25, 3))


def test_unwritten_float_blocks_are_probability_zero_in_the_table(tmp_path):
    """A float prediction's blocks without tissue hold NaN: cells grown into them by distance
    keep a mean probability computed with 0 there, as in the whole image with NaN as 0."""
    p = map_2d()
    url = write_probabilities(tmp_path / "p.zarr", p, 32)
    array = zarr.open_array(url + "/0", mode="r+")
    array[:, :, 96:] = np.nan  # what a tissue-masked float prediction leaves unwritten
    job, _ = run(url, tmp_path / "o.zarr", block_size=32, grow_distance=6)
    table = files.read_parquet(default_table(str(tmp_path / "o.zarr")))
    whole = np.where(np.arange(p.shape[1]) < 96, p, 0).astype(np.float32)
    labels = labels_of(tmp_path / "o.zarr")
    assert (labels[:, 96:] > 0).any(), "no cell grew into the unwritten blocks: the test shows nothing"
    expected = ndimage.mean(whole, labels, table["id"].astype(np.int64))
    np.testing.assert_allclose(table["mean_probability"], expected, rtol=1e-6)


def test_no_objects_is_an_empty_table_not_a_missing_one(tmp_path):
    """A blank image: the run finishes with 0 objects, a table of 0 rows with every column,
    and an empty FeatureCollection."""
    import pandas as pd

    from pipeline.storage.geojson import read_features

    url = write_probabilities(tmp_path / "p.zarr", np.zeros((70, 50), np.float32), 32)
    geojson = str(tmp_path / "cells.geojson")
    job, summary = run(url, tmp_path / "o.zarr", block_size=32, geojson=geojson)
    assert job.objects == 0 and not summary.failed
    table = pd.read_parquet(default_table(str(tmp_path / "o.zarr")))
    assert len(table) == 0
    assert {"id", "area_px", "area_um2", "centroid_y", "centroid_x", "bbox_y0", "bbox_x1", "mean_probability"} \
        <= set(table.columns)
    assert read_features(geojson) == []


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    url = write_probabilities(tmp_path / "p.zarr", map_2d(), 32)
    out = tmp_path / "o.zarr"
    assert main(["objects", url, str(out), "--object-class", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "there is no class 2" in err and not out.exists()
    assert main(["objects", url, url, "--overwrite"]) == 2
    assert "which this run reads" in capsys.readouterr().err
    other = tmp_path / "other.zarr"
    storage.create_image(str(other), (190, 170), (32, 32), "uint32", "yx")  # an image of the same shape and dtype
    assert main(["objects", url, str(other)]) == 2
    assert "holds another image" in capsys.readouterr().err


@pytest.mark.slow
def test_too_many_objects_for_the_label_dtype(tmp_path, capsys):
    p = np.zeros((520, 520), np.float32)
    p[::2, ::2] = 1  # 67,600 single-pixel objects: more than uint16 holds
    url = write_probabilities(tmp_path / "p.zarr", p, 260)
    out = tmp_path / "o.zarr"
    assert main(["objects", url, str(out), "--dtype", "uint16", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "67600 objects do not fit uint16 labels; use --dtype uint32" in err and not out.exists()
    assert not Path(default_table(str(out))).exists()
    # into an OME-Zarr image: listed among its labels once finished, and no longer when an
    # overwriting run fails and removes it (a listing of a missing group breaks viewers)
    image = str(tmp_path / "slide.zarr")
    storage.create_image(image, p.shape, (260, 260), "uint8", "yx")
    into = Path(image) / "labels" / "cells"
    listed = lambda: zarr.open_group(image + "/labels", mode="r").attrs["ome"]["labels"]  # noqa: E731
    with pytest.raises(InputError, match="do not fit uint16"):
        run(url, into, image=image, dtype="uint16")
    assert not into.exists() and not (Path(image) / "labels" / "zarr.json").exists()  # never listed
    run(url, into, image=image, dtype="uint32")
    assert listed() == ["cells"]
    with pytest.raises(InputError, match="do not fit uint16"):
        run(url, into, image=image, dtype="uint16", overwrite=True)
    assert not into.exists() and listed() == []


@pytest.mark.slow
def test_readme_path_from_a_slide_to_qupath_in_three_commands(tmp_path, model_2d):
    """The README's three commands on a tiled RGB TIFF: ingest, predict, objects."""
    import tifffile

    from pipeline.storage.geojson import read_features

    from conftest import cells, make_model

    rgb = np.stack([cells((300, 280), seed=s) for s in range(3)], axis=-1)
    tifffile.imwrite(tmp_path / "scan.tif", rgb, tile=(64, 64), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    model = make_model(tmp_path / "rgb.pt", in_channels=3)
    slide, probs = tmp_path / "slide.zarr", tmp_path / "p.zarr"
    assert main(["ingest", str(tmp_path / "scan.tif"), str(slide), "--quiet"]) == 0
    assert main(["predict", str(slide), str(probs), "--model", str(model), "--dtype", "uint8", "--workers", "1",
                 "--block-size", "128", "--quiet"]) == 0
    threshold = float(np.quantile(zarr.open_array(str(probs / "0"))[1], 0.7) / 255)  # a random model's own cells
    assert main(["objects", str(probs), str(slide / "labels" / "cells"), "--threshold", f"{threshold:.3f}",
                 "--grow-distance", "2", "--min-size", "5", "--geojson", str(tmp_path / "cells.geojson.gz"),
                 "--workers", "1", "--quiet"]) == 0
    labels = zarr.open_group(str(slide / "labels" / "cells"))
    assert labels["0"].shape == (1, 300, 280)  # the image's axes, c = 1
    assert "cells" in zarr.open_group(str(slide / "labels")).attrs["ome"]["labels"]
    table = files.read_parquet(str(tmp_path / "slide.cells.parquet"))
    features = read_features(str(tmp_path / "cells.geojson.gz"))
    assert len(features) == len(table["id"]) == labels["0"][...].max() > 0
    assert np.allclose(table["area_um2"], table["area_px"] * 0.25)  # 0.5 µm pixels from the TIFF
    assert {"mean_intensity_0", "mean_intensity_1", "mean_intensity_2"} <= set(table)
