"""Downsampled levels of an output image, blockwise on Dask, in its OME-Zarr multiscales.

Level ``k + 1`` halves ``y`` and ``x`` of level ``k`` (``z`` is kept: volumes are usually
anisotropic): the mean of each 2×2 for probabilities and weights (NaN-aware, so a tissue
border is not eaten by the unset background), the top-left pixel for labels (nearest, so
every value is a real label). Chunks keep the block edge, so a level-``k+1`` block reads
exactly four level-``k`` blocks, and only blocks below computed ones are computed: a mostly
empty slide's pyramid costs what its tissue costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zarr

from pipeline import execute, storage
from pipeline.geometry import Block, Box, block_at, block_grid

MIN_EDGE = 256  # stop when the longest level edge is at most this


@dataclass(frozen=True)
class LevelJob:
    source: str  # the array of level k
    target: str  # the array of level k + 1
    kind: str  # "mean" or "nearest"
    spatial_axes: int  # trailing axes that are spatial (the leading ones are kept)
    factor: tuple[int, ...]  # per spatial axis: 2 for y and x, 1 for z


def level_shapes(shape: Sequence[int], spatial: int, min_edge: int = MIN_EDGE) -> list[tuple[int, ...]]:
    """Shapes of levels 1, 2, ... below ``shape`` (``spatial`` trailing axes; y, x halved)."""
    shapes, current = [], tuple(shape)
    while max(current[-2:]) > min_edge:
        current = current[:-2] + tuple(-(-n // 2) for n in current[-2:])
        shapes.append(current)
    return shapes


def downsample(data: np.ndarray, factor: Sequence[int], kind: str) -> np.ndarray:
    """Downsample the trailing axes by ``factor`` (each 1 or 2); an odd edge's last row or
    column is averaged with itself (edge padding). NaN (unset background) is ignored by the
    mean unless a whole window is NaN."""
    lead = data.ndim - len(factor)
    if kind == "nearest":
        return data[(slice(None),) * lead + tuple(slice(None, None, f) for f in factor)]
    pad = [(0, 0)] * lead + [(0, -n % f) for n, f in zip(data.shape[lead:], factor)]
    work = np.pad(data, pad, mode="edge").astype(np.float32, copy=False)
    shape = list(work.shape[:lead])
    for a, f in enumerate(factor):
        shape += [work.shape[lead + a] // f, f]
    work = work.reshape(shape)
    axes = tuple(lead + 2 * a + 1 for a in range(len(factor)))
    if np.dtype(data.dtype).kind == "f" and np.isnan(work).any():
        with np.errstate(invalid="ignore"), _quiet():
            mean = np.nanmean(work, axis=axes)
    else:
        mean = work.mean(axis=axes)
    if np.dtype(data.dtype).kind in "ui":
        return np.rint(mean).astype(data.dtype)
    return mean.astype(data.dtype)


class _quiet:
    """Silence numpy's 'Mean of empty slice' for all-NaN (unset) windows: NaN is the answer."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def level_block(block: Block, job: LevelJob) -> dict[str, Any]:
    """The Dask task: one block of level k + 1 from the (up to) 2×2 blocks above it."""
    source = execute.open_array(job.source)
    read = Box(tuple(o * f for o, f in zip(block.write.offset, job.factor)),
               tuple(s * f for s, f in zip(block.write.shape, job.factor))).clip(source.shape[-job.spatial_axes:])
    data = source[(Ellipsis, *read.slices())]
    out = downsample(data, job.factor, job.kind)
    out = out[(Ellipsis, *(slice(0, n) for n in block.write.shape))]
    execute.open_array(job.target)[(Ellipsis, *block.write.slices())] = out
    return {"block": block.key, "pixels": block.write.size}


def build_pyramid(client: Any, url: str, kind: str, present: np.ndarray | None = None,
                  min_edge: int = MIN_EDGE) -> int:
    """Write levels 1, 2, ... of the OME-Zarr image at ``url`` from its level 0.

    ``kind``: ``"mean"`` (probabilities, weights) or ``"nearest"`` (labels). ``present``:
    boolean over level 0's block grid, where level 0 has data (default: everywhere); blocks
    of lower levels are computed only below present ones. Returns the number of levels added.
    """
    group = zarr.open_group(store=url, mode="r+")
    base = group["0"]
    ms = storage.ome_metadata(dict(group.attrs))
    axes = [a["name"] for a in ms["axes"]]
    spatial = sum(1 for a in axes if a in "zyx")
    chunks = tuple(base.chunks)
    block_shape = chunks[-spatial:]
    factor = tuple(2 if a in "yx" else 1 for a in axes[-spatial:])
    scale0 = storage._scale_from_ome(ms) or [1.0] * len(axes)
    shapes = level_shapes(base.shape, spatial, min_edge)
    grid = block_grid(base.shape[-spatial:], block_shape)
    present = np.ones(grid, bool) if present is None else present.astype(bool)
    scales = [scale0]
    _write_levels(group, axes, scales, ms)  # level 0 only, until every level below is written again
    for level, shape in enumerate(shapes, start=1):
        array = group.create_array(str(level), shape=shape, chunks=chunks, dtype=base.dtype, fill_value=base.fill_value,
                                   dimension_names=axes, compressors=[storage.OUTPUT_CODEC], overwrite=True)
        del array
        grid = block_grid(shape[-spatial:], block_shape)
        below = np.zeros(grid, bool)  # a block is present if any of the blocks above it is
        for offset in np.ndindex(*factor):
            part = present[tuple(slice(o, None, f) for o, f in zip(offset, factor))]
            below[tuple(slice(0, n) for n in part.shape)] |= part
        present = below
        job = LevelJob(f"{url.rstrip('/')}/{level - 1}", f"{url.rstrip('/')}/{level}", kind, spatial, factor)
        blocks = [block_at(index, shape[-spatial:], block_shape) for index in np.argwhere(present)]
        execute.run_blocks(client, level_block, blocks, job, name=f"pyramid-{level}-{abs(hash(url)) % 10**8}")
        scales.append([s * 2**level if a in "yx" else s for a, s in zip(axes, scale0)])
    _write_levels(group, axes, scales, ms)
    return len(shapes)


def _write_levels(group: zarr.Group, axes: list[str], scales: list[list[float]], ms: dict[str, Any]) -> None:
    """List datasets 0 .. len(scales) - 1 in the group's multiscales (a run interrupted while
    rewriting the levels thus leaves only level 0 listed, and the next run rebuilds them)."""
    ome = dict(group.attrs.get("ome", {}))
    units = {a["name"]: a["unit"] for a in ms["axes"] if a.get("unit")}
    ome["multiscales"] = [storage.multiscales("".join(axes), scales, ms.get("name", "image"), units)]
    group.attrs["ome"] = ome
