"""The Prefect flows against a real Prefect server: results equal the pipeline's, artifacts
say what happened, reruns skip finished blocks, and a flow process killed with SIGKILL is
finished by a rerun that does only the missing blocks, bit-identical to a clean run."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import zarr

from pipeline.jobs.ingest import IngestSettings
from pipeline.jobs.predict import PredictSettings, predict
from pipeline.jobs.train import TrainSettings
from pipeline.jobs.weights import WeightSettings
from pipeline.numerics.weightmap import weight_map

from conftest import cells, write_zarr

pytestmark = [pytest.mark.slow,  # a Prefect server, Dask clusters, flow runs
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]

SKIPPED = "blocks skipped (finished earlier, per the ledger)"
COMPUTED = "blocks computed in this run"


@pytest.fixture(autouse=True)
def logs_reach_the_server():
    """After each test, this process's flow-run logs and events are sent while the test server
    still runs: left queued, they are retried against the stopped server at exit, which holds
    up the end of the session by over a minute ("--- Error logging to API ---")."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def table(artifact: dict) -> dict[str, str]:
    data = artifact["data"]
    rows = json.loads(data) if isinstance(data, str) else data
    return {r["what"]: r["value"] for r in rows}


def test_segment_flow_writes_what_predict_writes_and_reports_it(prefect_api, client, image_2d, model_2d, tmp_path):
    from flows.segment import segment

    url, _ = image_2d
    settings = PredictSettings(input=url, output=str(tmp_path / "flow.zarr"), model=str(model_2d), block_size=128,
                               scheduler=client.scheduler.address, tta="identity,rot90")
    state = segment(settings, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result[COMPUTED] == 9 and result[SKIPPED] == 0

    predict(settings.model_copy(update={"output": str(tmp_path / "direct.zarr"), "scheduler": None}), client=client)
    flow_out = zarr.open_array(str(tmp_path / "flow.zarr" / "0"), mode="r")[...]
    assert np.array_equal(flow_out, zarr.open_array(str(tmp_path / "direct.zarr" / "0"), mode="r")[...])

    artifacts = prefect_api.artifacts(run_id(state))
    assert artifacts["segment-progress"]["data"] == pytest.approx(100.0)
    summary = table(artifacts["segment-summary"])
    assert summary[COMPUTED] == "9" and summary[SKIPPED] == "0" and summary["blocks failed"] == "0"
    assert summary["input"] == url and summary["model"] == str(model_2d) and summary["output"] == settings.output
    assert summary["test-time augmentation"].startswith("2 transforms (identity, rot90) averaged in probability space")
    assert float(summary["megapixels per second"]) > 0
    assert "data:image/jpeg;base64," in artifacts["segment-preview"]["data"]
    assert (tmp_path / "flow.zarr.preview.png").stat().st_size > 1000

    # a second run with the same settings: every block is in the ledger, nothing is computed
    again = segment(settings, return_state=True)
    assert again.result()[COMPUTED] == 0 and again.result()[SKIPPED] == 9
    rerun = prefect_api.artifacts(run_id(again))
    assert table(rerun["segment-summary"])[SKIPPED] == "9"
    assert rerun["segment-progress"]["data"] == pytest.approx(100.0)
    assert np.array_equal(zarr.open_array(str(tmp_path / "flow.zarr" / "0"), mode="r")[...], flow_out)

    # overwrite starts over
    fresh = segment(settings.model_copy(update={"overwrite": True}), return_state=True)
    assert fresh.result()[COMPUTED] == 9 and fresh.result()[SKIPPED] == 0


def test_segment_flow_with_objects_chains_them_on_the_same_cluster(prefect_api, client, image_2d, model_2d, tmp_path):
    from flows.segment import segment
    from pipeline.jobs.objects import ObjectOptions, ObjectSettings, find_objects

    url, _ = image_2d
    settings = PredictSettings(input=url, output=str(tmp_path / "p.zarr"), model=str(model_2d), block_size=128,
                               scheduler=client.scheduler.address)
    predict(settings.model_copy(update={"output": str(tmp_path / "first.zarr"), "scheduler": None}), client=client)
    p = zarr.open_array(str(tmp_path / "first.zarr" / "0"), mode="r")[1]
    threshold = float(np.quantile(p, 0.7))  # a random model: its own cells, as many as it makes
    options = ObjectOptions(output=str(tmp_path / "cells.zarr"), threshold=threshold, grow_distance=2, min_size=4)
    state = segment(settings, objects=options, return_state=True)
    assert state.is_completed()
    objects = state.result()["objects"]
    direct = ObjectSettings(probabilities=settings.output, output=str(tmp_path / "direct.zarr"), image=url,
                            block_size=128, threshold=threshold, grow_distance=2, min_size=4)
    job, _ = find_objects(direct, client=client)
    flow_labels = zarr.open_array(str(tmp_path / "cells.zarr" / "0"), mode="r")[...]
    assert np.array_equal(flow_labels, zarr.open_array(str(tmp_path / "direct.zarr" / "0"), mode="r")[...])
    assert objects["objects"] == job.objects == flow_labels.max() > 0

    artifacts = prefect_api.artifacts(run_id(state))
    summary = table(artifacts["objects-summary"])
    assert summary["objects"] == str(job.objects) and summary["object table (Parquet)"].endswith("cells.parquet")
    assert "data:image/jpeg;base64," in artifacts["objects-preview"]["data"]
    assert artifacts["objects-progress"]["data"] == pytest.approx(100.0)


def test_bad_input_fails_the_flow_in_planning_with_the_clear_message(prefect_api, client, model_2d, tmp_path):
    from flows.segment import segment

    settings = PredictSettings(input=str(tmp_path / "missing.zarr"), output=str(tmp_path / "o.zarr"),
                               model=str(model_2d), scheduler=client.scheduler.address)
    state = segment(settings, return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="missing.zarr"):
        state.result()
    assert not (tmp_path / "o.zarr").exists()


def test_weight_maps_flow_equals_the_in_memory_map(prefect_api, client, tmp_path):
    from flows.weight_maps import weight_maps_flow

    labels = np.zeros((150, 170), np.uint16)
    labels[20:60, 20:80], labels[20:60, 82:140], labels[90:140, 30:160] = 1, 2, 3  # two touch across a gap
    url = write_zarr(tmp_path / "labels.zarr", labels, chunks=(64, 64))
    settings = WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), block_size=64, scheduler=client.scheduler.address)
    state = weight_maps_flow(settings, return_state=True)
    assert state.is_completed() and state.result()[COMPUTED] == 9
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "w.zarr" / "0"), mode="r")[...], weight_map(labels), atol=1e-4)
    artifacts = prefect_api.artifacts(run_id(state))
    assert "data:image/jpeg;base64," in artifacts["weight-maps-preview"]["data"]
    assert table(artifacts["weight-maps-summary"])["w0"] == "10.0"
    assert artifacts["weight-maps-progress"]["data"] == pytest.approx(100.0)
    assert weight_maps_flow(settings, return_state=True).result()[SKIPPED] == 9


