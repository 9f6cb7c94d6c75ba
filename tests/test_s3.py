"""Object storage: inputs, outputs, ledgers and slides on ``s3://`` against a real S3-API
server (moto's, on 127.0.0.1), giving what the same runs give on local disk; outputs there
are sharded (one object per block); a slide is read by the tiles its tissue needs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
import zarr

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.jobs.inference import model_geometry
from pipeline.jobs.objects import ObjectSettings, plan_objects
from pipeline.jobs.predict import PredictSettings, plan_prediction, predict
from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import plan_tiles
from pipeline.storage import files, slides

from conftest import SHARED_DATA, cells, make_model, write_zarr


def levels(url: str) -> list[np.ndarray]:
    """Every level of an OME-Zarr image, as its multiscales lists them."""
    group = zarr.open_group(url, mode="r")
    return [group[d["path"]][...] for d in storage.ome_metadata(dict(group.attrs))["datasets"]]


def assert_same_image(a: str, b: str) -> int:
    """The two OME-Zarr images hold the same levels, bit for bit; returns how many."""
    got, want = levels(a), levels(b)
    assert len(got) == len(want)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    return len(got)


def in_process(plan, settings, **kwargs):
    return blockwise.execute(plan, settings, in_process=True, **kwargs)


@pytest.fixture(scope="module")
def s3_client(s3):
    """A LocalCluster started after the S3 environment is set: its worker processes inherit it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


# --- layout, no server ---------------------------------------------------------------------


def test_a_shard_is_a_block_and_never_spans_two():
    chunks, shards = storage.output_layout((3, 5000, 3000), (3, 2048, 2048), 2, sharded=True)
    assert shards == (3, 2048, 2048) and chunks == (3, 512, 512)
    # a block edge that 512 does not divide: the largest divisor below it
    assert storage.output_layout((1, 5000, 5000), (1, 1000, 1000), 2, sharded=True)[0] == (1, 500, 500)
    # one block across an axis: the shard rounds up past the edge, still one shard
    assert storage.output_layout((2, 300, 5000), (2, 300, 2048), 2, sharded=True) == ((2, 300, 512), (2, 300, 2048))
    assert storage.output_layout((2, 40, 300, 300), (2, 40, 256, 256), 3, sharded=True) == ((2, 40, 64, 64), (2, 40, 256, 256))
    assert storage.output_layout((2, 600, 600), (2, 256, 256), 2, sharded=False) == ((2, 256, 256), None)
    with pytest.raises(InputError, match="--chunk-size 100: does not divide the block edge 256"):
        storage.output_layout((2, 600, 600), (2, 256, 256), 2, sharded=True, chunk_size=100)
    assert storage.is_object_store("s3://b/o.zarr") and storage.is_object_store("memory://o.zarr")
    assert not storage.is_object_store("file:///tmp/o.zarr") and not storage.is_object_store("/tmp/o.zarr")


def test_stored_chunks_of_a_sharded_array_are_its_shards():
    array = zarr.create_array("memory://overtile-s3-test/sharded.zarr", shape=(2, 100, 70), chunks=(2, 16, 16),
                              shards=(2, 32, 32), dtype="float32", fill_value=np.nan, overwrite=True)
    array[:, 32:64, 0:32] = 1.0  # shard (1, 0)
    array[:, 96:100, 64:70] = 1.0  # the corner shard, which reaches past both edges
    stored = storage.stored_chunks(array)
    assert stored.shape == (1, 4, 3) and storage.write_unit(array) == (2, 32, 32)
    assert {tuple(map(int, i[1:])) for i in np.argwhere(stored)} == {(1, 0), (3, 2)}


# --- against the S3 server -----------------------------------------------------------------


