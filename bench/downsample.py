"""The pyramid's downsampling: pair sums along strided views against ``np.nanmean`` over windows.

Each pyramid level halves y and x with the NaN-ignoring mean of every 2×2 (NaN is the
unset background of a slide's output). The first formulation reshaped a block into windows
and called ``np.nanmean`` on the window axes; ``pipeline.numerics.downsample`` now sums
neighbouring pairs along each halved axis, values and counts of set pixels separately. Both
run here in one process on the same float32 block (2 channels of ``--edge``², as a
probability block of ``overtile predict``), with a third of it unset and with none unset,
best and median of ``--repeats``. The results are checked equal to float32 rounding.

Usage::

    .venv/bin/python bench/downsample.py                 # 2 × 4096² float32, 7 repeats (~1 min)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

from pipeline.numerics.downsample import downsample


def nanmean_windows(data: np.ndarray) -> np.ndarray:
    """The first formulation: reshape into 2×2 windows, ``np.nanmean`` over them (even edges)."""
    lead = data.ndim - 2
    windows = data.reshape(data.shape[:lead] + (data.shape[-2] // 2, 2, data.shape[-1] // 2, 2))
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if np.isnan(windows).any():
            return np.nanmean(windows, axis=(lead + 1, lead + 3))
        return windows.mean(axis=(lead + 1, lead + 3))


def timed(fn, data: np.ndarray, repeats: int) -> tuple[list[float], np.ndarray]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(data)
        seconds.append(time.perf_counter() - start)
    return seconds, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edge", type=int, default=4096, help="block edge (default 4096)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per formulation (default 7)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    block = rng.random((2, args.edge, args.edge), dtype=np.float32)
    unset = block.copy()
    unset[:, : args.edge // 3] = np.nan
    print(f"downsample: 2 × {args.edge}² float32, best (median) of {args.repeats} calls")
    print("| block | np.nanmean over windows s | pair sums s | speed-up (medians) |")
    print("| --- | --- | --- | --- |")
    for name, data in (("a third unset (NaN)", unset), ("all set", block)):
        old_s, old = timed(nanmean_windows, data, args.repeats)
        new_s, new = timed(lambda d: downsample(d, (2, 2), "mean"), data, args.repeats)
        np.testing.assert_allclose(new, old, rtol=1e-6, equal_nan=True)
        print(f"| {name} | {min(old_s):.3f} ({statistics.median(old_s):.3f}) | {min(new_s):.3f} "
              f"({statistics.median(new_s):.3f}) | {statistics.median(old_s) / statistics.median(new_s):.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
