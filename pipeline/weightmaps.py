"""Weight maps (the paper's eq. 2) blockwise over Zarr on Dask, resumable like prediction.

Two passes: a global pass over the whole label array (class frequencies, checks, and for
binary masks globally unique instance ids by blockwise connected components merged across
block faces), then one task per chunk-aligned block that reads its block plus a halo, computes
:func:`pipeline.weights.weight_map` with the global class weights and writes its block.

Why the halo makes blocks exact: a pixel's border term only matters while its second-nearest
cell is within the reach ``R`` (:func:`pipeline.weights._reach`), and both of those cells then
have a pixel within ``R`` of it, inside the block grown by ``ceil(R / spacing)``. Beyond the
reach the term is below 1e-6, as in the in-memory map.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field

from pipeline import execute, storage, weights
from pipeline.errors import InputError
from pipeline.geometry import Block, Box, block_grid, iter_blocks

INSTANCES = "instances"


class WeightSettings(BaseModel):
    """A weight-map run; shared by the CLI, the Python API and the flows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: str = Field(description="Instance labels (0 = background) or, with binary, a 0/1 mask: Zarr array or OME-Zarr image")
    output: str = Field(description="Output OME-Zarr image of float32 weights")
    axes: str | None = Field(None, description="Axes of a plain Zarr array: yx or zyx")
    w0: float = Field(10.0, ge=0.0, description="Height of the border term (the paper's 10)")
    sigma: float = Field(5.0, gt=0.0, description="Width of the border term, in the image's physical units (pixels if it has none)")
    binary: bool = Field(False, description="Labels are a 0/1 mask: make cells by connected components over the whole image")
    block_size: int | None = Field(None, ge=16, description="Block edge in pixels (default 2048 in 2D, 256 in 3D)")
    workers: int | None = Field(None, ge=1, description="Worker processes of the local Dask cluster")
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler")
    overwrite: bool = Field(False, description="Replace an existing output instead of resuming it")


@dataclass(frozen=True)
class WeightJob:
    settings: WeightSettings
    labels_url: str  # the instance labels blocks read: the input, or OUTPUT/instances for masks
    labels_axes: str | None
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    spacing: tuple[float, ...]
    class_weights: tuple[float, float]
    counts: tuple[int, int]
    output_array: str
    ledger: execute.Ledger
    fingerprint: str


def open_labels(settings: WeightSettings) -> storage.ImageSource:
    source = storage.open_image(settings.labels, settings.axes)
    if source.channels != 1:
        raise InputError(f"{settings.labels}: {source.channels} channels; labels have one")
    if source.dtype.kind not in "ui" and not (settings.binary and source.dtype.kind == "b"):
        raise InputError(f"{settings.labels}: {source.dtype} labels; expected integers (0 = background, cells > 0)")
    return source


def global_pass(source: storage.ImageSource, binary: bool) -> tuple[tuple[int, int], int]:
    """Counts ``(n_background, n_foreground)`` and the smallest label, over the whole array."""
    import dask
    import dask.array as da

    array = source.to_dask()
    low, foreground = dask.compute(array.min(), da.count_nonzero(array))
    if binary:
        high = int(array.max().compute())
        if low < 0 or high > 1:
            raise InputError(f"{source.url}: values {low}..{high} with --binary; a mask holds 0 and 1")
    return (int(array.size - foreground), int(foreground)), int(low)


def _label_block(block: Block, mask_url: str, mask_axes: str | None, out_url: str, structure: np.ndarray, stride: int) -> None:
    """Connected components of one block, ids offset by the block's number so none collide."""
    from scipy import ndimage

    mask = execute.open_source(mask_url, mask_axes).read(block.write)[0] > 0
    labels, n = ndimage.label(mask, structure=structure)
    labels = labels.astype(np.uint64)
    labels[labels > 0] += np.uint64(block.number * stride)
    execute.open_array(out_url)[block.write.slices()] = labels