@pytest.mark.slow
def test_prediction_on_s3_equals_the_local_one_with_one_object_per_block(s3, s3_client, model_2d, tmp_path):
    """Zarr in and OME-Zarr out on S3, on a cluster whose workers reach S3 through their
    environment: the values of every level are the local run's, the output is sharded (one
    object per block, four chunks inside), and a rerun finds every block in the ledger."""
    data = cells((333, 270))
    kwargs = dict(model=str(model_2d), block_size=128, chunk_size=64)
    remote = PredictSettings(input=write_zarr(s3.url("cells.zarr"), data), output=s3.url("p.zarr"), **kwargs)
    _, summary = predict(remote, client=s3_client)
    local = PredictSettings(input=write_zarr(tmp_path / "cells.zarr", data), output=str(tmp_path / "p.zarr"), **kwargs)
    predict(local, client=s3_client)
    assert summary.done == 9
    assert assert_same_image(remote.output, local.output) > 1  # the pyramid too
    on_s3, on_disk = zarr.open_array(remote.output + "/0", mode="r"), zarr.open_array(local.output + "/0", mode="r")
    assert on_s3.shards == (2, 128, 128) and on_s3.chunks == (2, 64, 64)
    assert on_disk.shards is None and on_disk.chunks == (2, 64, 64)  # local: unsharded, as asked
    assert s3.count("p.zarr/0/c") == 9 and s3.count("p.zarr/ledger/c") == 9
    _, again = predict(remote, client=s3_client)
    assert again.done == 0 and again.skipped == 9


@pytest.mark.slow
def test_interrupted_run_on_s3_resumes_to_the_clean_result(s3, model_2d, tmp_path):
    data = cells((200, 260), seed=1)
    kwargs = dict(model=str(model_2d), block_size=64)
    clean = PredictSettings(input=write_zarr(tmp_path / "in.zarr", data), output=str(tmp_path / "clean.zarr"), **kwargs)
    in_process(plan_prediction, clean)
    settings = PredictSettings(input=write_zarr(s3.url("resume/in.zarr"), data), output=s3.url("resume/p.zarr"), **kwargs)
    seen = []

    def stop_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the flow process dies

    with pytest.raises(KeyboardInterrupt):
        in_process(plan_prediction, settings, on_result=stop_after_three)
    assert s3.count("resume/p.zarr/ledger/c") == 3
    _, resumed = in_process(plan_prediction, settings)
    assert resumed.skipped == 3 and resumed.done == 20 - 3
    assert assert_same_image(settings.output, clean.output) > 1


