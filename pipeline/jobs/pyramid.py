"""Downsampled levels of an output image, blockwise on Dask, in its OME-Zarr multiscales.

Level ``k + 1`` halves ``y`` and ``x`` of level ``k`` (``z`` is kept: volumes are usually
anisotropic): the mean of each 2×2 for probabilities and weights (NaN-aware, so a tissue
border is not eaten by the unset background), the top-left pixel for labels (nearest, so
every value is a real label). Chunks keep the block edge, so a level-``k+1`` block reads
exactly four level-``k`` blocks, and only blocks below computed ones are computed: a mostly
empty slide's pyramid costs what its tissue costs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline import storage
from pipeline.jobs.blockwise import run_blocks
from pipeline.numerics.downsample import MIN_EDGE, downsample, level_shapes
from pipeline.numerics.geometry import Block, Box, block_at, block_grid


@dataclass(frozen=True)
class LevelJob:
    """One level of the pyramid as a blockwise job (no ledger: rewriting a block is safe)."""

    source: str  # the array of level k
    target: str  # the array of level k + 1
    kind: str  # "mean" or "nearest"
    spatial_axes: int  # trailing axes that are spatial (the leading ones are kept)
    factor: tuple[int, ...]  # per spatial axis: 2 for y and x, 1 for z
    gpu: bool = False
    prefetch: bool = False

    @property
    def name(self) -> str:
        return f"pyramid-{hashlib.sha256(self.target.encode()).hexdigest()[:12]}"

    def run_block(self, block: Block) -> dict[str, Any]:
        """One block of level k + 1 from the (up to) 2×2 blocks above it."""
        source = storage.open_array(self.source)
        read = Box(tuple(o * f for o, f in zip(block.write.offset, self.factor)),
                   tuple(s * f for s, f in zip(block.write.shape, self.factor))).clip(source.shape[-self.spatial_axes:])
        out = downsample(source[(Ellipsis, *read.slices())], self.factor, self.kind)
        out = out[(Ellipsis, *(slice(0, n) for n in block.write.shape))]
        storage.open_array(self.target)[(Ellipsis, *block.write.slices())] = out
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
    scale0 = storage.scale_from_ome(ms) or [1.0] * len(axes)
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
        run_blocks(client, job, blocks)
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
