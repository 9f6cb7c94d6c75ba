"""Claims the one-job-shape restructure made true, each checked on real Zarr stores and a real
Dask cluster: ingests into two outputs never share Dask tasks; a rerun against a rewritten
input does not resume; long-lived workers never read a stale input; sigma means the same
physical width in training as in ``overtile weights``; the worker count follows Dask's CPU
count; and weight maps of a binary mask relabel with each block's part of the merge table
only, and not at all when a run resumes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cells, make_model, write_zarr
from scipy import ndimage
from test_ingest import rgb_image, write_pyramid
from test_train import NO_AUGMENTATION, TINY, disks
from test_weightmaps import touching_cells

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs import blockwise, weights
from pipeline.jobs.ingest import IngestSettings, ingest
from pipeline.jobs.patches import PatchDataset
from pipeline.jobs.predict import PredictSettings, predict
from pipeline.jobs.train import TrainSettings, plan_training
from pipeline.jobs.weights import WeightSettings, label_mask, plan_weights, weight_maps
from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import predict_whole, softmax
from pipeline.numerics.unet import load_model
from pipeline.numerics.weightmap import weight_map


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """Depth 3, valid: margin 20, so a 100-px tile gives 60 px of output."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny.pt", depth=3, base_channels=2)


def predicted(client, image: str, model: Path, output: Path, **kwargs):
    settings = PredictSettings(input=image, output=str(output), model=str(model), block_size=32, tile_size=100,
                               pyramid=False, **kwargs)
    _, summary = predict(settings, client=client)
    return zarr.open_array(str(output / "0"), mode="r")[...], summary


def whole_image(model: Path, data: np.ndarray) -> np.ndarray:
    net = load_model(model)
    return softmax(predict_whole(net, net.normalization(data[None])))


# --- 1. ingest --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ingests_of_one_slide_on_one_client_both_complete(client, tmp_path):
    slide = tmp_path / "slide.tif"
    levels = write_pyramid(slide, rgb_image((160, 128)), levels=2, tile=32)
    outputs = [tmp_path / f"{n}.zarr" for n in ("a", "b")]
    results: dict[int, tuple] = {}
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()  # submitted together, so their tasks are on the scheduler at the same time
        try:
            results[i] = ingest(IngestSettings(slide=str(slide), output=str(outputs[i]), block_size=16), client=client)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    (job_a, summary_a), (job_b, summary_b) = results[0], results[1]
    assert job_a.name != job_b.name  # the Dask key prefix names the output
    for summary, output in ((summary_a, outputs[0]), (summary_b, outputs[1])):
        assert summary.done == summary.total == 10 * 8 + 5 * 4
        group = zarr.open_group(str(output), mode="r")
        for level, want in enumerate(levels):
            assert np.array_equal(group[str(level)][...], np.moveaxis(want, -1, 0))


# --- 2. a rewritten input -----------------------------------------------------------------


@pytest.mark.slow
def test_rerun_against_a_rewritten_input_is_refused_not_resumed(client, tiny_model, tmp_path):
    url = write_zarr(tmp_path / "in.zarr", cells((64, 96)))
    output = tmp_path / "p.zarr"
    first, summary = predicted(client, url, tiny_model, output)
    assert summary.done == summary.total == 6

    unchanged, again = predicted(client, url, tiny_model, output)
    assert again.done == 0 and again.skipped == 6 and np.array_equal(unchanged, first)

    rewritten = zarr.create_array(url, shape=(64, 96), chunks=(64, 64), dtype="uint8", overwrite=True)
    rewritten[...] = cells((64, 96), seed=1)
    with pytest.raises(InputError, match="holds the output of a run with other settings"):
        predicted(client, url, tiny_model, output)


# --- 3. the workers' source cache -----------------------------------------------------------


def test_cached_source_is_opened_afresh_for_a_rewritten_input(tmp_path):
    url = write_zarr(tmp_path / "in.zarr", cells((40, 40)))
    key = str(storage.stamp(storage.open_image(url)))
    held = storage.cached_image(url, None, key)
    assert held.spatial_shape == (40, 40) and storage.cached_image(url, None, key) is held

    write_zarr(url, cells((48, 32), seed=1))
    new_key = str(storage.stamp(storage.open_image(url)))
    assert new_key != key
    fresh = storage.cached_image(url, None, new_key)
    assert fresh.spatial_shape == (48, 32)
    np.testing.assert_array_equal(fresh.read(Box.from_shape(fresh.spatial_shape))[0], cells((48, 32), seed=1))


