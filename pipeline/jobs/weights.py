"""Weight maps (the paper's eq. 2) blockwise over Zarr on Dask, resumable like prediction.

The shape of :mod:`pipeline.jobs.blockwise`: plan (labels and output checked, the ledger
read; no cluster), prepare (global passes on the cluster: class frequencies and, for binary
masks, globally unique instance ids by blockwise connected components merged across block
faces; their results go into the output, so a retry or rerun does not redo them), then one
task per chunk-aligned block that reads its block plus a halo, computes
:func:`pipeline.numerics.weightmap.weight_map` with the global class weights and writes it.
Instance labels drawn touching first get a one-pixel gap of background where they meet
(:func:`pipeline.numerics.weightmap.with_gaps`), as training draws it, so the border term
separates them; the gap needs one pixel of context, which the halo holds.

Why the halo makes blocks exact: a pixel's border term only matters while its second-nearest
cell is within the reach ``R`` (:func:`pipeline.numerics.weightmap.reach`), and both of those
cells then have a pixel within ``R`` of it, inside the block grown by ``ceil(R / spacing)``.
Beyond the reach the term is below 1e-6, as in the in-memory map. ``sigma`` is in the
image's physical units (pixels where it has none), in training as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import numpy as np
import zarr
from pydantic import Field

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.numerics import instances, weightmap
from pipeline.numerics.geometry import Block, Box, block_grid, iter_blocks

INSTANCES = "instances"


class WeightSettings(blockwise.BlockwiseSettings):
    """A weight-map run; shared by the CLI, the Python API and the flows."""

    labels: str = Field(description="Instance labels (0 = background) or, with binary, a 0/1 mask: Zarr array or OME-Zarr image")
    output: str = Field(description="Output OME-Zarr image of float32 weights")
    axes: blockwise.Axes = Field(None, description="Axes of a plain Zarr array: yx or zyx")
    w0: float = Field(10.0, ge=0.0, description="Height of the border term (the paper's 10)")
    sigma: float = Field(5.0, gt=0.0, description="Width of the border term, in the image's physical units (pixels if it has none)")
    binary: bool = Field(False, description="Labels are a 0/1 mask: make cells by connected components over the whole image")
    block_size: blockwise.BlockSize = None
    workers: blockwise.Workers = None
    scheduler: blockwise.Scheduler = None
    overwrite: blockwise.Overwrite = False



@dataclass(frozen=True)
class WeightJob(blockwise.BlockwiseJob):
    """A planned weight-map run. ``class_weights`` and ``counts`` are None until the global
    pass (:meth:`prepare`) has run, for this run or an earlier one of the same fingerprint."""

    kind: ClassVar[str] = "weights"

    settings: WeightSettings
    labels_url: str  # the instance labels blocks read: the input, or OUTPUT/instances for masks
    labels_axes: str | None
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    halo: tuple[int, ...]
    spacing: tuple[float, ...]
    class_weights: tuple[float, float] | None = None
    counts: tuple[int, int] | None = None

    @property
    def output_array(self) -> str:
        return f"{self.output.rstrip('/')}/0"

    @property
    def gaps(self) -> bool:
        """Whether touching instances get a gap of background (instance labels, not masks)."""
        return not self.settings.binary

    def blocks(self) -> list[Block]:
        return list(iter_blocks(self.spatial_shape, self.block_shape))

    def wants_prepare(self) -> bool:
        return self.class_weights is None

    def prepare(self, client: Any) -> "WeightJob":
        """The global passes, once: class counts (and checks), then instance labels of a
        binary mask. Each result is written into the output's attributes with the run's
        fingerprint, so a retried or resumed run finds it and skips the pass."""
        if self.class_weights is not None:
            return self
        source = open_labels(self.settings)
        counts, low = global_pass(source, self.settings.binary, client, gaps=self.gaps)
        if low < 0:
            raise InputError(f"{self.settings.labels}: negative label {low}; expected 0 for background and positive cell ids")
        if self.settings.binary:
            label_mask(client, source, self.output, self.block_shape, self.name)
        class_weights = weightmap.balanced_class_weights(counts)
        group = zarr.open_group(store=self.output, mode="r+")
        meta = dict(group.attrs.get("overtile", {}))
        meta.update(prepared=self.fingerprint, counts=list(counts), class_weights=list(class_weights))
        group.attrs["overtile"] = meta
        return replace(self, class_weights=class_weights, counts=counts)

    def run_block(self, block: Block) -> dict[str, Any]:
        """Read block + halo of the labels, weight map, write the block, mark it."""
        watch = blockwise.Stopwatch()
        read = block.write.grow(self.halo).clip(self.spatial_shape)
        with watch("read"):
            labels = storage.cached_image(self.labels_url, self.labels_axes, self.fingerprint).read(read)[0]
            if self.gaps:  # (a binary mask's components never touch by a face)
                labels = weightmap.with_gaps(labels)
            # consecutive ids inside the block: global ids may be huge (binary masks, user data);
            # 0 stays background, and a block inside a cell (no 0 in it) does not make one
            ids, inverse = np.unique(labels, return_inverse=True)
            labels = (inverse.reshape(labels.shape) + (0 if ids[0] == 0 else 1)).astype(np.uint32)
        with watch("compute"):
            w = weightmap.weight_map(labels, self.settings.w0, self.settings.sigma, self.class_weights, self.spacing)
        with watch("write"):
            storage.open_array(self.output_array)[block.write.slices()] = w[block.write.relative_to(read)]
            self.ledger.mark(block)
        return {"block": block.key, "pixels": block.write.size, **{f"{k}_s": v for k, v in watch.seconds.items()}}


def open_labels(settings: WeightSettings) -> storage.ImageSource:
    source = storage.open_image(settings.labels, settings.axes, allow_bool=settings.binary)
    if source.channels != 1:
        raise InputError(f"{settings.labels}: {source.channels} channels; labels have one")
    if source.dtype.kind not in "ui" and not (settings.binary and source.dtype.kind == "b"):
        raise InputError(f"{settings.labels}: {source.dtype} labels; expected integers (0 = background, cells > 0)")
    return source


def plan_weights(settings: WeightSettings) -> tuple[WeightJob, blockwise.Pending]:
    """Check the labels and the output, create or reopen the output, read the ledger and
    what an earlier run of the same fingerprint found in its global passes. No cluster."""
    settings = blockwise.absolute_paths(settings, "labels", "output")
    source = open_labels(settings)
    block_shape = settings.block_shape(source.spatial_shape)
    existed = storage.check_output(settings.output, source.spatial_shape, "float32", settings.overwrite,
                                   reads=(settings.labels,))
    spacing = tuple(source.scale.get(a, 1.0) for a in source.spatial_axes)
    reach = weightmap.reach(settings.w0, settings.sigma) if settings.w0 > 0 else 0.0
    halo = tuple(math.ceil(reach / s) + 1 for s in spacing)
    run = blockwise.fingerprint(labels=settings.labels, stamp=storage.stamp(source), w0=settings.w0, sigma=settings.sigma,
                      binary=settings.binary, block=block_shape, spacing=spacing,
                      **({} if settings.binary else {"gaps": True}))
    storage.create_image(
        settings.output, source.spatial_shape, block_shape, "float32", source.spatial_axes,
        name="weights", scale=list(spacing), translation=source.placement(channel=False)[1], units=source.units, overwrite=settings.overwrite,
        attrs={"overtile": {"labels": settings.labels, "w0": settings.w0, "sigma": settings.sigma, "output_kind": "weights"}},
    )
    ledger = storage.Ledger.prepare(settings.output, block_grid(source.spatial_shape, block_shape), run,
                                    overwrite=settings.overwrite or not existed)
    meta = dict(zarr.open_group(store=settings.output, mode="r").attrs.get("overtile", {}))
    found = meta.get("prepared") == run and existed and not settings.overwrite
    labels_url, labels_axes = settings.labels, settings.axes
    if settings.binary:
        labels_url, labels_axes = f"{settings.output.rstrip('/')}/{INSTANCES}", source.spatial_axes
    job = WeightJob(
        output=settings.output, ledger=ledger, fingerprint=run, settings=settings, labels_url=labels_url,
        labels_axes=labels_axes, spatial_shape=source.spatial_shape, block_shape=block_shape, halo=halo,
        spacing=spacing, class_weights=tuple(meta["class_weights"]) if found else None,
        counts=tuple(meta["counts"]) if found else None,
    )
    return job, job.pending()


def global_pass(source: storage.ImageSource, binary: bool, client: Any | None = None,
                gaps: bool = False) -> tuple[tuple[int, int], int]:
    """Counts ``(n_background, n_foreground)`` and the smallest label, over the whole array
    (on ``client`` when given, else on threads in this process); with ``gaps``, the pixels
    where instances touch count as background (:func:`~pipeline.numerics.weightmap.with_gaps`)."""
    import dask
    import dask.array as da

    array = source.to_dask()
    # on the job's client, named: never whichever client happens to be Dask's default
    scheduler = client.get if client is not None else "threads"
    cells = da.count_nonzero(array)
    if gaps:
        touching = da.map_overlap(weightmap.touching_borders, array[0], depth=1, boundary="none", dtype=bool)
        cells = cells - da.count_nonzero(touching)
    low, foreground = dask.compute(array.min(), cells, scheduler=scheduler)
    if binary:
        high = int(array.max().compute(scheduler=scheduler))
        if low < 0 or high > 1:
            raise InputError(f"{source.url}: values {low}..{high} with --binary; a mask holds 0 and 1")
    return (int(array.size - foreground), int(foreground)), int(low)


# --- instance labels of a binary mask bigger than memory -----------------------------------


def _label_block(block: Block, mask_url: str, mask_axes: str | None, out_url: str, structure: np.ndarray,
                 stride: int) -> None:
    """Connected components of one block, ids offset by the block's number so none collide."""
    from scipy import ndimage

    mask = storage.open_image(mask_url, mask_axes, allow_bool=True).read(block.write)[0] > 0
    labels, _ = ndimage.label(mask, structure=structure)
    labels = labels.astype(np.uint64)
    labels[labels > 0] += np.uint64(block.number * stride)
    storage.open_array(out_url)[block.write.slices()] = labels