def test_ingest_flow_copies_every_level_of_the_slide_and_a_rerun_skips_them(prefect_api, client, tmp_path, monkeypatch):
    import tifffile

    from flows.ingest import ingest_flow

    data = np.stack([cells((150, 170), seed=k) for k in range(3)], axis=-1)
    slide = tmp_path / "slide.tif"
    with tifffile.TiffWriter(slide) as tw:  # a tiled pyramid, sub-resolutions in SubIFDs
        opts = dict(tile=(64, 64), photometric="rgb", compression="zlib")
        tw.write(data, subifds=2, **opts)
        for level in (data[::2, ::2], data[::4, ::4]):
            tw.write(level, subfiletype=1, **opts)
    with tifffile.TiffFile(slide) as tif:
        expected = [np.moveaxis(level.asarray(), -1, 0) for level in tif.series[0].levels]
    settings = IngestSettings(slide=str(slide), output=str(tmp_path / "slide.zarr"), block_size=64,
                              scheduler=client.scheduler.address)
    total = 3 * 3 + 2 * 2 + 1  # blocks of 64² over 150×170, 75×85 and 38×43

    state = ingest_flow(settings, return_state=True)
    assert state.is_completed() and state.result()[COMPUTED] == total and state.result()[SKIPPED] == 0
    group = zarr.open_group(settings.output, mode="r")
    assert [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]] == ["0", "1", "2"]
    for i, want in enumerate(expected):
        got = group[str(i)][...]
        assert got.dtype == want.dtype and np.array_equal(got, want), f"level {i}"

    artifacts = prefect_api.artifacts(run_id(state))
    summary = table(artifacts["ingest-summary"])
    assert summary[COMPUTED] == str(total) and summary[SKIPPED] == "0" and summary["blocks failed"] == "0"
    assert summary["slide"] == str(slide) and summary["output"] == settings.output and summary["format"] == "tiff"
    assert summary["levels"] == "3×150×170; 3×75×85; 3×38×43" and summary["axes"] == "cyx" and summary["dtype"] == "uint8"
    assert artifacts["ingest-progress"]["data"] == pytest.approx(100.0)

    # a second run with the same settings: every block is in the ledger, nothing is copied
    again = ingest_flow(settings, return_state=True)
    assert again.result()[COMPUTED] == 0 and again.result()[SKIPPED] == total
    assert table(prefect_api.artifacts(run_id(again))["ingest-summary"])[SKIPPED] == str(total)
    assert all(np.array_equal(group[str(i)][...], want) for i, want in enumerate(expected))

    # without a scheduler or workers the flow copies in its own process, as the CLI does, even
    # where OVERTILE_SCHEDULER names a cluster for the other flows (here one that is not there)
    monkeypatch.setenv("OVERTILE_SCHEDULER", "tcp://127.0.0.1:9")
    here = settings.model_copy(update={"output": str(tmp_path / "here.zarr"), "scheduler": None})
    state = ingest_flow(here, return_state=True)
    assert state.is_completed(), state.message
    assert np.array_equal(zarr.open_group(here.output, mode="r")["0"][...], expected[0])


