"""A job's fixed costs, cut without changing a value: the pyramid computed in stacks of levels
equals the pyramid computed level by level, bit for bit; the local cluster starts while the
job plans, its workers import the job's module before its first block, and a plan that fails
or finds nothing to do leaves no cluster behind."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np
import psutil
import pytest
import zarr

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs import blockwise, pyramid
from pipeline.numerics.downsample import downsample, level_shapes
from pipeline.numerics.geometry import Block, Box, block_at, block_grid, iter_blocks

# --- the pyramid ------------------------------------------------------------------------------


def level_by_level(level0: np.ndarray, present: np.ndarray, block_shape: tuple[int, ...], factor: tuple[int, ...],
                   kind: str, fill, min_edge: int) -> list[np.ndarray]:
    """The pyramid as overtile built it before stacks: every level from the whole level above
    it, one block at a time, each block from the region above it, only below present blocks."""
    spatial = len(factor)
    levels = [level0]
    for shape in level_shapes(level0.shape, spatial, min_edge):
        below = np.zeros(block_grid(shape[-spatial:], block_shape), bool)
        for offset in np.ndindex(*factor):
            part = present[tuple(slice(o, None, f) for o, f in zip(offset, factor))]
            below[tuple(slice(0, n) for n in part.shape)] |= part
        present = below
        level = np.full(shape, fill, level0.dtype)
        for index in np.argwhere(present):
            write = block_at(index, shape[-spatial:], block_shape).write
            read = Box(tuple(o * f for o, f in zip(write.offset, factor)),
                       tuple(s * f for s, f in zip(write.shape, factor))).clip(levels[-1].shape[-spatial:])
            out = downsample(levels[-1][(Ellipsis, *read.slices())], factor, kind)
            level[(Ellipsis, *write.slices())] = out[(Ellipsis, *(slice(0, n) for n in write.shape))]
        levels.append(level)
    return levels


def sparse_image(url: str, shape: tuple[int, ...], block: tuple[int, ...], axes: str, dtype: str, seed: int):
    """An OME-Zarr image whose level 0 has data in some blocks only (the others unwritten, the
    fill), and in some of those blocks only in a small box (down to one pixel wide), as the
    edge of a computed region and its downsampled levels have."""
    rng = np.random.default_rng(seed)
    spatial = len(block)
    array = storage.create_image(url, shape, (shape[0], *block), dtype, axes, overwrite=True)
    grid = block_grid(shape[-spatial:], block)
    present = rng.random(grid) < 0.3
    present[(0,) * spatial] = True
    level0 = np.full(shape, array.fill_value, dtype)
    for index in np.argwhere(present):
        write = block_at(index, shape[-spatial:], block).write
        if rng.random() < 0.5:  # data in part of the block only
            start = [int(rng.integers(0, n)) for n in write.shape]
            ends = [min(n, s + 3) if rng.random() < 0.5 else n for s, n in zip(start, write.shape)]  # some thin
            stop = [int(rng.integers(s + 1, e + 1)) for s, e in zip(start, ends)]
            box = Box.from_bounds(start, stop).shift(write.offset)
        else:
            box = write
        if np.dtype(dtype).kind == "f":
            values = rng.random((shape[0], *box.shape)).astype(dtype)
        else:
            values = rng.integers(0, 4 if np.dtype(dtype).itemsize == 1 else 255, (shape[0], *box.shape)).astype(dtype)
        level0[(Ellipsis, *box.slices())] = values
        array[(Ellipsis, *box.slices())] = values
    return level0, present, array.fill_value


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bits (every NaN counts as the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    nan = np.isnan(a)
    view = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(view), b[~nan].view(view)))


CASES = {  # name: (shape, block, axes, dtype, kind)
    "2d mean float32": ((2, 333, 270), (32, 32), "cyx", "float32", "mean"),
    "2d mean float32, odd block": ((2, 161, 203), (15, 15), "cyx", "float32", "mean"),
    "2d mean uint8": ((3, 200, 130), (16, 16), "cyx", "uint8", "mean"),
    "2d nearest labels": ((1, 301, 257), (32, 32), "cyx", "uint8", "nearest"),
    "3d mean float32": ((2, 5, 150, 97), (3, 16, 16), "czyx", "float32", "mean"),
    "3d nearest labels": ((1, 4, 97, 150), (2, 16, 16), "czyx", "uint8", "nearest"),
}


@pytest.mark.parametrize("task_blocks", [1, 64])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", CASES)
def test_stacked_pyramid_equals_level_by_level(tmp_path, monkeypatch, case, seed, task_blocks):
    """Every level, every bit, for means (NaN-aware float, and uint8) and nearest labels, in
    2-D and 3-D (z kept), with even and odd block edges; stacks as deep as the job allows,
    and (one block per task) about one level per round."""
    shape, block, axes, dtype, kind = CASES[case]
    monkeypatch.setattr(pyramid, "TASK_BLOCKS", task_blocks)
    url = str(tmp_path / "image.zarr")
    level0, present, fill = sparse_image(url, shape, block, axes, dtype, seed)
    want = level_by_level(level0, present, block, tuple(2 if a in "yx" else 1 for a in axes[1:]), kind, fill, 16)
    levels = pyramid.build_pyramid(None, url, kind, present=present, min_edge=16)
    group = zarr.open_group(url, mode="r")
    assert levels == len(want) - 1 >= 3
    for level, expected in enumerate(want):
        assert same_bits(group[str(level)][...], expected), f"level {level}"
        held = [expected[(Ellipsis, *b.write.slices())] for b in iter_blocks(expected.shape[1:], block)]
        stored = sum(not same_bits(values, np.full_like(values, fill)) for values in held)
        assert group[str(level)].nchunks_initialized == stored, f"level {level}: blocks of fill alone are not stored"
    assert len(group.attrs["ome"]["multiscales"][0]["datasets"]) == len(want)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["2d mean float32", "3d nearest labels"])
def test_stacked_pyramid_on_dask_equals_level_by_level(client, tmp_path, case):
    """On a cluster of two task slots the rounds differ (more tasks per round); the values not."""
    shape, block, axes, dtype, kind = CASES[case]
    url = str(tmp_path / "image.zarr")
    level0, present, fill = sparse_image(url, shape, block, axes, dtype, seed=7)
    want = level_by_level(level0, present, block, tuple(2 if a in "yx" else 1 for a in axes[1:]), kind, fill, 16)
    pyramid.build_pyramid(client, url, kind, present=present, min_edge=16)
    group = zarr.open_group(url, mode="r")
    assert all(same_bits(group[str(level)][...], expected) for level, expected in enumerate(want))


def test_blocks_that_hold_only_the_fill_stay_the_fill(tmp_path):
    url = str(tmp_path / "image.zarr")
    storage.create_image(url, (2, 200, 200), (2, 32, 32), "float32", "cyx", overwrite=True)
    present = np.zeros((7, 7), bool)
    present[2, 3] = True  # marked finished, yet never written
    assert pyramid.build_pyramid(None, url, "mean", present=present, min_edge=16) == 4
    group = zarr.open_group(url, mode="r")
    assert all(np.isnan(group[str(level)][...]).all() for level in range(5))


def test_a_slides_top_levels_are_one_task():
    """The terabyte benchmark's slide: 16 blocks of tissue on a 293² grid, two task slots. The
    first levels keep every slot busy; from the first level with one block, one task
    computes all twelve levels left."""
    present = np.zeros((293, 293), bool)
    present[3:7, 3:7] = True
    masks = [present]
    for _ in range(12):
        masks.append(pyramid._pool(masks[-1], (2, 2)) > 0)
    assert [int(m.sum()) for m in masks[:4]] == [16, 9, 4, 1]
    assert pyramid.rounds(masks, (2, 2), slots=2, depth=16) == [(0, 1), (1, 2), (2, 12)]
    assert pyramid.rounds(masks, (2, 2), slots=2, depth=4) == [(0, 1), (1, 2), (2, 6), (6, 10), (10, 12)]
    full = [np.ones((64, 64), bool)]
    for _ in range(6):
        full.append(pyramid._pool(full[-1], (2, 2)) > 0)
    # a task reads 64 blocks at most: three levels; then each level keeps the slots busy alone
    assert pyramid.rounds(full, (2, 2), slots=2, depth=16) == [(0, 3), (3, 4), (4, 5), (5, 6)]


# --- the cluster's cold start -------------------------------------------------------------------


class ToySettings(blockwise.BlockwiseSettings):
    output: str
    blocks: int = 4
    workers: blockwise.Workers = None
    scheduler: blockwise.Scheduler = None
    overwrite: blockwise.Overwrite = False


@dataclass(frozen=True)
class ToyJob(blockwise.BlockwiseJob):
    """Blocks that say which process ran them."""

    def run_block(self, block: Block) -> dict:
        self.ledger.mark(block)
        return {"block": block.key, "pid": os.getpid()}


def plan_toy(settings: ToySettings) -> tuple[ToyJob, blockwise.Pending]:
    zarr.open_group(settings.output, mode="a")
    ledger = storage.Ledger.prepare(settings.output, (settings.blocks,), "toy", overwrite=settings.overwrite)
    done = ledger.done()
    blocks = [block_at((i,), (settings.blocks,), (1,)) for i in range(settings.blocks) if not done[i]]
    return ToyJob(output=settings.output, ledger=ledger, fingerprint="toy"), blockwise.Pending(blocks, int(done.sum()))


def bad_input(settings: ToySettings):
    raise InputError(f"{settings.output}: not an image")


def our_processes() -> set[int]:
    """This process's children, but multiprocessing's resource tracker (it outlives clusters)."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())}


