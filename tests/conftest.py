"""Shared fixtures: small generated images, tiny checkpoints, a real Dask LocalCluster, real
servers (Prefect, an S3-API object store)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.numerics.unet import UNet, save_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_model(path: Path, seed: int = 0, **kwargs) -> Path:
    torch.manual_seed(seed)
    kwargs.setdefault("base_channels", 4)
    save_model(UNet(**kwargs), path)
    return path


def cells(shape: tuple[int, ...], seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """Blobby, cell-like test image: smoothed noise, so that the net sees structure."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random(shape), 3)
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    if np.issubdtype(dtype, np.integer):
        return (img * np.iinfo(dtype).max).astype(dtype)
    return img.astype(dtype)


def write_zarr(path: Path | str, data: np.ndarray, chunks=None, zarr_format: int = 3) -> str:
    chunks = chunks or tuple(min(64, n) for n in data.shape)
    a = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
                          zarr_format=zarr_format, overwrite=True)
    a[...] = data
    return str(path)


@pytest.fixture(scope="session")
def model_2d(tmp_path_factory) -> Path:
    """A paper-geometry (depth 5, valid) 2-D U-Net, 4 base channels: 16-px grid, margin 92."""
    return make_model(tmp_path_factory.mktemp("models") / "unet2d.pt")


@pytest.fixture(scope="session")
def model_3d(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "unet3d.pt", dims=3, depth=3, base_channels=2)


@pytest.fixture(scope="session")
def image_2d(tmp_path_factory) -> tuple[str, np.ndarray]:
    data = cells((333, 270))
    return write_zarr(tmp_path_factory.mktemp("images") / "img2d.zarr", data), data


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster: two worker processes with one thread each, on 127.0.0.1, shared by
    the whole session (a cluster's start and its workers' imports cost seconds each time).
    Tests that need a cluster of another shape, or one that sees environment set later (the
    S3 tests' ``s3_client``), start their own."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server start`` on 127.0.0.1 (SQLite in a temporary PREFECT_HOME),
    shared by the flow, deployment and UI tests; stopped by PID with everything it spawned."""
    from servers import PrefectServer, free_port

    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"), free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefect_api(prefect_server):
    """This process's flows report to the test server (not to an ephemeral one)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api}):
        yield prefect_server


# What the S3 tests' processes see: dummy credentials for the local moto server, never real ones.
S3_ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "overtile-test", "AWS_SECRET_ACCESS_KEY": "overtile-test",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Bucket:
    """A bucket on the test's S3 server: ``url("a.zarr")`` is ``s3://BUCKET/a.zarr``."""

    endpoint: str
    name: str

    def url(self, path: str) -> str:
        return f"s3://{self.name}/{path}"

    def filesystem(self):
        """An s3fs filesystem of its own (no listings cached from other calls)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def count(self, prefix: str) -> int:
        """Objects stored under ``prefix`` (a path in the bucket)."""
        return len(self.filesystem().find(f"{self.name}/{prefix.strip('/')}"))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-API server (moto's, on 127.0.0.1) with one bucket. Credentials, region and
    endpoint reach s3fs and botocore through the environment only (``AWS_ENDPOINT_URL``),
    set here before any Dask cluster of the module starts (worker processes inherit it) and
    restored afterwards; other AWS variables are hidden meanwhile."""
    pytest.importorskip("moto", reason="moto[server] (the dev extra) runs the S3 tests' object store")
    pytest.importorskip("s3fs", reason="s3fs reads and writes s3:// URLs")
    import s3fs
    from servers import S3Server, free_port

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log", free_port())
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    try:
        server.start()
        for k in saved:
            del os.environ[k]
        os.environ.update(S3_ENVIRONMENT, AWS_ENDPOINT_URL=server.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps filesystems per process, with their endpoint
        bucket = Bucket(server.endpoint, "overtile-test")
        bucket.filesystem().mkdir(bucket.name)
        yield bucket
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def slurm_site_spec(folder: Path) -> Path:
    """deploy/slurm/cluster.yaml as a site would fill in its SITE lines for this one-node
    SLURM: partition debug, no account, loopback, one core and 2 GiB per job, scratch, logs
    and the TLS files in ``folder``, at most two jobs at once."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "cluster.yaml").read_text())
    for profile in spec["jobqueue"].values():
        profile.update({"queue": "debug", "account": None, "interface": "lo", "cores": 1, "processes": 1,
                        "memory": "2GiB", "walltime": "00:30:00", "local-directory": str(folder / "scratch"),
                        "log-directory": str(folder / "logs"), "shared-temp-directory": str(folder / "tls"),
                        "death-timeout": 60, "adapt": {"minimum-jobs": 0, "maximum-jobs": 2}})
        profile.pop("job-cpu", None)
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node SLURM (tests/slurm.py) and a site spec for it: this process's SLURM
    commands, and dask-jobqueue's, use it (``SLURM_CONF``, ``OVERTILE_SLURM_SPEC``); worker
    jobs inherit this environment (sbatch's --export=ALL). Skipped with the reason when SLURM
    cannot run here; stopped by PID with every job cancelled."""
    from slurm import Slurm, missing

    reason = missing()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("slurm")
    server = Slurm(home)
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "OVERTILE_SLURM_SPEC")}
    try:
        server.start()
        os.environ.update(server.env, OVERTILE_SLURM_SPEC=str(slurm_site_spec(home)))
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