def test_train_flow_reports_curves_and_scores(prefect_api, tmp_path):
    from flows.train import train_flow

    rng = np.random.default_rng(0)
    masks = np.zeros((3, 64, 64), np.uint8)
    for z in range(3):
        for _ in range(6):
            y, x = rng.integers(8, 56, 2)
            masks[z, y - 6:y + 6, x - 6:x + 6] = 255
    images = np.clip(masks * 0.6 + rng.normal(50, 20, masks.shape), 0, 255).astype(np.uint8)
    settings = TrainSettings(
        images=write_zarr(tmp_path / "img.zarr", images), labels=write_zarr(tmp_path / "lab.zarr", masks),
        out=str(tmp_path / "run"), axes="zyx", dims=2, val_slices=(2,), steps=6, val_every=3, checkpoint_every=3, depth=2,
        base_channels=4, tile_size=44, threads=1, channels_last=False, optimizer="adam",
    )
    state = train_flow(settings, return_state=True)
    assert state.is_completed()
    assert state.result()["steps"] == "1-6"
    artifacts = prefect_api.artifacts(run_id(state))
    assert artifacts["train-progress"]["data"] == pytest.approx(100.0)
    summary = table(artifacts["train-summary"])
    assert 0.0 <= float(summary["best rand error"]) <= 1.0 and summary["best step (validation)"] in ("3", "6")
    assert "data:image/jpeg;base64," in artifacts["train-curves"]["data"]
    assert (tmp_path / "run" / "last.pt").exists()


def test_killed_flow_process_then_rerun_does_only_the_missing_blocks(prefect_api, client, model_2d, tmp_path):
    """SIGKILL the flow process mid-way: the rerun finishes the output bit-identical to a
    clean run, computing only the blocks the ledger did not mark."""
    import psutil

    from flows.segment import segment

    url = write_zarr(tmp_path / "in.zarr", cells((768, 512), seed=3))
    settings = PredictSettings(input=url, output=str(tmp_path / "killed.zarr"), model=str(model_2d), block_size=64,
                               workers=2)
    total = 12 * 8  # blocks of a few ms each: enough that the kill lands before the last
    flow = prefect_api.spawn([sys.executable, "-m", "flows.segment", settings.model_dump_json()], "killed-flow.log")
    ledger = tmp_path / "killed.zarr" / "ledger"
    deadline, done = time.monotonic() + 120, 0
    while time.monotonic() < deadline and flow.poll() is None:
        if (ledger / "zarr.json").exists():
            done = int((zarr.open_array(str(ledger), mode="r")[...] > 0).sum())
            if done >= 4:
                break
        time.sleep(0.02)
    assert flow.poll() is None, f"the flow ended before it could be killed: {(prefect_api.home / 'killed-flow.log').read_text()[-3000:]}"
    # Freeze the flow (its scheduler) and its workers at once, then kill the flow: a kill
    # that lands while the workers run on would let them finish every block first (seen in
    # the full suite, when this process waited for a core between its look and the kill).
    flow_process = psutil.Process(flow.pid)
    flow_process.suspend()
    children = flow_process.children(recursive=True)
    for p in children:
        p.suspend()
    os.kill(flow.pid, signal.SIGKILL)
    flow.wait(10)
    for p in children:
        p.resume()  # stopped processes cannot notice that their parent died
    gone, alive = psutil.wait_procs(children, timeout=30)  # the Dask workers notice their parent died
    for p in alive:  # pragma: no cover - never seen; do not leave them behind
        p.kill()
    assert not alive, "Dask worker processes outlived the killed flow process"

    finished = int((zarr.open_array(str(ledger), mode="r")[...] > 0).sum())
    assert 4 <= finished < total
    state = segment(settings.model_copy(update={"workers": None, "scheduler": client.scheduler.address}),
                    return_state=True)
    result = state.result()
    assert result[SKIPPED] == finished and result[COMPUTED] == total - finished
    assert table(prefect_api.artifacts(run_id(state))["segment-summary"])[SKIPPED] == str(finished)

    predict(settings.model_copy(update={"output": str(tmp_path / "clean.zarr"), "workers": None}), client=client)
    out = zarr.open_array(str(tmp_path / "killed.zarr" / "0"), mode="r")[...]
    assert np.array_equal(out, zarr.open_array(str(tmp_path / "clean.zarr" / "0"), mode="r")[...])


