"""The paper's data augmentation, as pure functions of arrays and a random generator: elastic
deformation (displacements drawn on a coarse 3×3 grid with a standard deviation of 10 px,
upsampled by cubic interpolation; images interpolated cubically, labels and weights by
nearest neighbour), flips, 90° rotations and gray-value variation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage


def elastic_field(shape: Sequence[int], rng: np.random.Generator, sigma: float = 10.0, grid: int = 3,
                  limit: float | None = None) -> np.ndarray:
    """Per-pixel displacements ``(ndim, *shape)``, float64, of the paper's elastic deformation.

    Displacement vectors are drawn on a coarse ``grid``×``grid`` (×``grid``) lattice spanning
    the patch, each component from N(0, ``sigma``) px, and upsampled to every pixel by cubic
    spline interpolation (bicubic in 2-D). ``limit`` clips them, so a caller that reads
    ``limit`` extra pixels per side always has data under the displaced pixels.
    """
    shape = tuple(int(n) for n in shape)
    coarse = rng.normal(0.0, sigma, size=(len(shape),) + (grid,) * len(shape))
    field = np.stack([ndimage.zoom(c, [n / grid for n in shape], order=3, mode="mirror") for c in coarse])
    if limit is not None:
        np.clip(field, -limit, limit, out=field)
    return field


def deform(array: np.ndarray, field: np.ndarray, order: int, offset: Sequence[int] | int = 0) -> np.ndarray:
    """Sample ``array`` at ``x + offset + field(x)`` for every pixel ``x`` of the field.

    The result has the field's shape and ``array``'s dtype. ``order`` 3 (cubic) or 1 for
    images, 0 (nearest neighbour) for labels and weights, so labels stay labels. ``offset``
    places the field inside a larger ``array`` (the margin read for the displacement).
    """
    ndim = field.shape[0]
    offset = (offset,) * ndim if isinstance(offset, (int, np.integer)) else tuple(offset)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) + o for n, o in zip(field.shape[1:], offset)), indexing="ij")
    coords = np.stack(grid) + field
    return ndimage.map_coordinates(array, coords, order=order, mode="mirror", output=array.dtype, prefilter=order > 1)


def flip_rotate(arrays: Sequence[np.ndarray], rng: np.random.Generator, dims: int, flips: bool,
                rotations: bool) -> list[np.ndarray]:
    """The same random flips (each spatial axis, p = ½) and 90° rotation (y-x plane) of every
    array; arrays share their last ``dims`` axes (an image may lead with channels)."""
    turns = int(rng.integers(4)) if rotations else 0
    flipped = [a for a in range(dims) if rng.random() < 0.5] if flips else []
    out = []
    for array in arrays:
        lead = array.ndim - dims
        if flipped:
            array = np.flip(array, [lead + a for a in flipped])
        if turns:
            array = np.rot90(array, turns, axes=(array.ndim - 2, array.ndim - 1))
        out.append(np.ascontiguousarray(array))
    return out


def gray_values(image: np.ndarray, rng: np.random.Generator, gamma: bool = True) -> np.ndarray:
    """Random gray-value variation: gamma in [0.7, 1.43] (only for an image scaled to [0, 1]),
    contrast in [0.8, 1.25] about the patch mean, brightness ±0.1 of the patch's spread."""
    g = math.exp(rng.uniform(math.log(0.7), -math.log(0.7)))
    contrast = rng.uniform(0.8, 1.25)
    brightness = rng.uniform(-0.1, 0.1)
    if gamma:
        image = np.clip(image, 0.0, 1.0) ** np.float32(g)
        spread = 1.0
    else:
        spread = float(image.std()) or 1.0
    mean = float(image.mean())
    return ((image - mean) * contrast + mean + brightness * spread).astype(np.float32)