@pytest.mark.slow
def test_long_lived_workers_read_the_rewritten_input(client, tiny_model, tmp_path):
    url = str(tmp_path / "in.zarr")
    old = cells((96, 80))
    write_zarr(url, old)
    before, _ = predicted(client, url, tiny_model, tmp_path / "before.zarr")
    np.testing.assert_allclose(before, whole_image(tiny_model, old), atol=1e-5)

    new = cells((80, 112), seed=7)  # same URL, another shape and other pixels
    write_zarr(url, new)
    after, summary = predicted(client, url, tiny_model, tmp_path / "after.zarr", overwrite=True)
    assert summary.done == summary.total == 3 * 4
    np.testing.assert_allclose(after, whole_image(tiny_model, new), atol=1e-5)


# --- 4. sigma in physical units ---------------------------------------------------------------


def test_training_weight_maps_use_the_labels_pixel_size_as_overtile_weights_does(tmp_path):
    image, labels = disks((64, 64), 14, seed=2)
    pixel = (0.5, 0.5)  # µm: sigma=5 µm is 10 px here
    images_url = write_zarr(tmp_path / "img.zarr", image)
    labels_url = str(tmp_path / "lab.zarr")
    storage.create_image(labels_url, labels.shape, (32, 32), labels.dtype, "yx", name="labels", scale=list(pixel),
                         units={"y": "micrometer", "x": "micrometer"})[...] = labels

    settings = TrainSettings(images=images_url, labels=labels_url, out=str(tmp_path / "run"), steps=6,
                             **{**TINY, **NO_AUGMENTATION})
    spec = plan_training(settings).spec
    weights_job, _ = plan_weights(WeightSettings(labels=labels_url, output=str(tmp_path / "w.zarr")))
    assert spec.spacing == weights_job.spacing == pixel
    assert not spec.stats.mask  # instance labels: the weight map uses them, with a gap where two touch
    from pipeline.numerics.weightmap import touching_borders

    dataset = PatchDataset(spec)
    padded = np.pad(labels, spec.margin, mode="reflect")  # the patch's context is mirrored at the border
    crop = (slice(spec.margin, spec.margin + spec.output_size),) * 2
    differs = []
    for i in range(len(dataset)):
        _, out_box = dataset.sample_box(np.random.default_rng([spec.seed, i]))  # sample i's first draw
        patch = padded[out_box.grow(spec.margin).shift((spec.margin,) * 2).slices()]
        patch = np.where(touching_borders(patch), 0, patch)
        physical = weight_map(patch, spec.w0, spec.sigma, spec.class_weights, spacing=pixel)[crop]
        pixels = weight_map(patch, spec.w0, spec.sigma, spec.class_weights)[crop]
        got = dataset[i][2].numpy()
        np.testing.assert_allclose(got, physical, rtol=1e-6)
        differs.append(not np.allclose(got, pixels, rtol=1e-3))
    assert any(differs)


# --- 5. the worker count --------------------------------------------------------------------


@pytest.mark.slow
def test_worker_count_follows_dasks_cpu_count(monkeypatch):
    import dask.system

    assert blockwise.default_workers() == dask.system.CPU_COUNT
    monkeypatch.setattr(dask.system, "CPU_COUNT", 1)  # as a cgroup quota of one CPU reads
    assert blockwise.default_workers() == 1
    with blockwise.dask_client() as own:
        assert list(own.nthreads().values()) == [1]


# --- 6. weight maps of a binary mask ----------------------------------------------------------

RELABELLED: list[tuple[int, np.ndarray]] = []  # (block number, old ids) of every relabel task
TABLES: list[np.ndarray] = []  # the whole merge table's ids to change
_relabel_block = weights._relabel_block
_merge_table = weights.instances.merge_table


def recording_relabel(block, url, old, new):
    RELABELLED.append((block.number, np.array(old)))
    return _relabel_block(block, url, old, new)


def recording_merge_table(pairs):
    old, new = _merge_table(pairs)
    TABLES.append(old)
    return old, new


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: background where the other has it, and a bijection of ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int64), axis=0)
    return (((a == 0) == (b == 0)).all() and len(pairs) == len(np.unique(a)) == len(np.unique(b)))


