"""Downsampling for output pyramids: the shapes of the levels and one level from the next.

Level ``k + 1`` halves ``y`` and ``x`` of level ``k`` (``z`` is kept: volumes are usually
anisotropic): the mean of each 2×2 for probabilities and weights (NaN-aware, so a tissue
border is not eaten by the unset background), the top-left pixel for labels (nearest, so
every value is a real label).
"""

from __future__ import annotations

from typing import Any, Sequence

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