@pytest.fixture
def cluster_starts(monkeypatch):
    """Every local cluster the jobs start: the name of the thread that started it."""
    starts: list[str] = []
    start = blockwise.local_cluster

    def recording(*args, **kwargs):
        starts.append(threading.current_thread().name)
        return start(*args, **kwargs)

    monkeypatch.setattr(blockwise, "local_cluster", recording)
    return starts


def test_a_plan_that_fails_starts_no_cluster(tmp_path, cluster_starts):
    before = our_processes()
    with pytest.raises(InputError, match="not an image"):
        blockwise.execute(bad_input, ToySettings(output=str(tmp_path / "new.zarr")))
    assert cluster_starts == [] and our_processes() <= before


def test_a_finished_output_starts_no_cluster(tmp_path, cluster_starts):
    settings = ToySettings(output=str(tmp_path / "toy.zarr"), blocks=3)
    job, pending = plan_toy(settings)
    for block in pending.blocks:
        job.ledger.mark(block)
    _, summary = blockwise.execute(plan_toy, settings)
    assert summary.skipped == 3 and summary.done == 0 and cluster_starts == []
    assert "cluster" not in summary.stages


@pytest.mark.slow
def test_the_cluster_starts_while_the_job_plans(tmp_path, cluster_starts):
    before = our_processes()
    _, summary = blockwise.execute(plan_toy, ToySettings(output=str(tmp_path / "toy.zarr"), workers=2))
    assert cluster_starts == ["overtile-early-cluster"]
    assert summary.done == 4 and os.getpid() not in {r["pid"] for r in summary.records}
    assert our_processes() <= before  # closed with the job, its worker processes gone
    _, again = blockwise.execute(plan_toy, ToySettings(output=str(tmp_path / "toy.zarr"), blocks=4, workers=2))
    assert again.done == 0 and cluster_starts == ["overtile-early-cluster"]  # a rerun: every block finished


