"""Run a block function over a grid of blocks on Dask, with a ledger that makes reruns resume.

One Dask task per block: the task reads its own input, writes its own output chunks and
marks its block in the ledger, then returns a small record. Only block descriptions and
records cross the scheduler, never pixels. A killed worker's blocks are redone by Dask; a
killed client loses only the blocks in flight, because finished blocks are in the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr

from pipeline import storage
from pipeline.errors import InputError
from pipeline.geometry import Block

LEDGER = "ledger"


@dataclass(frozen=True)
class Ledger:
    """Which blocks of a run are finished: a ``uint8`` Zarr array beside the output, one
    chunk per block, so concurrent tasks never write the same object.

    ``fingerprint`` names the settings that determine the output's values; a rerun with a
    different fingerprint must not mix its blocks with the old ones.
    """

    url: str
    grid: tuple[int, ...]

    @classmethod
    def prepare(cls, group_url: str, grid: Sequence[int], fingerprint: str, overwrite: bool) -> "Ledger":
        """Open the ledger of the output group at ``group_url``, creating or resetting it."""
        url = f"{str(group_url).rstrip('/')}/{LEDGER}"
        group = zarr.open_group(store=str(group_url), mode="r+")
        if LEDGER in group and not overwrite:
            array = group[LEDGER]
            if array.attrs.get("fingerprint") != fingerprint or tuple(array.shape) != tuple(grid):
                raise InputError(
                    f"{group_url}: holds the output of a run with other settings (input, model, "
                    f"blocks or output type differ); pass --overwrite to start over"
                )
            return cls(url, tuple(grid))
        array = group.create_array(
            LEDGER, shape=tuple(grid), chunks=(1,) * len(grid), dtype="uint8", fill_value=0, overwrite=True
        )
        array.attrs["fingerprint"] = fingerprint
        return cls(url, tuple(grid))

    def done(self) -> np.ndarray:
        """Boolean array over the block grid: True where the block is finished.

        A block's chunk is written only when the block is finished, so listing the chunks
        that exist answers without touching the (possibly hundreds of thousands of) others:
        planning a mostly empty slide costs what its finished blocks cost.
        """
        array = zarr.open_array(store=self.url, mode="r")
        done = np.zeros(self.grid, dtype=bool)
        try:
            from zarr.core.sync import sync

            separator = array.metadata.chunk_key_encoding.separator
            start = (f"{array.store_path.path}/" if array.store_path.path else "") + "c" + separator

            async def stored() -> list[str]:
                return [k async for k in array.store_path.store.list_prefix(start)]

            for key in sync(stored()):  # "c/i/j": the default chunk key encoding of Zarr 3
                done[tuple(int(i) for i in key[len(start):].split(separator))] = True
        except (AttributeError, NotImplementedError, TypeError, ValueError, IndexError):  # a store that cannot list
            return array[...] > 0
        return done

    def mark(self, block: Block) -> None:
        open_array(self.url)[block.index] = 1


def open_array(url: str) -> zarr.Array:
    """Open a Zarr array for writing, fresh for every task.

    Not cached: a long-lived worker may see the same URL recreated with another shape or
    chunking (``--overwrite`` with another block size), and a stale handle would write the
    old chunk grid. Reading ``zarr.json`` costs far less than any block.
    """
    return zarr.open_array(store=url, mode="r+")


_SOURCES: dict[tuple[str, str | None], storage.ImageSource] = {}


def open_source(url: str, axes: str | None) -> storage.ImageSource:
    """Open an input image once per process (workers reuse it across blocks)."""
    if (url, axes) not in _SOURCES:
        _SOURCES[(url, axes)] = storage.open_image(url, axes)
    return _SOURCES[(url, axes)]


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, gpu: bool = False) -> Iterator[Any]:
    """A Dask client: of an existing cluster at ``scheduler`` (or Dask's ``scheduler-address``
    setting, e.g. the ``DASK_SCHEDULER_ADDRESS`` environment variable), else of a LocalCluster.

    On CPU the LocalCluster has one task slot per core, spread over ``workers`` processes
    (default: one per core); each task computes on one thread. With ``gpu`` it has one
    worker per GPU (or ``workers``), each offering the Dask resource ``GPU=1``. The
    dashboard is served on 127.0.0.1 only.
    """
    import dask
    from distributed import Client, LocalCluster

    scheduler = scheduler or dask.config.get("scheduler-address", None)  # e.g. DASK_SCHEDULER_ADDRESS in a pod
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise InputError(f"{scheduler}: cannot reach a Dask scheduler ({exc})") from None
        with client:
            yield client
        return
    if gpu:
        import torch

        n = workers or max(1, torch.cuda.device_count())
        slots, resources = 2, {"GPU": 1}  # GPU=1: one block computes; the other slot reads the next
    else:
        n = workers or default_workers()
        slots, resources = max(1, default_workers() // n), None
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=slots,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        resources=resources,
        silence_logs=logging.ERROR,
    )
    with cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def client_or_cluster(client: Any | None, scheduler: str | None, workers: int | None, gpu: bool = False) -> Iterator[Any]:
    """``client`` if one is given, else one of :func:`dask_client`, closed on exit."""
    if client is not None:
        yield client
        return
    with dask_client(scheduler, workers, gpu=gpu) as own:
        yield own


@dataclass
class RunSummary:
    """What a blockwise run did; ``records`` are the block functions' return values."""

    total: int
    skipped: int
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)  # "block key: error" of blocks that failed
    background: int = 0  # blocks without tissue, not computed (left at the fill value)

    @property
    def done(self) -> int:
        return len(self.records)

    @property
    def pixels(self) -> int:
        return sum(r.get("pixels", 0) for r in self.records)

    @property
    def megapixels_per_second(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0


def run_blocks(
    client: Any,
    fn: Callable[..., dict[str, Any]],
    blocks: Sequence[Block],
    *args: Any,
    name: str = "block",
    resources: dict[str, float] | None = None,
    retries: int = 2,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    failures: list[str] | None = None,
    prefetch: Callable[..., Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn(block, *args)`` for every block as one Dask task each; return their records.

    ``on_result`` is called in this process for every finished block (progress bars, Prefect
    artifacts). By default the first failure cancels the remaining tasks and its exception is
    raised here; with a ``failures`` list, every block is tried, each failure (after Dask's
    ``retries``) is appended as ``"key: error"`` and the others go on. Either way finished
    blocks stay in the ledger. With ``prefetch``, ``prefetch(block, *args)`` runs as a task of
    its own (without ``resources``) and its result is passed to ``fn`` as a last argument, so
    that a worker reads its next block while it computes this one.
    """
    from distributed import as_completed

    if not blocks:
        return []
    keys = [f"{name}-{b.key}" for b in blocks]
    extra: list[list[Any]] = []
    if prefetch is not None:
        extra = [client.map(prefetch, blocks, *[[a] * len(blocks) for a in args], key=[f"read-{k}" for k in keys],
                            retries=retries, pure=False)]
    futures = client.map(fn, blocks, *[[a] * len(blocks) for a in args], *extra, key=keys,
                         resources=resources, retries=retries, pure=False)
    records = []
    try:
        for future in as_completed(futures):
            if failures is not None and future.status == "error":
                failures.append(f"{str(future.key).removeprefix(name + '-')}: {future.exception()!r}")
                continue
            record = future.result()
            records.append(record)
            if on_result is not None:
                on_result(record)
    except BaseException:
        client.cancel(futures + [f for futures_ in extra for f in futures_])
        raise
    return records


class Stopwatch:
    """Accumulates named durations: ``with watch("read"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
