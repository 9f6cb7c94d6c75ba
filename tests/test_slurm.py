"""Blocks on a real SLURM (the one-node SLURM of tests/slurm.py, Debian's packages): jobs run
their blocks on dask-jobqueue worker jobs made from deploy/'s CPU profile (as a site fills in
its SITE lines), scaled to the pending blocks; outputs equal a local cluster's; a worker job
cancelled mid-run costs only its blocks in flight; the cluster speaks TLS with its own
certificates and refuses a client without them."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import zarr

from pipeline.jobs.cohort import CohortSettings, run_cohort
from pipeline.jobs.predict import PredictSettings, predict
from pipeline.jobs.weights import WeightSettings, weight_maps

from conftest import cells, make_model, write_zarr

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
SLURM_CPU = "slurm:overtile-cpu"


def job_pids(slurm) -> set[int]:
    """Every process of every running job on the node (the worker processes included)."""
    lines = slurm.run("scontrol", "listpids").splitlines()[1:]
    return {int(line.split()[0]) for line in lines if line.split() and line.split()[0].isdigit()}


def array(url: str) -> np.ndarray:
    return zarr.open_array(url, mode="r")[...]


def test_predict_on_slurm_jobs_equals_the_local_run(slurm, client, image_2d, model_2d, tmp_path):
    url, _ = image_2d
    on_slurm, local = tmp_path / "slurm.zarr", tmp_path / "local.zarr"
    pids: list[tuple[int, bool]] = []
    submitted: list[int] = []

    def on_result(record: dict) -> None:
        pids.append((record["worker_pid"], record["worker_pid"] in job_pids(slurm)))
        submitted.append(len(slurm.jobs()))

    settings = PredictSettings(input=url, output=str(on_slurm), model=str(model_2d), block_size=128, scheduler=SLURM_CPU)
    _, summary = predict(settings, on_result=on_result)
    assert summary.done == 9 and all(in_job for _, in_job in pids), pids  # every block ran in a SLURM job
    assert 1 <= max(submitted) <= 2  # adaptive, within the profile's maximum-jobs
    predict(settings.model_copy(update={"output": str(local), "scheduler": None}), client=client)
    for level in ("0", "1"):
        np.testing.assert_array_equal(array(f"{on_slurm}/{level}"), array(f"{local}/{level}"))


def test_weight_maps_on_slurm_equal_the_local_run(slurm, client, tmp_path):
    from scipy import ndimage

    labels, _ = ndimage.label(cells((200, 240), seed=3) > 140)
    source = write_zarr(tmp_path / "labels.zarr", labels.astype(np.uint16))
    settings = WeightSettings(labels=source, output=str(tmp_path / "slurm.zarr"), block_size=64, scheduler="slurm")
    weight_maps(settings)
    weight_maps(settings.model_copy(update={"output": str(tmp_path / "local.zarr"), "scheduler": None}), client=client)
    np.testing.assert_array_equal(array(f"{tmp_path}/slurm.zarr/0"), array(f"{tmp_path}/local.zarr/0"))


def test_a_cancelled_worker_job_loses_only_its_blocks(slurm, client, model_2d, tmp_path):
    """scancel of a running worker job while blocks run: Dask redoes its blocks in flight on
    the other job or a replacement the adaptive cluster submits; the run completes and equals
    the local one."""
    url = write_zarr(tmp_path / "image.zarr", cells((512, 512), seed=9))
    cancelled: list[str] = []
    lock = threading.Lock()

    def on_result(record: dict) -> None:
        with lock:
            running = [j for j in slurm.jobs() if j["state"] == "RUNNING"]
            if not cancelled and len(running) == 2:
                cancelled.append(running[0]["id"])
                slurm.run("scancel", running[0]["id"])

    settings = PredictSettings(input=url, output=str(tmp_path / "slurm.zarr"), model=str(model_2d), block_size=64,
                               scheduler=SLURM_CPU)
    _, summary = predict(settings, on_result=on_result)
    assert cancelled, "no two jobs ran at once, so none was cancelled mid-run"
    assert summary.done == 64 and not summary.failed
    assert zarr.open_group(str(tmp_path / "slurm.zarr"), mode="r")["ledger"][...].all()
    predict(settings.model_copy(update={"output": str(tmp_path / "local.zarr"), "scheduler": None}), client=client)
    np.testing.assert_array_equal(array(f"{tmp_path}/slurm.zarr/0"), array(f"{tmp_path}/local.zarr/0"))


def test_a_study_on_slurm(slurm, tmp_path):
    from test_cohort import write_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "a.ome.tiff", (256, 320), ((40, 200), (50, 280)), seed=1)
    write_slide(folder / "b.ome.tiff", (192, 256), ((0, 192), (0, 256)), seed=2)
    model = make_model(tmp_path / "rgb.pt", in_channels=3, base_channels=2)
    settings = CohortSettings(slides=str(folder), output=str(tmp_path / "slurm"), model=str(model), block_size=128,
                              scheduler=SLURM_CPU)
    rows = run_cohort(settings)
    assert [r["status"] for r in rows] == ["finished", "finished"], rows
    local = run_cohort(settings.model_copy(update={"output": str(tmp_path / "local"), "scheduler": None, "workers": 1}))
    for row, here in zip(rows, local):
        np.testing.assert_array_equal(array(f"{row['prediction']}/0"), array(f"{here['prediction']}/0"))


def test_the_cluster_speaks_tls_and_refuses_a_client_without_its_certificate(slurm, caplog):
    from distributed import Client
    from distributed.security import Security

    from pipeline.clusters.slurm import slurm_cluster

    with slurm_cluster("overtile-cpu") as cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tls://")
        cluster.scale(jobs=1)
        client.wait_for_workers(1, timeout=60)
        with pytest.raises((OSError, TimeoutError)):  # a certificate of another authority: refused
            Client(cluster.scheduler_address, security=Security.temporary(), timeout="3s")
        with pytest.raises((OSError, TimeoutError)):  # plain TCP: refused
            Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="3s")
        assert client.submit(sum, [1, 2], pure=False).result(timeout=60) == 3  # the run goes on
    with caplog.at_level(logging.WARNING, logger="overtile"), slurm_cluster("overtile-cpu", security=False) as plain:
        assert plain.scheduler_address.startswith("tcp://")
    assert any("TLS is off" in r.getMessage() for r in caplog.records)
