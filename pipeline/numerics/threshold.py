"""Thresholds for tissue masks: the feature a method thresholds, Otsu's threshold, and which
blocks of a full-resolution grid a low-resolution mask touches.

Features, as pathologists' tools threshold them: ``saturation`` (HSV saturation of RGB
brightfield: H&E tissue is coloured, glass grey or white), ``bright`` (intensity, for
fluorescence), ``dark`` (minus the intensity: tissue darker than its support).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from pipeline.errors import InputError


def blocks_touching(mask: np.ndarray, factor: Sequence[float], shape: Sequence[int], block_shape: Sequence[int],
                    margin: int | Sequence[int] = 0) -> np.ndarray:
    """For each block of ``shape`` in ``block_shape`` blocks: does it, grown by ``margin``
    (one for every axis, or one per axis), overlap a True pixel of the low-resolution
    ``mask``? One summed-area table, no loop over blocks (a terabyte slide has hundreds of
    thousands)."""
    nd = len(shape)
    margins = [int(margin)] * nd if np.isscalar(margin) else [int(m) for m in margin]
    table = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64 if mask.size >= 2**31 else np.int32)
    table[tuple(slice(1, None) for _ in range(nd))] = mask
    for axis in range(nd):
        np.cumsum(table, axis=axis, out=table)
    starts, stops = [], []
    for axis in range(nd):
        edges = np.arange(0, shape[axis], block_shape[axis])
        lo = np.maximum(edges - margins[axis], 0) / factor[axis]
        hi = np.minimum(edges + block_shape[axis] + margins[axis], shape[axis]) / factor[axis]
        lo = np.clip(np.floor(lo).astype(np.int64), 0, mask.shape[axis] - 1)
        hi = np.clip(np.ceil(hi).astype(np.int64), lo + 1, mask.shape[axis])
        starts.append(lo)
        stops.append(hi)
    total = np.zeros(tuple(len(s) for s in starts), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=nd):  # inclusion-exclusion over the box corners
        index = np.ix_(*[stops[a] if c else starts[a] for a, c in enumerate(corner)])
        total += (-1) ** (nd - sum(corner)) * table[index]
    return total > 0


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of ``values``, or +inf when they are all equal.

    Computed as scikit-image's ``threshold_otsu`` computes it for floats (256 bins over the
    values' range; the bin centre that maximises the between-class variance), here in numpy:
    importing ``skimage.filters`` imports ``scipy.ndimage``, 0.6-1.2 s on the plan of every
    job with a tissue mask. A test holds the two equal."""
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return math.inf
    counts, edges = np.histogram(values, bins=256, range=(values.min(), values.max()))
    counts = counts.astype(np.float32)  # as skimage: in int64 a near tie can fall to the next bin
    centers = (edges[:-1] + edges[1:]) / 2
    below, above = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]  # pixels at or below, at or above each bin
    mean_below = np.cumsum(counts * centers) / below
    mean_above = (np.cumsum((counts * centers)[::-1]) / above[::-1])[::-1]
    between = below[:-1] * above[1:] * (mean_below[:-1] - mean_above[1:]) ** 2
    return float(centers[np.argmax(between)])


def feature(image: np.ndarray, method: str) -> np.ndarray:
    """The per-pixel feature a method thresholds, from a channel-first low-resolution image."""
    if method == "saturation":
        if image.shape[0] != 3:
            raise InputError(f"tissue 'saturation' needs an RGB image (3 channels); this one has {image.shape[0]}")
        # max and min in the image's own type (a quarter of float32's bytes for uint8), then float32
        high, low = image.max(axis=0).astype(np.float32), image.min(axis=0).astype(np.float32)
        return np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0)
    intensity = image.astype(np.float32).mean(axis=0)
    return -intensity if method == "dark" else intensity
