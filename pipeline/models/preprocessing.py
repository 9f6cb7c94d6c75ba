"""A model package's intensity preprocessing, made fixed for the whole image before any tile.

bioimage.io packages declare their preprocessing as steps (``scale_linear``,
``zero_mean_unit_variance``, ``scale_range``, ``clip``, ...). Some take statistics "per
sample": computed from each tile, they would differ from tile to tile and make seams. So the
statistics are taken once from the whole image (:meth:`Preprocessing.fixed`), and every block
applies the same fixed steps; on a package's own test input, which is one sample, that is
exactly what bioimageio.core computes. As there, every statistic is of the input as given,
before any step (bioimageio.core measures the sample once, ahead of its preprocessing): in
``scale_linear`` then ``zero_mean_unit_variance``, the mean and std are the raw image's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import numpy as np


def _per_channel(values: tuple[float, ...], ndim: int) -> np.ndarray:
    """Scalars, or one value per channel, shaped to broadcast over ``(C, *spatial)``."""
    return np.asarray(values, np.float32).reshape((-1,) + (1,) * (ndim - 1))


@dataclass(frozen=True)
class ScaleLinear:
    """``x * gain + offset``; one value, or one per channel."""

    gain: tuple[float, ...] = (1.0,)
    offset: tuple[float, ...] = (0.0,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x * _per_channel(self.gain, x.ndim) + _per_channel(self.offset, x.ndim)

    def __str__(self) -> str:
        return f"x·{_short(self.gain)} + {_short(self.offset)}"


@dataclass(frozen=True)
class FixedZeroMeanUnitVariance:
    """``(x - mean) / (std + eps)`` with stored values (as bioimageio.core computes it)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: float = 1e-6

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - _per_channel(self.mean, x.ndim)) / (_per_channel(self.std, x.ndim) + np.float32(self.eps))

    def __str__(self) -> str:
        return f"(x − {_short(self.mean)}) / {_short(self.std)}"


@dataclass(frozen=True)
class Clip:
    min: float | None = None
    max: float | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self.min, self.max)

    def __str__(self) -> str:
        return f"clip to [{self.min}, {self.max}]"


@dataclass(frozen=True)
class ZeroMeanUnitVariance:
    """``(x - mean) / (std + eps)`` with the image's statistics (per channel, or over all)."""

    per_channel: bool = False
    eps: float = 1e-6

    def fixed(self, x: np.ndarray) -> FixedZeroMeanUnitVariance:
        axes = tuple(range(1, x.ndim)) if self.per_channel else None
        mean = np.atleast_1d(x.mean(axis=axes, dtype=np.float64))
        std = np.atleast_1d(x.std(axis=axes, dtype=np.float64))
        return FixedZeroMeanUnitVariance(tuple(map(float, mean)), tuple(map(float, std)), self.eps)

    def __str__(self) -> str:
        return f"zero mean, unit variance of the image{' per channel' if self.per_channel else ''}"


@dataclass(frozen=True)
class ScaleRange:
    """``(x - p_low) / (p_high - p_low + eps)`` with the image's percentiles."""

    min_percentile: float = 0.0
    max_percentile: float = 100.0
    per_channel: bool = False
    eps: float = 1e-6

    def fixed(self, x: np.ndarray) -> ScaleLinear:
        values = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
        low, high = np.percentile(values, [self.min_percentile, self.max_percentile], axis=1)
        gain = 1.0 / (high - low + self.eps)
        return ScaleLinear(tuple(map(float, gain)), tuple(map(float, -low * gain)))

    def __str__(self) -> str:
        return (f"percentiles {self.min_percentile:g}-{self.max_percentile:g} of the image to 0-1"
                f"{' per channel' if self.per_channel else ''}")


Step = Union[ScaleLinear, FixedZeroMeanUnitVariance, Clip, ZeroMeanUnitVariance, ScaleRange]


@dataclass(frozen=True)
class Preprocessing:
    """A package's steps on float32 input. ``scale_integers``: integer images are first
    divided by their dtype's maximum (what overtile's own models expect; packages that
    overtile exported say so in their config)."""

    steps: tuple[Step, ...] = ()
    scale_integers: bool = False

    @property
    def needs_statistics(self) -> bool:
        return any(isinstance(s, (ZeroMeanUnitVariance, ScaleRange)) for s in self.steps)

    def fixed(self, sample: np.ndarray) -> Preprocessing:
        """These steps with every statistic taken from ``sample`` (the whole image, or a
        regular subsample of it), so that no tile computes its own."""
        raw = self._cast(sample)
        steps = tuple(step.fixed(raw) if isinstance(step, (ZeroMeanUnitVariance, ScaleRange)) else step
                      for step in self.steps)
        return replace(self, steps=steps)

    def _cast(self, array: np.ndarray) -> np.ndarray:
        out = array.astype(np.float32, copy=True)
        if self.scale_integers and np.issubdtype(array.dtype, np.integer):
            out *= np.float32(1.0 / np.iinfo(array.dtype).max)
        return out

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """Return ``array`` ``(C, *spatial)`` as float32, preprocessed."""
        if self.needs_statistics:
            raise ValueError("preprocessing with image statistics: call fixed(sample) first")
        x = self._cast(array)
        for step in self.steps:
            x = step(x)
        return x.astype(np.float32, copy=False)

    def __str__(self) -> str:
        steps = (["integers ÷ dtype max"] if self.scale_integers else []) + [str(s) for s in self.steps]
        return "; ".join(steps) or "none (float32 as read)"


def _short(values: tuple[float, ...]) -> str:
    return f"{values[0]:.4g}" if len(values) == 1 else "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
