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
- ``auto``: ``saturation`` for 8-bit 3-channel images (RGB scans); ``dark`` for one 8-bit
  channel whose border is mostly above the threshold (a brightfield grey scan: its border is
  glass); else ``bright`` (fluorescence: a crop whose bright tissue reaches the border stays
  bright).

An image without contrast in its feature (a grey scan's saturation, a blank field) gives no
threshold; every block is then kept, as a user would rather compute too much than lose
tissue. For the same reason the saturation cut is at most :data:`SATURATION_TISSUE`: on a
crop that is all tissue, Otsu splits the tissue itself, and pale eosin would be lost; the
saturation is median-filtered (3×3 low-resolution pixels) first, so that single noisy glass
pixels do not pass that cut.
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
# HSV saturation above which a pixel is tissue whatever Otsu says: glass is grey or white
# (a few hundredths, under 0.1 at a scanner's noise), pale eosin 0.2 and more
SATURATION_TISSUE = 0.15


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
    def relation(self) -> str:
        """How tissue relates to :attr:`threshold`: above it, or below it for ``dark``."""
        return "<" if self.method.startswith("dark") else ">"

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
    factor = tuple(n / m for n, m in zip(spatial[-2:], data.shape[1:]))
    level = levels.index(chosen)
    where = f"{source.url} level {level} ({'×'.join(map(str, chosen.spatial_shape))} px"
    return data, factor, where + (f", every {step}th pixel)" if step > 1 else ")")


def compute_mask(source: storage.ImageSource, method: TissueMethod, threshold: float | None = None) -> TissueMask:
    """The tissue mask of a 2-D image (or a stack of one slice, as OME-Zarr's ``tczyx`` stores
    a slide) by ``method`` (see the module docstring)."""
    spatial = source.spatial_shape
    if len(spatial) != 2 and spatial[0] != 1:
        raise InputError(f"{source.url}: tissue masks are for 2-D slides; this image is {len(spatial)}-D")
    image, factor, where = _low_resolution(source)
    if method == "auto" and source.channels == 3 and source.array.dtype == np.uint8:
        method = "saturation"
    elif method == "auto":  # one 8-bit channel on a bright border: a brightfield grey scan
        intensity = feature(image, "bright")
        grey = source.channels == 1 and source.array.dtype == np.uint8
        method = "dark" if grey and np.median(_border(intensity)) > otsu(intensity) else "bright"
    values = feature(image, method)
    if method == "saturation":  # a scanner's noise makes single glass pixels look coloured
        from scipy import ndimage

        values = ndimage.median_filter(values, size=3)
    sign = -1.0 if method == "dark" else 1.0  # dark tissue: the feature is minus the intensity
    cut = sign * threshold if threshold is not None else otsu(values)
    if threshold is None and method == "saturation" and math.isfinite(cut):
        cut = min(cut, SATURATION_TISSUE)
    if math.isfinite(cut):
        mask, method_said = values > cut, method
    else:  # no contrast: nothing tells tissue from background, so nothing is left out
        mask, method_said = np.ones(values.shape, bool), f"{method} (no contrast: every block kept)"
    if len(spatial) == 3:
        mask, factor = mask[None], (1.0, *factor)
    return TissueMask(mask, factor, method_said, sign * cut if math.isfinite(cut) else None, where)


def _border(values: np.ndarray, width: int = 2) -> np.ndarray:
    """The values along the image's edges, ``width`` pixels deep."""
    inner = np.ones(values.shape, bool)
    inner[width:-width, width:-width] = False
    return values[inner]


def read_mask(url: str, image_shape: Sequence[int]) -> TissueMask:
    """A user-given mask (nonzero = tissue) of any resolution covering the same field of view."""
    mask_source = storage.open_image(url, allow_bool=True)
    if len(mask_source.spatial_shape) != len(image_shape):
        raise InputError(f"{url}: a {len(mask_source.spatial_shape)}-D mask for a {len(image_shape)}-D image")
    import dask.array as da

    shape = mask_source.spatial_shape
    factor = tuple(n / m for n, m in zip(image_shape, shape))
    if any(f < 1 for f in factor):
        raise InputError(f"{url}: the mask {tuple(shape)} is larger than the image {tuple(image_shape)}")
    plane = factor[-2:]  # one scale for y and x, within a mask pixel's rounding of either edge
    if abs(plane[0] - plane[1]) > max(plane) * max(1 / shape[-2], 1 / shape[-1]) + 1e-9:
        raise InputError(f"{url}: the mask {tuple(shape)} does not have the image's aspect ratio "
                         f"{tuple(image_shape)}: it must cover the same field of view")
    step = max(1, math.ceil(math.sqrt(math.prod(shape) / MAX_MASK_PIXELS)))
    array = mask_source.to_dask()[0] != 0
    if step > 1:  # a window with any tissue is tissue: a stride would drop what falls between
        array = da.pad(array, [(0, -n % step) for n in array.shape], constant_values=False)
        array = da.coarsen(np.any, array, {axis: step for axis in range(array.ndim)})
    data = np.asarray(array.compute(scheduler="threads"))
    return TissueMask(data, tuple(f * step for f in factor), "mask", None, url)


def tissue_mask(source: storage.ImageSource, method: TissueMethod, threshold: float | None = None,
                mask_url: str | None = None) -> TissueMask | None:
    """The mask a prediction run uses: the user's, one computed by ``method``, or None (all)."""
    if mask_url:
        return read_mask(mask_url, source.spatial_shape)
    if method == "all":
        return None
    return compute_mask(source, method, threshold)