class CudaToySettings(ToySettings):
    device: str = "cuda"


@pytest.mark.slow
def test_an_early_cluster_of_the_wrong_kind_is_replaced(tmp_path, cluster_starts):
    """Settings that ask for CUDA start a GPU-shaped cluster early; a job that plans for the
    CPU (as a remote plan or a fallback may) gets a CPU cluster instead, and the blocks run."""
    before = our_processes()
    _, summary = blockwise.execute(plan_toy, CudaToySettings(output=str(tmp_path / "toy.zarr"), workers=1))
    assert cluster_starts == ["overtile-early-cluster", "MainThread"] and summary.done == 4
    assert our_processes() <= before


@pytest.mark.slow
def test_a_plan_that_fails_while_the_cluster_starts_leaves_no_process(tmp_path, monkeypatch):
    """A plan slower than the early start's grace that then fails: the same error, and the
    cluster, started meanwhile, is closed before it is raised."""
    started = threading.Event()
    start = blockwise.local_cluster

    def signalling(*args, **kwargs):
        try:
            return start(*args, **kwargs)
        finally:
            started.set()

    def slow_bad_input(settings: ToySettings):
        assert started.wait(120)
        raise InputError(f"{settings.output}: not an image")

    monkeypatch.setattr(blockwise, "local_cluster", signalling)
    monkeypatch.setattr(blockwise, "EARLY_START_S", 0.0)
    before = our_processes()
    with pytest.raises(InputError, match="not an image"):
        blockwise.execute(slow_bad_input, ToySettings(output=str(tmp_path / "new.zarr"), workers=1))
    assert our_processes() <= before


def warm_import_done(module: str) -> bool:
    for thread in threading.enumerate():
        if thread.name == "overtile-warm":
            thread.join()
    return module in sys.modules


@pytest.mark.slow
def test_workers_import_the_jobs_module_as_they_start():
    with blockwise.dask_client(workers=1, warm="pipeline.jobs.weights") as client:
        assert list(client.run(warm_import_done, "pipeline.jobs.weights").values()) == [True]
        assert list(client.run(warm_import_done, "pipeline.jobs.predict").values()) == [False]  # only the one asked