def test_segment_flow_sends_blocks_to_its_dask_task_runner_cluster(prefect_api, image_2d, model_2d, tmp_path):
    """A deployment may give the flow a prefect_dask.DaskTaskRunner (e.g. a SLURMCluster): the
    blocks then run on that runner's cluster, not on a LocalCluster of their own."""
    from prefect_dask import DaskTaskRunner

    from flows.segment import segment

    url, _ = image_2d
    settings = PredictSettings(input=url, output=str(tmp_path / "runner.zarr"), model=str(model_2d), block_size=128)
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 2, "processes": False,
                                            "dashboard_address": None})
    state = segment.with_options(task_runner=runner)(settings, return_state=True)
    assert state.is_completed() and state.result()[COMPUTED] == 9
    assert prefect_api.logs(run_id(state), "DaskTaskRunner cluster")
    assert zarr.open_group(str(tmp_path / "runner.zarr"), mode="r")["ledger"][...].all()


def test_the_block_stage_is_not_retried_for_the_inputs_faults():
    """A retry redoes the failed blocks: for a lost worker it may pass, for a tile that does
    not decode it cannot. Input errors are marked as such where blocks are collected, and the
    Prefect task's retry condition skips a retry when they are all there is."""
    from prefect.states import Failed

    from flows.common import worth_retrying
    from pipeline.errors import BlocksFailed, InputFailure
    from pipeline.jobs.blockwise import RunSummary, _collect

    failures: list[str] = []
    _collect([("0.0", {"block": "0.0", "input_error": "slide.tif: level 0, y 0:64: cannot be decoded"}),
              ("0.1", {"block": "0.1"})], None, failures)
    assert len(failures) == 1 and isinstance(failures[0], InputFailure)
    damaged = BlocksFailed(RunSummary(2, 0, [{"block": "0.1"}], failed=failures))
    assert damaged.input_only and not worth_retrying(None, None, Failed(data=damaged))
    _collect([("1.0", RuntimeError("worker lost"))], None, failures)
    mixed = BlocksFailed(RunSummary(3, 0, [], failed=failures))
    assert not mixed.input_only and worth_retrying(None, None, Failed(data=mixed))


def test_a_retried_block_stage_reports_the_blocks_of_every_attempt(prefect_api, client, model_2d, tmp_path):
    """A block stage whose first attempt loses some blocks to a passing fault (an input chunk
    unreadable for a moment: an OSError, so worth a retry) is retried, and the retry does only
    those blocks; the run's summary counts the first attempt's blocks as computed in this run,
    not as finished earlier, and its pixels and time too."""
    import logging
    import shutil

    from flows.segment import segment

    url = write_zarr(tmp_path / "in.zarr", cells((333, 270)))
    chunk = tmp_path / "in.zarr" / "c" / "0" / "0"
    kept = tmp_path / "chunk-0-0"
    shutil.move(chunk, kept)
    chunk.symlink_to(chunk.name)  # a link to itself: reading it raises OSError (too many levels of links)

    class RestoreOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Retry 1/" in record.getMessage() and chunk.is_symlink():
                chunk.unlink()
                shutil.move(kept, chunk)

    handler = RestoreOnRetry()
    logging.getLogger("prefect.task_runs").addHandler(handler)
    try:
        settings = PredictSettings(input=url, output=str(tmp_path / "out.zarr"), model=str(model_2d), block_size=128,
                                   scheduler=client.scheduler.address)
        state = segment(settings, return_state=True)
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    assert state.is_completed() and not chunk.is_symlink(), "the first attempt did not fail, or was not retried"
    assert prefect_api.logs(run_id(state), "Retry 1/2")
    assert state.result()[COMPUTED] == 9 and state.result()[SKIPPED] == 0
    assert float(state.result()["megapixels computed"]) == pytest.approx(333 * 270 / 1e6, abs=0.01)
    summary = table(prefect_api.artifacts(run_id(state))["segment-summary"])
    assert summary[COMPUTED] == "9" and summary[SKIPPED] == "0" and summary["blocks failed"] == "0"
    direct = str(tmp_path / "direct.zarr")
    predict(settings.model_copy(update={"output": direct, "scheduler": None}), client=client)
    assert np.array_equal(zarr.open_array(str(tmp_path / "out.zarr" / "0"), mode="r")[...],
                          zarr.open_array(direct + "/0", mode="r")[...])
