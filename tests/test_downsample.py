"""The pyramid's downsampling against its definition: the NaN-ignoring mean of each window."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.numerics.downsample import downsample


def windows_mean(data: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
    """The definition, window by window: edge-padded, NaN ignored unless all of it is NaN."""
    lead = data.ndim - len(factor)
    padded = np.pad(data.astype(np.float64), [(0, 0)] * lead + [(0, -n % f) for n, f in zip(data.shape[lead:], factor)],
                    mode="edge")
    out_shape = padded.shape[:lead] + tuple(n // f for n, f in zip(padded.shape[lead:], factor))
    out = np.empty(out_shape)
    for index in np.ndindex(out_shape):
        window = padded[index[:lead] + tuple(slice(i * f, (i + 1) * f) for i, f in zip(index[lead:], factor))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[index] = np.nanmean(window)
    return out


@pytest.mark.filterwarnings("error")  # an all-NaN window is NaN, without numpy's warnings
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, factor", [((2, 9, 13), (2, 2)), ((3, 8, 7), (1, 2, 2)), ((5, 6), (2, 1))])
def test_mean_is_the_nan_ignoring_window_mean(shape, factor, dtype):
    rng = np.random.default_rng(1)
    data = rng.random(shape).astype(dtype)
    data[rng.random(shape) < 0.3] = np.nan  # scattered unset pixels
    data[..., :2, :] = np.nan  # whole windows unset: they stay NaN
    got = downsample(data, factor, "mean")
    assert got.dtype == dtype  # the level's dtype (computed in float32)
    np.testing.assert_allclose(got, windows_mean(data, factor), rtol=1e-6, equal_nan=True)
    full = rng.random(shape).astype(dtype)  # no NaN: the plain mean
    np.testing.assert_allclose(downsample(full, factor, "mean"), windows_mean(full, factor), rtol=1e-6)


def test_integers_round_and_labels_take_the_top_left():
    data = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7)
    mean = downsample(data, (2, 2), "mean")
    assert mean.dtype == np.uint8
    np.testing.assert_array_equal(mean, np.rint(windows_mean(data, (2, 2))).astype(np.uint8))
    np.testing.assert_array_equal(downsample(data, (2, 2), "nearest"), data[::2, ::2])


def test_a_factor_other_than_one_or_two_is_refused():
    with pytest.raises(ValueError, match="halved"):
        downsample(np.zeros((4, 4), np.float32), (3, 3), "mean")
