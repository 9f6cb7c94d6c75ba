"""Downsampling for output pyramids: the shapes of the levels and one level from the next.

Level ``k + 1`` halves ``y`` and ``x`` of level ``k`` (``z`` is kept: volumes are usually
anisotropic): the mean of each 2×2 for probabilities and weights (NaN-aware, so a tissue
border is not eaten by the unset background), the top-left pixel for labels (nearest, so
every value is a real label).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_EDGE = 256  # stop when the longest level edge is at most this


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
    mean unless a whole window is NaN.

    The mean is summed in pairs along each halved axis (strided views, no reshape into
    windows), values and counts of set pixels apart: several times faster than
    ``np.nanmean`` over reshaped windows (``bench/downsample.py``), equal to it up to
    float32 rounding."""
    lead = data.ndim - len(factor)
    if kind == "nearest":
        return data[(slice(None),) * lead + tuple(slice(None, None, f) for f in factor)]
    if any(f not in (1, 2) for f in factor):
        raise ValueError(f"factor {tuple(factor)}: each axis is halved (2) or kept (1)")
    pad = [(0, 0)] * lead + [(0, -n % f) for n, f in zip(data.shape[lead:], factor)]
    work = np.pad(data, pad, mode="edge") if any(p for _, p in pad) else data
    work = work.astype(np.float32, copy=False)
    missing = np.isnan(work) if np.dtype(data.dtype).kind == "f" else None
    if missing is not None and missing.any():
        count = _pair_sums((~missing).astype(np.float32), factor, lead)
        with np.errstate(invalid="ignore", divide="ignore"):  # an all-NaN window: 0 / 0 = NaN
            mean = _pair_sums(np.where(missing, np.float32(0), work), factor, lead) / count
    else:
        mean = _pair_sums(work, factor, lead) * np.float32(1 / np.prod(factor))
    if np.dtype(data.dtype).kind in "ui":
        return np.rint(mean).astype(data.dtype)
    return mean.astype(data.dtype, copy=False)


def _pair_sums(work: np.ndarray, factor: Sequence[int], lead: int) -> np.ndarray:
    """Sum neighbouring pairs along each trailing axis whose factor is 2 (even lengths)."""
    for a, f in enumerate(factor):
        if f == 2:
            axis = (slice(None),) * (lead + a)
            work = work[axis + (slice(0, None, 2),)] + work[axis + (slice(1, None, 2),)]
    return work
