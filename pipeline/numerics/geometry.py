"""N-dimensional integer boxes and chunk-aligned block grids.

A :class:`Box` is an immutable region (offset + shape) in pixel coordinates of the
*spatial* axes of an image; it may extend past the image (negative offsets are fine), which
is how mirror padding is expressed. A :class:`Block` is the unit of distributed work: the
region it writes (chunk-aligned, never shared with another block) and the region it reads.
No other module slices with hand-made ``y0:y1, x0:x1`` arithmetic.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


def _ints(values: Sequence[int] | int, ndim: int | None = None) -> tuple[int, ...]:
    if isinstance(values, (int, np.integer)):
        if ndim is None:
            raise ValueError("a scalar needs ndim")
        return (int(values),) * ndim
    out = tuple(int(v) for v in values)
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"expected {ndim} values, got {len(out)}")
    return out


@dataclass(frozen=True, order=True)
class Box:
    """An axis-aligned integer box: ``offset`` (inclusive start) and ``shape`` per axis.

    Examples
    --------
    >>> b = Box((0, 0), (100, 50))
    >>> b.grow(10).offset, b.grow(10).shape
    ((-10, -10), (120, 70))
    >>> b.intersect(Box((90, 40), (20, 20)))
    Box(offset=(90, 40), shape=(10, 10))
    """

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _ints(self.offset))
        object.__setattr__(self, "shape", _ints(self.shape, len(self.offset)))
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative shape {self.shape}")

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Box:
        """The box ``[0, shape)``: a whole array."""
        return cls((0,) * len(shape), tuple(shape))

    @classmethod
    def from_bounds(cls, start: Sequence[int], stop: Sequence[int]) -> Box:
        start, stop = _ints(start), _ints(stop)
        return cls(start, tuple(max(0, b - a) for a, b in zip(start, stop)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return self.size == 0

    def grow(self, before: Sequence[int] | int, after: Sequence[int] | int | None = None) -> Box:
        """Grow by ``before`` pixels at the start and ``after`` (default: ``before``) at the end."""
        before = _ints(before, self.ndim)
        after = before if after is None else _ints(after, self.ndim)
        return Box(
            tuple(o - b for o, b in zip(self.offset, before)),
            tuple(s + b + a for s, b, a in zip(self.shape, before, after)),
        )

    def shift(self, delta: Sequence[int] | int) -> Box:
        delta = _ints(delta, self.ndim)
        return Box(tuple(o + d for o, d in zip(self.offset, delta)), self.shape)

    def intersect(self, other: Box) -> Box:
        start = tuple(max(a, b) for a, b in zip(self.offset, other.offset))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        return Box.from_bounds(start, stop)

    def clip(self, shape: Sequence[int]) -> Box:
        """Clip to the array ``[0, shape)``."""
        return self.intersect(Box.from_shape(shape))

    def union(self, other: Box) -> Box:
        """The smallest box holding both."""
        start = tuple(min(a, b) for a, b in zip(self.offset, other.offset))
        stop = tuple(max(a, b) for a, b in zip(self.stop, other.stop))
        return Box.from_bounds(start, stop)

    def snap(self, grid: Sequence[int] | int) -> Box:
        """Grow outwards to the nearest multiples of ``grid``."""
        grid = _ints(grid, self.ndim)
        start = tuple((o // g) * g for o, g in zip(self.offset, grid))
        stop = tuple(-(-e // g) * g for e, g in zip(self.stop, grid))
        return Box.from_bounds(start, stop)

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.offset, other.offset)) and all(
            a >= b for a, b in zip(self.stop, other.stop)
        )

    def slices(self) -> tuple[slice, ...]:
        """Slices of this box in absolute coordinates (needs a non-negative offset)."""
        if any(o < 0 for o in self.offset):
            raise ValueError(f"{self} starts before the origin")
        return tuple(slice(o, e) for o, e in zip(self.offset, self.stop))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Slices that cut this box out of an array that holds ``outer``."""
        if not outer.contains(self):
            raise ValueError(f"{self} is not inside {outer}")
        return tuple(
            slice(o - p, o - p + s) for o, p, s in zip(self.offset, outer.offset, self.shape)
        )

    def __str__(self) -> str:
        names = "zyx"[-self.ndim :] if self.ndim <= 3 else [f"d{i}" for i in range(self.ndim)]
        return ", ".join(f"{n} {o}:{e}" for n, o, e in zip(names, self.offset, self.stop))


@dataclass(frozen=True)
class Block:
    """The unit of distributed work: ``write`` is the (chunk-aligned) region it produces."""

    index: tuple[int, ...]
    write: Box
    number: int = 0  # position in C order over the grid


    @property
    def key(self) -> str:
        """A stable name, e.g. ``"3.7"``, used for Dask keys and the ledger."""
        return ".".join(str(i) for i in self.index)


def block_grid(shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, ...]:
    """Number of blocks per axis that cover ``shape``."""
    return tuple(-(-s // b) for s, b in zip(shape, block_shape))


def iter_blocks(shape: Sequence[int], block_shape: Sequence[int]) -> Iterator[Block]:
    """The blocks covering an array, in C order; edge blocks are clipped to the array.

    Examples
    --------
    >>> [str(b.write) for b in iter_blocks((5, 3), (4, 4))]
    ['y 0:4, x 0:3', 'y 4:5, x 0:3']
    """
    shape, block_shape = _ints(shape), _ints(block_shape, len(shape))
    grid = (range(n) for n in block_grid(shape, block_shape))
    for number, index in enumerate(itertools.product(*grid)):
        offset = tuple(i * b for i, b in zip(index, block_shape))
        yield Block(index, Box(offset, block_shape).clip(shape), number)


def mirror_indices(start: int, stop: int, size: int, mode: str = "reflect") -> np.ndarray:
    """Indices into ``[0, size)`` for the coordinates ``start .. stop-1`` under mirroring.

    Coordinates outside the image are mirrored at its edges, repeatedly if the range is many
    times the image size, exactly as ``numpy.pad`` does. ``mode`` uses numpy's names:
    ``"reflect"`` mirrors about the edge pixel (``d c b | a b c d | c b a``), ``"symmetric"``
    repeats it (``c b a | a b c d | d c b``; what dask calls ``"reflect"``).

    Examples
    --------
    >>> mirror_indices(-3, 7, 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1, 0]
    >>> mirror_indices(-3, 7, 4, "symmetric").tolist()
    [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]
    """
    coords = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(coords)
    if mode == "reflect":
        period = 2 * size - 2
        c = np.mod(coords, period)
        return np.where(c < size, c, period - c)
    if mode == "symmetric":
        period = 2 * size
        c = np.mod(coords, period)
        return np.where(c < size, c, period - 1 - c)
    raise ValueError(f"unknown mirror mode {mode!r}; expected 'reflect' or 'symmetric'")


def block_at(index: Sequence[int], shape: Sequence[int], block_shape: Sequence[int]) -> Block:
    """The block at grid position ``index`` (as :func:`iter_blocks` would yield it)."""
    shape, block_shape = _ints(shape), _ints(block_shape, len(shape))
    index = tuple(int(i) for i in index)
    offset = tuple(i * b for i, b in zip(index, block_shape))
    number = 0
    for i, n in zip(index, block_grid(shape, block_shape)):
        number = number * n + i
    return Block(index, Box(offset, block_shape).clip(shape), number)
