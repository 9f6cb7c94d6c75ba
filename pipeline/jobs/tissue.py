"""Tissue masks: which blocks of a mostly empty slide hold anything worth computing.

A whole-slide scan is mostly glass. The mask is computed once, on a low-resolution level of
the image (the finest pyramid level of at most :data:`MAX_MASK_PIXELS`, or a strided read of
the full-resolution array when there is no pyramid), or read from a mask the user gives.
Blocks that see no tissue within the model's context are not computed: they get no chunk
files (the output's fill value) and are counted in the run's summary.

Features, as pathologists' tools threshold them:

- ``saturation``: Otsu on the HSV saturation of RGB brightfield slides (H&E tissue is
  coloured, glass is grey or white);
- ``bright``: Otsu on intensity, for fluorescence (tissue bright on black);
- ``dark``: Otsu on intensity with tissue darker than the background (brightfield gray, EM
  sections on a bright support);
- ``auto``: ``saturation`` for 8-bit 3-channel images (RGB scans), else ``bright`` (a
  3-channel 16-bit image is fluorescence, whose glass is dark, not grey).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from pipeline import storage
from pipeline.errors import InputError
from pipeline.numerics.threshold import blocks_touching, feature, otsu

TissueMethod = Literal["all", "auto", "saturation", "bright", "dark"]
MAX_MASK_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the image at low resolution; ``factor`` full-resolution pixels per
    mask pixel along each spatial axis."""

    mask: np.ndarray
    factor: tuple[float, ...]
    method: str
    threshold: float | None
    source: str

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def blocks(self, shape: Sequence[int], block_shape: Sequence[int], margin: int | Sequence[int] = 0) -> np.ndarray:
        """Boolean over the block grid: True where a block, grown by ``margin`` full-resolution
        pixels (the model's context; one per axis, or one for all), overlaps tissue."""
        return blocks_touching(self.mask, self.factor, shape, block_shape, margin)


def _low_resolution(source: storage.ImageSource) -> tuple[np.ndarray, tuple[float, ...], str]:
    """A channel-first image of at most about MAX_MASK_PIXELS pixels and its factors: the
    finest pyramid level that small, else the coarsest level read with a stride."""
    spatial = source.spatial_shape
    levels = [source] + [storage.ImageSource(source.url, array, source.axes) for array in source.levels
                         if array.ndim == source.array.ndim]
    small = [lv for lv in levels if math.prod(lv.spatial_shape) <= MAX_MASK_PIXELS]
    chosen = small[0] if small else levels[-1]
    step = max(1, math.ceil(math.sqrt(math.prod(chosen.spatial_shape) / MAX_MASK_PIXELS)))
    index = tuple(slice(None, None, step) if a in "yx" else slice(None) if a == "c" else 0 for a in chosen.axes)
    data = np.asarray(chosen.array[index])
    kept = [a for a in chosen.axes if a in "cyx"]
    data = data.transpose([kept.index(a) for a in (["c"] if "c" in kept else []) + ["y", "x"]])
    if "c" not in kept:
        data = data[None]
    factor = tuple(n / m for n, m in zip(spatial, data.shape[1:]))
    level = levels.index(chosen)
    where = f"{source.url} level {level} ({'×'.join(map(str, chosen.spatial_shape))} px"
    return data, factor, where + (f", every {step}th pixel)" if step > 1 else ")")


def compute_mask(source: storage.ImageSource, method: TissueMethod, threshold: float | None = None) -> TissueMask:
    """The tissue mask of a 2-D image by ``method`` (see the module docstring)."""
    if len(source.spatial_shape) != 2:
        raise InputError(f"{source.url}: tissue masks are for 2-D slides; this image is {len(source.spatial_shape)}-D")
    if method == "auto":
        method = "saturation" if source.channels == 3 and source.array.dtype == np.uint8 else "bright"
    image, factor, where = _low_resolution(source)
    values = feature(image, method)
    sign = -1.0 if method == "dark" else 1.0  # dark tissue: the feature is minus the intensity
    cut = sign * threshold if threshold is not None else otsu(values)
    return TissueMask(values > cut, factor, method, sign * cut if math.isfinite(cut) else None, where)


def read_mask(url: str, image_shape: Sequence[int]) -> TissueMask:
    """A user-given mask (nonzero = tissue) of any resolution covering the same field of view."""
    mask_source = storage.open_image(url, allow_bool=True)
    if len(mask_source.spatial_shape) != len(image_shape):
        raise InputError(f"{url}: a {len(mask_source.spatial_shape)}-D mask for a {len(image_shape)}-D image")
    step = max(1, math.ceil(math.sqrt(math.prod(mask_source.spatial_shape) / MAX_MASK_PIXELS)))
    index = tuple(slice(None, None, step) if a in "zyx" else 0 for a in mask_source.axes)
    data = np.asarray(mask_source.array[index]) != 0
    factor = tuple(n / m for n, m in zip(image_shape, data.shape))
    if any(f < 1 for f in factor):
        raise InputError(f"{url}: the mask {tuple(mask_source.spatial_shape)} is larger than the image {tuple(image_shape)}")
    return TissueMask(data, factor, "mask", None, url)


def tissue_mask(source: storage.ImageSource, method: TissueMethod, threshold: float | None = None,
                mask_url: str | None = None) -> TissueMask | None:
    """The mask a prediction run uses: the user's, one computed by ``method``, or None (all)."""
    if mask_url:
        return read_mask(mask_url, source.spatial_shape)
    if method == "all":
        return None
    return compute_mask(source, method, threshold)
