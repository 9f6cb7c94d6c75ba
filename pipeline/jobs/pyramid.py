"""Downsampled levels of an output image, blockwise on Dask, in its OME-Zarr multiscales.

Level ``k + 1`` halves ``y`` and ``x`` of level ``k`` (``z`` is kept: volumes are usually
anisotropic): the mean of each 2×2 for probabilities and weights (NaN-aware, so a tissue
border is not eaten by the unset background), the top-left pixel for labels (nearest, so
every value is a real label). Every level has level 0's layout (its chunks, and its shards
when it is sharded), and a block is level 0's write unit (a shard, else a chunk), so a
level-``k+1`` block is made from the (up to) 2×2 level-``k`` blocks above it, no two tasks
write the same object, and only blocks below computed ones are computed: a mostly empty
slide's pyramid costs what its tissue costs.

A task computes a *stack* of levels: one block of its coarsest level and every block above it
up to the level it reads, depth first in memory, writing each block as it goes, so the levels
in between are never read back. A round's stacks are as deep as still leaves enough tasks to
keep the cluster busy (:func:`rounds`): once a level has a single block, one task computes
every level below it, where each level was a round of its own (ten rounds of one task for
the tissue of a 600,000² slide). Within a block only the part of the blocks above it that
holds values other than the fill is downsampled; the rest is the fill's downsampled value,
as a window of fill alone gives. The values are bit for bit those of downsampling each whole
level from the one above it (``tests/test_overhead.py``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zarr

from pipeline import storage
from pipeline.jobs.blockwise import run_blocks
from pipeline.numerics.downsample import MIN_EDGE, downsample, level_shapes
from pipeline.numerics.geometry import Block, Box, block_at, block_grid

TASK_BLOCKS = 64  # blocks of data one task reads at most (its work stays seconds, not an hour)
TASK_BYTES = 1 << 30  # what one task's stack may hold in memory: about 4 blocks per level


@dataclass(frozen=True)
class Stack:
    """One task of a round: ``block`` of the round's coarsest level (the top of its stack), and
    ``present``: which blocks of the level it reads, under ``block``, hold data (a small
    boolean array)."""

    block: Block
    present: np.ndarray

    @property
    def key(self) -> str:
        return self.block.key


@dataclass(frozen=True)
class PyramidJob:
    """Levels ``source + 1 .. top`` of a pyramid as one round of blockwise tasks, one per block
    of level ``top`` that has data above it (no ledger: rewriting a block is safe)."""

    url: str  # the image's group
    source: int  # the level read
    top: int  # the coarsest level written: the level of the tasks' blocks
    shapes: tuple[tuple[int, ...], ...]  # array shapes of levels 0 .. top
    block_shape: tuple[int, ...]  # spatial
    kind: str  # "mean" or "nearest"
    factor: tuple[int, ...]  # per spatial axis: 2 for y and x, 1 for z
    fill: Any  # the levels' fill value
    gpu: bool = False
    prefetch: bool = False

    @property
    def name(self) -> str:
        return f"pyramid-{hashlib.sha256(f'{self.url}/{self.source}-{self.top}'.encode()).hexdigest()[:12]}"

    def run_block(self, stack: Stack) -> dict[str, Any]:
        """Every block of levels ``source + 1 .. top`` above (and at) ``stack.block``, written."""
        # Written with Zarr's check for chunks of fill alone off: _fill_mask makes it, for a
        # tenth of the time (Zarr's NaN-aware compare takes ~40 ms per 8 MiB uint8 chunk).
        arrays = {level: storage.open_array(f"{self.url.rstrip('/')}/{level}").with_config({"write_empty_chunks": True})
                  for level in range(self.source, self.top + 1)}
        written: list[int] = []
        self._block(arrays, self.top, stack.block.index, stack.present, written)
        return {"block": stack.key, "pixels": sum(written), "blocks": len(written)}

    def _block(self, arrays: dict[int, zarr.Array], level: int, index: tuple[int, ...], under: np.ndarray,
               written: list[int]) -> np.ndarray | None:
        """Block ``index`` of ``level`` (read at the source level, else computed and written), or
        None where no block of the source level under it (``under``) holds data."""
        if not under.any():
            return None
        spatial = self.shapes[level][-len(self.factor):]
        block = block_at(index, spatial, self.block_shape)
        if level == self.source:
            return arrays[level][(Ellipsis, *block.write.slices())]
        span = tuple(f ** (level - 1 - self.source) for f in self.factor)  # source blocks under a block above
        above = self.shapes[level - 1][-len(self.factor):]
        parts = []
        for offset in np.ndindex(*self.factor):
            part = under[tuple(slice(o * n, (o + 1) * n) for o, n in zip(offset, span))]
            child = tuple(i * f + o for i, f, o in zip(index, self.factor, offset))
            data = self._block(arrays, level - 1, child, part, written)  # part is empty past the grid's end
            held = None if data is None else _held(block_at(child, above, self.block_shape).write, data,
                                                   self.fill, self.factor)
            if held is not None:
                parts.append(held)
        read = Box(tuple(o * f for o, f in zip(block.write.offset, self.factor)),
                   tuple(s * f for s, f in zip(block.write.shape, self.factor))).clip(above)
        out = downsample_present(parts, read, block.write, self.factor, self.kind, self.fill,
                                 self.shapes[level][:-len(self.factor)], arrays[level].dtype)
        if not _fill_mask(out, self.fill).all():  # a block of fill alone is left unstored, as Zarr leaves it
            arrays[level][(Ellipsis, *block.write.slices())] = out
        written.append(block.write.size)
        return out


def _held(box: Box, data: np.ndarray, fill: Any, factor: Sequence[int]) -> tuple[Box, np.ndarray] | None:
    """A block above as a task keeps it: its part that holds data, with that part's box (a
    copy when smaller, so that a mostly empty block is not held whole); None if it is all fill."""
    part = data_box(data, fill, factor)
    if part is None or part.shape == box.shape:
        return None if part is None else (box, data)
    return part.shift(box.offset), data[(Ellipsis, *part.slices())].copy()


def _fill_mask(values: np.ndarray, fill: Any) -> np.ndarray:
    """Where ``values`` are ``fill``, as Zarr compares them to its fill value: any NaN for a NaN
    fill, other floats bit for bit (-0.0 is no 0.0 fill, and its windows' mean is -0.0)."""
    if fill != fill:
        return np.isnan(values)
    if values.dtype.kind == "f":
        bits = f"u{values.dtype.itemsize}"
        return values.view(bits) == np.asarray(fill, values.dtype).view(bits)
    return values == fill


def data_box(data: np.ndarray, fill: Any, factor: Sequence[int]) -> Box | None:
    """The smallest box of ``data``'s trailing (spatial) axes holding every value other than
    ``fill`` (whole along the axes that are not halved), or None if it is all fill."""
    n = len(factor)
    other = ~_fill_mask(data, fill)
    other = other.any(axis=tuple(range(data.ndim - n))) if data.ndim > n else other
    start, stop = [], []
    for axis, f in enumerate(factor):
        if f == 1:
            start.append(0)
            stop.append(other.shape[axis])
            continue
        hit = np.flatnonzero(other.any(axis=tuple(a for a in range(n) if a != axis)))
        if not hit.size:
            return None
        start.append(int(hit[0]))
        stop.append(int(hit[-1]) + 1)
    return Box.from_bounds(start, stop)


def downsample_present(parts: Sequence[tuple[Box, np.ndarray]], read: Box, write: Box, factor: Sequence[int],
                       kind: str, fill: Any, lead: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Block ``write`` of level ``k + 1``, as ``downsample`` computes it from the region
    ``read`` of level ``k`` (``write`` scaled up, clipped), given only ``parts``: the boxes of
    ``read`` that hold data, with their values (``lead`` axes first); the rest is ``fill``.

    Only the windows over the parts are computed: a window of fill alone gives the fill's
    downsampled value. The box computed is snapped to whole windows; ``downsample`` sums a
    window's values in one order whatever the box's width, so the values are bit for bit.
    """
    fill_down = downsample(np.full((1,) * len(lead) + tuple(factor), fill, dtype), factor, kind).flat[0]
    out = np.full((*lead, *write.shape), fill_down, dtype)
    if not parts:
        return out
    box = parts[0][0]
    for b, _ in parts[1:]:
        box = box.union(b)
    box = box.snap(factor).intersect(read)
    piece = np.full((*lead, *box.shape), fill, dtype)
    for b, values in parts:
        piece[(Ellipsis, *b.relative_to(box))] = values
    down = Box.from_bounds([o // f for o, f in zip(box.offset, factor)], [-(-e // f) for e, f in zip(box.stop, factor)])
    out[(Ellipsis, *down.relative_to(write))] = downsample(piece, factor, kind)
    return out


def build_pyramid(client: Any, url: str, kind: str, present: np.ndarray | None = None,
                  min_edge: int = MIN_EDGE, present_block: Sequence[int] | None = None) -> int:
    """Write levels 1, 2, ... of the OME-Zarr image at ``url`` from its level 0.

    ``kind``: ``"mean"`` (probabilities, weights) or ``"nearest"`` (labels). ``present``:
    boolean over level 0's block grid, where level 0 has data (default: everywhere); blocks
    of lower levels are computed only below present ones. A block is level 0's write unit
    (:func:`~pipeline.storage.write_unit`); ``present_block``: the spatial shape of the
    blocks ``present`` is over, when the job that wrote level 0 wrote several chunks per
    block (a whole number of them). Returns the number of levels added.
    """
    group = zarr.open_group(store=url, mode="r+")
    base = group["0"]
    ms = storage.ome_metadata(dict(group.attrs))
    axes = [a["name"] for a in ms["axes"]]
    spatial = sum(1 for a in axes if a in "zyx")
    unit = storage.write_unit(base)
    block_shape = unit[-spatial:]
    factor = tuple(2 if a in "yx" else 1 for a in axes[-spatial:])
    scale0 = storage.scale_from_ome(ms) or [1.0] * len(axes)
    translation0 = storage.translation_from_ome(ms) or [0.0] * len(axes)
    shapes = [tuple(base.shape), *level_shapes(base.shape, spatial, min_edge)]
    grid = block_grid(base.shape[-spatial:], block_shape)
    if present is None:
        present = np.ones(grid, bool)
    elif present_block is not None and tuple(present_block) != block_shape:  # each block is k units per axis
        for axis, (b, u) in enumerate(zip(present_block, block_shape)):
            present = np.repeat(present, -(-b // u), axis=axis)
        present = present[tuple(slice(0, n) for n in grid)]
    present = present.astype(bool)
    masks = [present]  # a block is present if any of the blocks above it is
    for _ in shapes[1:]:
        masks.append(_pool(masks[-1], factor) > 0)
    _write_levels(group, axes, [scale0], [translation0], ms)  # level 0 only, until every level below is written again
    for level, shape in enumerate(shapes[1:], start=1):
        group.create_array(str(level), shape=shape, chunks=base.chunks, shards=base.shards, dtype=base.dtype,
                           fill_value=base.fill_value, dimension_names=axes, compressors=[storage.OUTPUT_CODEC],
                           overwrite=True)
    slots = max(1, sum(client.nthreads().values())) if client is not None else 1
    depth = max(1, TASK_BYTES // (4 * math.prod(unit) * base.dtype.itemsize))
    for source, top in rounds(masks, factor, slots, depth):
        job = PyramidJob(url, source, top, tuple(shapes[: top + 1]), block_shape, kind, factor, base.fill_value)
        span = tuple(f ** (top - source) for f in factor)
        tasks = [Stack(block_at(index, shapes[top][-spatial:], block_shape),
                       masks[source][tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, span))].copy())
                 for index in np.argwhere(masks[top])]
        run_blocks(client, job, tasks)
    factors = [[2**level if a in "yx" else 1 for a in axes] for level in range(len(shapes))]
    scales = [[s * f for s, f in zip(scale0, fs)] for fs in factors]
    translations = [storage.level_translation(scale0, translation0, fs, kind) for fs in factors]
    _write_levels(group, axes, scales, translations, ms)
    return len(shapes) - 1


def rounds(masks: Sequence[np.ndarray], factor: Sequence[int], slots: int, depth: int) -> list[tuple[int, int]]:
    """``(source, top)`` of each round, over the levels' ``masks`` of present blocks.

    A round reads level ``source`` and ends at the deepest level ``top`` that still has as
    many blocks as the level below ``source`` or four per task slot, whichever is fewer (so
    the tasks keep the slots busy), whose tasks read at most :data:`TASK_BLOCKS` blocks each,
    and at most ``depth`` levels below ``source`` (memory).
    """
    out, source, last = [], 0, len(masks) - 1
    while source < last:
        want = min(int(masks[source + 1].sum()), 4 * slots)
        top = source + 1
        while (top < last and top + 1 - source <= depth and int(masks[top + 1].sum()) >= want
               and _pool(masks[source], tuple(f ** (top + 1 - source) for f in factor)).max() <= TASK_BLOCKS):
            top += 1
        out.append((source, top))
        source = top
    return out


def _pool(mask: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """How many blocks of ``mask`` each window of ``window`` blocks holds (windows past the
    grid's end are cut), on the grid of the level those windows make."""
    padded = np.pad(mask, [(0, -n % w) for n, w in zip(mask.shape, window)]).astype(np.int64)
    shape = [x for n, w in zip(padded.shape, window) for x in (n // w, w)]
    return padded.reshape(shape).sum(axis=tuple(range(1, 2 * mask.ndim, 2)))


def unlist_levels(url: str) -> None:
    """List only level 0 of the OME-Zarr image at ``url``: its levels below are stale once
    level 0 changes, and a run that then stops before rebuilding them (killed, failed blocks,
    no pyramid asked for) must leave them for the next run to build, not listed as current."""
    group = zarr.open_group(store=url, mode="r+")
    ms = storage.ome_metadata(dict(group.attrs))
    if len(ms["datasets"]) > 1:
        axes = [a["name"] for a in ms["axes"]]
        _write_levels(group, axes, [storage.scale_from_ome(ms) or [1.0] * len(axes)],
                      [storage.translation_from_ome(ms) or [0.0] * len(axes)], ms)


def _write_levels(group: zarr.Group, axes: list[str], scales: list[list[float]], translations: list[list[float]],
                  ms: dict[str, Any]) -> None:
    """List datasets 0 .. len(scales) - 1 in the group's multiscales (a run interrupted while
    rewriting the levels thus leaves only level 0 listed, and the next run rebuilds them)."""
    ome = dict(group.attrs.get("ome", {}))
    units = {a["name"]: a["unit"] for a in ms["axes"] if a.get("unit")}
    ome["multiscales"] = [storage.multiscales("".join(axes), scales, ms.get("name", "image"), units, translations)]
    group.attrs["ome"] = ome