def far_face_pairs(array: zarr.Array, block: Block, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per axis, the pairs of labels in ``array`` that touch across this block's far face
    (none where the block ends at the image's edge): a 2-px slab read per face."""
    pairs = []
    for axis in range(block.write.ndim):
        end = block.write.stop[axis]
        if end >= shape[axis]:
            pairs.append(np.zeros((0, 2), np.uint64))
            continue
        face = Box(tuple(end - 1 if a == axis else o for a, o in enumerate(block.write.offset)),
                   tuple(2 if a == axis else s for a, s in enumerate(block.write.shape)))
        slab = np.moveaxis(array[face.slices()], axis, 0)
        pairs.append(instances.face_pairs(slab[0], slab[1]))
    return pairs


def _face_pairs(block: Block, url: str, shape: tuple[int, ...]) -> np.ndarray:
    """Pairs of ids that touch across this block's far faces."""
    return np.unique(np.concatenate(far_face_pairs(storage.open_array(url), block, shape)), axis=0)


def _relabel_block(block: Block, url: str, old: np.ndarray, new: np.ndarray) -> None:
    """Rewrite this block's merged ids; ``old`` and ``new`` are only this block's part of
    the merge table (the ids this block labelled)."""
    array = storage.open_array(url)
    labels = array[block.write.slices()]
    where = np.isin(labels, old)
    if where.any():
        labels[where] = new[np.searchsorted(old, labels[where])]
        array[block.write.slices()] = labels


def label_mask(client: Any, source: storage.ImageSource, output: str, block_shape: tuple[int, ...],
               name: str = "label") -> str:
    """Globally unique cell ids for a binary mask bigger than memory, written to ``OUTPUT/instances``.

    Face connectivity (as :func:`pipeline.numerics.weightmap.weight_map` with ``binary=True``).
    Three Dask passes over the blocks: label each block with ids offset by its number; collect
    the id pairs that touch across block faces; merge those (connected components of the
    small pair graph, here) and rewrite the blocks that hold merged ids, each task getting
    only its own block's part of the merge table (never the whole table).
    """
    from scipy import ndimage

    url = f"{output.rstrip('/')}/{INSTANCES}"
    shape = source.spatial_shape
    zarr.open_group(store=output, mode="r+").create_array(INSTANCES, shape=shape, chunks=block_shape, dtype="uint64",
                                                         fill_value=0, overwrite=True)
    blocks = list(iter_blocks(shape, block_shape))
    structure = ndimage.generate_binary_structure(len(shape), 1)
    stride = int(np.prod(block_shape)) // 2 + 2  # more than the components a block can hold
    n = len(blocks)
    client.gather(client.map(_label_block, blocks, [source.url] * n, [source.axes] * n, [url] * n, [structure] * n,
                             [stride] * n, key=[f"{name}-label-{b.key}" for b in blocks], pure=False))
    pairs = [p for p in client.gather(client.map(_face_pairs, blocks, [url] * n, [shape] * n,
                                                 key=[f"{name}-faces-{b.key}" for b in blocks], pure=False)) if len(p)]
    if not pairs:
        return url
    old, new = instances.merge_table(np.unique(np.concatenate(pairs), axis=0))
    # ids of block b lie in (b * stride, (b + 1) * stride): each block gets its slice of the table
    bounds = np.searchsorted(old, np.arange(n + 1, dtype=np.uint64) * np.uint64(stride))
    touched = [b for b in blocks if bounds[b.number + 1] > bounds[b.number]]
    client.gather([client.submit(_relabel_block, b, url, old[bounds[b.number]:bounds[b.number + 1]],
                                 new[bounds[b.number]:bounds[b.number + 1]], key=f"{name}-relabel-{b.key}", pure=False)
                   for b in touched])
    return url


def weight_maps(
    settings: WeightSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[WeightJob, blockwise.Pending], None] | None = None,
    failures: list[str] | None = None,
) -> tuple[WeightJob, blockwise.RunSummary]:
    """Compute the weight map of a label image blockwise on Dask; the entry point of the CLI.

    ``failures``: as in :func:`pipeline.jobs.blockwise.run_blocks` (try every block, collect
    the failed ones there instead of stopping at the first); they also go to the summary.
    """
    return blockwise.execute(plan_weights, settings, client, on_plan, on_result, failures)