def _face_pairs(block: Block, url: str, shape: tuple[int, ...]) -> np.ndarray:
    """Pairs of ids that touch across this block's far faces (one per axis with a neighbour)."""
    array = execute.open_array(url)
    pairs = []
    for axis in range(block.write.ndim):
        end = block.write.stop[axis]
        if end >= shape[axis]:
            continue
        face = Box(tuple(end - 1 if a == axis else o for a, o in enumerate(block.write.offset)),
                   tuple(2 if a == axis else s for a, s in enumerate(block.write.shape)))
        slab = np.moveaxis(array[face.slices()], axis, 0)
        touching = (slab[0] > 0) & (slab[1] > 0)
        pairs.append(np.stack([slab[0][touching], slab[1][touching]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.uint64)


def _relabel_block(block: Block, url: str, old: np.ndarray, new: np.ndarray) -> None:
    array = execute.open_array(url)
    labels = array[block.write.slices()]
    where = np.isin(labels, old)
    if where.any():
        labels[where] = new[np.searchsorted(old, labels[where])]
        array[block.write.slices()] = labels


def label_mask(client: Any, source: storage.ImageSource, output: str, block_shape: tuple[int, ...]) -> str:
    """Globally unique cell ids for a binary mask bigger than memory, written to ``OUTPUT/instances``.

    Face connectivity (as :func:`pipeline.weights.weight_map` with ``binary=True``). Three
    Dask passes over the blocks: label each block with ids offset by its number; collect
    the id pairs that touch across block faces; merge those (connected components of the
    small pair graph, here) and rewrite the blocks that hold merged ids.
    """
    from scipy import ndimage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    url = f"{output.rstrip('/')}/{INSTANCES}"
    shape = source.spatial_shape
    zarr.open_group(store=output, mode="r+").create_array(INSTANCES, shape=shape, chunks=block_shape, dtype="uint64", fill_value=0, overwrite=True)
    blocks = list(iter_blocks(shape, block_shape))
    structure = ndimage.generate_binary_structure(len(shape), 1)
    stride = int(np.prod(block_shape)) // 2 + 2  # more than the components a block can hold
    client.gather(client.map(_label_block, blocks, mask_url=source.url, mask_axes=source.axes, out_url=url,
                             structure=structure, stride=stride, pure=False))
    pairs = [p for p in client.gather(client.map(_face_pairs, blocks, url=url, shape=shape, pure=False)) if len(p)]
    if not pairs:
        return url
    pairs = np.unique(np.concatenate(pairs), axis=0)
    ids, index = np.unique(pairs, return_inverse=True)
    index = index.reshape(pairs.shape)
    graph = coo_matrix((np.ones(len(pairs)), (index[:, 0], index[:, 1])), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(smallest, component, ids)
    new = smallest[component]
    changed = new != ids
    client.gather(client.map(_relabel_block, blocks, url=url, old=ids[changed], new=new[changed], pure=False))
    return url


def weights_block(block: Block, job: WeightJob) -> dict[str, Any]:
    """The Dask task: read block + halo of the labels, weight map, write the block, mark it."""
    watch = execute.Stopwatch()
    read = block.write.grow(job.halo).clip(job.spatial_shape)
    with watch("read"):
        labels = execute.open_source(job.labels_url, job.labels_axes).read(read)[0]
        # consecutive ids inside the block: global ids may be huge (binary masks, user data)
        labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.uint32)
    with watch("compute"):
        w = weights.weight_map(np.asarray(labels), job.settings.w0, job.settings.sigma, job.class_weights, job.spacing)
    with watch("write"):
        execute.open_array(job.output_array)[block.write.slices()] = w[block.write.relative_to(read)]
        job.ledger.mark(block)
    return {"block": block.key, "pixels": block.write.size, **{f"{k}_s": v for k, v in watch.seconds.items()}}


def weight_maps(
    settings: WeightSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[WeightJob, int, int], None] | None = None,
    failures: list[str] | None = None,
) -> tuple[WeightJob, execute.RunSummary]:
    """Compute the weight map of a label image blockwise on Dask; the entry point of the CLI.

    ``failures``: as in :func:`pipeline.execute.run_blocks` (try every block, collect the
    failed ones there instead of stopping at the first); they also go to the summary.
    """
    start = time.perf_counter()
    settings = settings.model_copy(update={"labels": storage.absolute(settings.labels), "output": storage.absolute(settings.output)})
    source = open_labels(settings)
    nd = len(source.spatial_shape)
    block = settings.block_size or (2048 if nd == 2 else 256)
    block_shape = tuple(min(block, n) for n in source.spatial_shape)
    existed = storage.check_output(settings.output, source.spatial_shape, "float32", settings.overwrite)
    spacing = tuple(source.scale.get(a, 1.0) for a in source.spatial_axes)
    reach = weights._reach(settings.w0, settings.sigma) if settings.w0 > 0 else 0.0
    halo = tuple(math.ceil(reach / s) + 1 for s in spacing)
    with execute.client_or_cluster(client, settings.scheduler, settings.workers) as client:
        counts, low = global_pass(source, settings.binary)
        if low < 0:
            raise InputError(f"{settings.labels}: negative label {low}; expected 0 for background and positive cell ids")
        if sum(counts) == 0:
            raise InputError(f"{settings.labels}: the array is empty")
        class_weights = weights.balanced_class_weights(counts)
        fingerprint = hashlib.sha256(json.dumps({
            "labels": settings.labels, "w0": settings.w0, "sigma": settings.sigma, "binary": settings.binary,
            "block": block_shape, "counts": counts, "spacing": spacing,
        }, sort_keys=True).encode()).hexdigest()
        storage.create_image(
            settings.output, source.spatial_shape, block_shape, "float32", source.spatial_axes,
            name="weights", scale=list(spacing), units=source.units, overwrite=settings.overwrite,
            attrs={"overtile": {"labels": settings.labels, "w0": settings.w0, "sigma": settings.sigma,
                                "class_weights": list(class_weights), "counts": list(counts), "output_kind": "weights"}},
        )
        grid = block_grid(source.spatial_shape, block_shape)
        ledger = execute.Ledger.prepare(settings.output, grid, fingerprint, overwrite=settings.overwrite or not existed)
        done = ledger.done()
        labels_url, labels_axes = settings.labels, settings.axes
        if settings.binary:
            labels_axes = source.spatial_axes
            labels_url = label_mask(client, source, settings.output, block_shape) if not done.all() else f"{settings.output.rstrip('/')}/{INSTANCES}"
        job = WeightJob(settings, labels_url, labels_axes, source.spatial_shape, block_shape, halo, spacing, class_weights,
                        counts, f"{settings.output.rstrip('/')}/0", ledger, fingerprint)
        blocks = [b for b in iter_blocks(source.spatial_shape, block_shape) if not done[b.index]]
        skipped = int(done.sum())
        if on_plan is not None:
            on_plan(job, len(blocks), skipped)
        records = execute.run_blocks(client, weights_block, blocks, job, name="weights-" + hashlib.sha256((fingerprint + settings.output).encode()).hexdigest()[:12],
                                     on_result=on_result, failures=failures)
    return job, execute.RunSummary(len(blocks) + skipped, skipped, records, time.perf_counter() - start,
                                   list(failures or []))
