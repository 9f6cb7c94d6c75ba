"""Shared fixtures: small generated images, tiny checkpoints, a real Dask LocalCluster."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster: two worker processes with one thread each, on 127.0.0.1."""
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