def ome_tiff(shape=(4096, 8192), blob=((1000, 1300), (5000, 5400)), tile=256, sublevels=3) -> bytes:
    """A pyramidal OME-TIFF of a slide that is mostly glass (noisy white, JPEG tiles of
    ``tile``) with one small blob of pink tissue; sub-resolutions in SubIFDs."""
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(235, 4, (tile, tile, 3)), 0, 255).astype(np.uint8)
    image = np.tile(glass, (shape[0] // tile, shape[1] // tile, 1))
    (y0, y1), (x0, x1) = blob
    tissue = np.array([200, 110, 170]) + rng.normal(0, 15, (y1 - y0, x1 - x0, 3))
    image[y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 90})
    out = io.BytesIO()
    with tifffile.TiffWriter(out, ome=True) as tw:
        tw.write(image, subifds=sublevels, metadata={"axes": "YXS"}, **opts)
        for k in range(1, sublevels + 1):
            tw.write(image[:: 2**k, :: 2**k], subfiletype=1, **opts)
    return out.getvalue()


def tile_bytes(page, box: Box) -> int:
    """Bytes of the tiles of ``page`` that ``box`` (y, x) touches."""
    across = -(-page.imagewidth // page.tilewidth)
    rows = range(box.offset[0] // page.tilelength, -(-box.stop[0] // page.tilelength))
    cols = range(box.offset[1] // page.tilewidth, -(-box.stop[1] // page.tilewidth))
    return sum(int(page.databytecounts[r * across + c]) for r in rows for c in cols)


@pytest.mark.slow
def test_slide_on_s3_is_read_by_the_tiles_its_tissue_needs(s3, tmp_path):
    """A 4096×8192 OME-TIFF on S3 with a tissue mask: the run fetches the mask's level and
    the tiles of the tissue blocks (with their context), a third of the file at most, and
    writes what the same run on the local file writes."""
    data = ome_tiff()
    path = tmp_path / "slide.ome.tif"
    path.write_bytes(data)
    url = s3.url("slides/slide.ome.tif")
    s3.filesystem().pipe(url, data)
    model = make_model(tmp_path / "rgb.pt", in_channels=3, base_channels=2)
    kwargs = dict(model=str(model), block_size=512, tissue="saturation", pyramid=False)
    before = slides.bytes_read(url)
    job, summary = in_process(plan_prediction, PredictSettings(input=url, output=s3.url("slides/p.zarr"), **kwargs))
    fetched = slides.bytes_read(url) - before
    in_process(plan_prediction, PredictSettings(input=str(path), output=str(tmp_path / "p.zarr"), **kwargs))
    np.testing.assert_array_equal(zarr.open_array(s3.url("slides/p.zarr/0"), mode="r")[...],
                                  zarr.open_array(str(tmp_path / "p.zarr/0"), mode="r")[...])

    assert "level 1 (2048×4096 px)" in job.tissue and summary.done == 4 and summary.background == 128 - 4
    with tifffile.TiffFile(path) as tif:
        full, mask_level = (tif.series[0].levels[k].pages[0] for k in (0, 1))
        geometry = model_geometry(str(model))
        computed = {r["block"] for r in summary.records}
        tiles = sum(tile_bytes(full, plan_tiles(geometry, b.write, job.tile_size, 0.5).read.clip(full.shape[:2]))
                    for b in job.blocks() if b.key in computed)  # each block reads its own, context included
        needed = tiles + sum(mask_level.databytecounts)
    headers = 2 * 64 * 1024  # the plan and the blocks' source each parse the IFDs once
    assert needed <= fetched <= needed + headers
    assert fetched < len(data) / 3


@pytest.mark.slow
def test_objects_on_s3_equal_the_local_ones(s3, tmp_path):
    """The object job over sharded probabilities on S3 (its blocks found from the shards
    stored), with its labels, work files and Parquet table there, gives the local result."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    p = ndimage.gaussian_filter(rng.random((96, 80)), 3)
    p = ((p - p.min()) / np.ptp(p)).astype(np.float32)
    p[:, 64:] = np.nan  # the last block column was not computed (no tissue): no shards there
    outputs = {}
    for where, url in (("s3", s3.url("objects/p.zarr")), ("local", str(tmp_path / "p.zarr"))):
        sharded = where == "s3"  # blocks of 32 either way: 4 chunks in a shard, or a chunk each
        chunks, shards = storage.output_layout((2, 96, 80), (2, 32, 32), 2, sharded, chunk_size=16 if sharded else None)
        array = storage.create_image(url, (2, 96, 80), chunks, "float32", "cyx", name="probabilities", shards=shards,
                                     attrs={"overtile": {"output_kind": "probabilities"}}, overwrite=True)
        array[...] = np.stack([1 - p, p])
        out = url.replace("p.zarr", "o.zarr")
        job, summary = in_process(plan_objects, ObjectSettings(probabilities=url, output=out, grow_distance=2,
                                                               min_size=5))
        assert job.block_shape == (32, 32) and len(job.present) == 3 * 2
        outputs[where] = (out, job.table, job.objects)
    assert outputs["s3"][2] == outputs["local"][2] > 0
    assert_same_image(outputs["s3"][0], outputs["local"][0])
    remote, local = (files.read_parquet(outputs[w][1]) for w in ("s3", "local"))
    assert remote.keys() == local.keys()
    order_r, order_l = np.argsort(remote["id"]), np.argsort(local["id"])
    for name in local:
        np.testing.assert_array_equal(remote[name][order_r], local[name][order_l])
    assert zarr.open_array(outputs["s3"][0] + "/0", mode="r").shards is not None
    assert not files.exists(outputs["s3"][0] + "/work")


@pytest.mark.skipif(not (SHARED_DATA / "slides" / "small.svs").exists(), reason="../shared/data/slides is absent")
def test_an_svs_in_the_bucket_reads_as_the_file_does(s3):
    """An Aperio SVS (JPEG tiles) read in place from the bucket: every level pixel for pixel
    what the same file reads from disk, by range requests."""
    local = SHARED_DATA / "slides" / "small.svs"
    remote = s3.url("slides/small.svs")
    s3.filesystem().put(str(local), remote)
    here, there = storage.open_image(str(local)), storage.open_image(remote)
    assert there.axes == here.axes and there.spatial_shape == here.spatial_shape
    np.testing.assert_array_equal(np.asarray(there.array[...]), np.asarray(here.array[...]))
    assert 0 < slides.bytes_read(remote) <= local.stat().st_size


def test_a_file_written_into_a_missing_bucket_makes_no_bucket(s3):
    """A typo in a bucket name is an error, not a new bucket (s3fs's makedirs would make one)."""
    from pipeline.storage import files

    with pytest.raises(Exception):
        files.put_text("s3://overtile-typo-bucket/study/x/slide.json", "{}")
    assert "overtile-typo-bucket" not in [p.rstrip("/") for p in s3.filesystem().ls("")]