@pytest.mark.slow
def test_each_relabel_task_gets_only_its_own_blocks_part_of_the_merge_table(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.setattr(weights, "_relabel_block", recording_relabel)
    monkeypatch.setattr(weights.instances, "merge_table", recording_merge_table)
    RELABELLED.clear()
    TABLES.clear()
    mask = (touching_cells((64, 64), seed=5, n=14) > 0).astype(np.uint8)
    url = write_zarr(tmp_path / "mask.zarr", mask, chunks=(16, 16))
    storage.create_image(str(tmp_path / "out.zarr"), mask.shape, (16, 16), "float32", "yx")
    # threads in this process: the recording wrapper runs where the test can see its list
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as inproc:
        instances = zarr.open_array(label_mask(inproc, storage.open_image(url), str(tmp_path / "out.zarr"), (16, 16)),
                                    mode="r")[...]

    whole, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1))
    assert same_partition(instances, whole)
    (table,) = TABLES
    stride = 16 * 16 // 2 + 2  # block b labels ids in (b * stride, (b + 1) * stride)
    assert len(RELABELLED) > 1 and len(table) > 1
    for number, old in RELABELLED:
        assert 0 < len(old) < len(table)
        assert ((old > number * stride) & (old < (number + 1) * stride)).all()
    np.testing.assert_array_equal(np.sort(np.concatenate([old for _, old in RELABELLED])), table)


@pytest.mark.slow
def test_resumed_binary_mask_run_does_not_relabel(client, tmp_path):
    mask = (touching_cells((64, 64), seed=6, n=14) > 0).astype(np.uint8)
    url = write_zarr(tmp_path / "mask.zarr", mask, chunks=(16, 16))
    output = tmp_path / "w.zarr"
    settings = WeightSettings(labels=url, output=str(output), binary=True, block_size=16)
    _, first = weight_maps(settings, client=client)
    assert first.done == first.total == 16
    clean = zarr.open_array(str(output / "0"), mode="r")[...]

    def instance_files() -> dict[str, int]:
        return {str(p.relative_to(output)): p.stat().st_mtime_ns for p in (output / "instances").rglob("*") if p.is_file()}

    labelled = instance_files()
    assert len(labelled) > 1
    (output / "ledger" / "c" / "1" / "2").unlink()  # block (1, 2) unfinished, as a killed run leaves it
    _, second = weight_maps(settings, client=client)
    assert second.done == 1 and second.skipped == 15 and second.records[0]["block"] == "1.2"
    assert instance_files() == labelled  # OUTPUT/instances untouched: no labelling pass
    np.testing.assert_array_equal(zarr.open_array(str(output / "0"), mode="r")[...], clean)



def _faults_per_allocation(megabytes: int = 64, rounds: int = 4) -> dict:
    """In a worker's task thread: page faults of allocating and freeing a block's worth of
    activation-sized buffers (256 KiB each, as a forward pass does), after a first round, and
    what glibc read at the process's start."""
    import resource

    def once() -> None:
        buffers = [np.ones(256 << 10, np.uint8) for _ in range(megabytes * 4)]
        del buffers

    once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        once()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds
    environ = dict(v.split("=", 1) for v in open("/proc/self/environ").read().split("\0") if "=" in v)
    return {"faults": faults, "environ": {k: v for k, v in environ.items() if k.startswith("MALLOC_")}}


@pytest.mark.slow
def test_workers_keep_freed_memory_instead_of_faulting_it_back(monkeypatch):
    """Dask's Nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: every freed block-sized
    buffer goes back to the kernel and is faulted in again. overtile's workers start with an
    allocator setting that keeps it, even when this process already carries Dask's (as it
    does after a first LocalCluster)."""
    from distributed import Client, LocalCluster

    from pipeline.clusters import WORKER_ENVIRONMENT
    from pipeline.jobs.blockwise import dask_client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dask_client(workers=1) as client:
        ours = client.submit(_faults_per_allocation, pure=False).result()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        dasks = client.submit(_faults_per_allocation, pure=False).result()
    assert ours["environ"] == {**ours["environ"], **WORKER_ENVIRONMENT}
    pages = (64 << 20) // 4096
    assert dasks["faults"] > pages / 2  # every round faults the buffer in again
    assert ours["faults"] < pages / 20  # the memory is kept
