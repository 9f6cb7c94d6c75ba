"""Benchmark the U-Net weight map (:func:`pipeline.numerics.weightmap.weight_map`) against its naive
definition (:func:`pipeline.numerics.weightmap.weight_map_naive`, one distance transform per cell over
the whole image), on CPU.

One run measures:

(a) the real nuclei mask ``../shared/data/nuclei/mask2d.tif`` (skipped when absent): fast,
    naive, speed-up and max abs difference;
(b) a generated 2048² mask of about 2,000 cells, many of them touching (the case the border
    term exists for): fast and naive, speed-up (target >= 300×), max abs difference;
(c) the same kind of mask on 4× the area (4096², about 8,000 cells): fast only (naive would
    take over an hour), and the ratio of fast times 4×-area / 1×-area (target <= 4.5×:
    work grows with area, not area × cells).

Every figure is printed as wall time and as this process's CPU time (numpy and scipy run
one thread here); on a shared machine the CPU time is the steadier measure of the work.
Fast times are the best of ``--repeat`` rounds that alternate between the masks; the naive
one runs once. The naive method on (b) takes about 6 minutes; ``--naive-cells N`` times it
on the first N cells only and extrapolates linearly to all cells, which the printout then
says.

Usage::

    .venv/bin/python bench/weights.py                      # full (~8 min on 2 cores)
    .venv/bin/python bench/weights.py --naive-cells 200    # naive extrapolated (~1 min)
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.numerics.weightmap import weight_map, weight_map_naive

NUCLEI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuclei"


def make_cells(size: int, per_side: int, seed: int = 0) -> np.ndarray:
    """A ``size``² uint32 instance mask of ``per_side``² cells, one per square of a jittered grid.

    Each cell is a disc of random radius around its seed, cut by the Voronoi boundary of the
    neighbouring seeds, so that neighbours whose discs overlap touch along a straight line;
    every third cell is then shrunk by one pixel where it touches another, which leaves
    one-pixel gaps. The result mixes touching cells, thin gaps, wide gaps and cells cut by
    the image border.
    """
    rng = np.random.default_rng(seed)
    pitch = size / per_side
    grid = (np.arange(per_side) + 0.5) * pitch
    seeds = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    seeds = np.clip(seeds + rng.uniform(-0.3, 0.3, seeds.shape) * pitch, 0, size - 1).astype(int)
    radius = rng.uniform(0.45, 0.7, len(seeds)) * pitch
    marker = np.zeros((size, size), np.uint32)
    marker[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1)
    distance, (iy, ix) = ndimage.distance_transform_edt(marker == 0, return_indices=True)
    nearest = marker[iy, ix]
    labels = np.where(distance <= radius[nearest - 1], nearest, 0).astype(np.uint32)
    # One-pixel gaps: drop the pixels of every third cell that touch a different cell.
    high = ndimage.maximum_filter(labels, size=3)
    low = ndimage.minimum_filter(np.where(labels == 0, np.iinfo(np.uint32).max, labels), size=3)
    touching = (labels > 0) & ((high != labels) | (low != labels))
    labels[touching & (labels % 3 == 0)] = 0
    return labels


def fast_times(masks: list[np.ndarray], repeat: int) -> list[tuple[float, float]]:
    """Best (wall, CPU) seconds of ``weight_map`` per mask, over ``repeat`` rounds that
    alternate between the masks, so that a burst of load from elsewhere on a shared machine
    hits all of them alike. CPU time is this process's (numpy and scipy run one thread
    here), which other processes' load does not inflate the way it does wall time."""
    best = [(float("inf"), float("inf"))] * len(masks)
    for _ in range(repeat):
        for i, labels in enumerate(masks):
            wall, cpu = time.perf_counter(), time.process_time()
            weight_map(labels)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[i] = (min(best[i][0], wall), min(best[i][1], cpu))
    return best


def time_naive(labels: np.ndarray, cells: int | None) -> tuple[tuple[float, float], np.ndarray | None, str]:
    """Naive (wall, CPU) seconds on all cells, or on the first ``cells`` cells extrapolated
    linearly to all of them."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    subset = cells is not None and cells < len(ids)
    if subset:
        labels = np.where(np.isin(labels, ids[:cells]), labels, 0)
    wall, cpu = time.perf_counter(), time.process_time()
    out = weight_map_naive(labels)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if subset:
        scale = len(ids) / cells
        return (wall * scale, cpu * scale), None, f"EXTRAPOLATED linearly from {cells} of {len(ids)} cells"
    return (wall, cpu), out, "measured on all cells"


def count_cells(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(labels.ravel())[1:]))


def touching_pairs(labels: np.ndarray) -> int:
    pairs = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        left, right = a[:-1].ravel(), a[1:].ravel()
        mask = (left != right) & (left > 0) & (right > 0)
        pairs |= set(zip(np.minimum(left[mask], right[mask]).tolist(), np.maximum(left[mask], right[mask]).tolist()))
    return len(pairs)


def seconds(t: tuple[float, float]) -> str:
    return f"{t[0]:8.3f} s ({t[1]:.3f} s CPU)"


def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"{a[0] / b[0]:.2f}x wall, {a[1] / b[1]:.2f}x CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the 1x-area mask")
    parser.add_argument("--repeat", type=int, default=5, help="fast runs per mask (best of)")
    parser.add_argument("--naive-cells", type=int, default=None,
                        help="time naive on this many cells and extrapolate (default: all cells)")
    args = parser.parse_args()
    print("command:", shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"weight_map(labels, w0=10, sigma=5) -> float32; fast: best of {args.repeat}, naive: one run; "
          f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")

    if (NUCLEI / "mask2d.tif").exists():
        import tifffile

        nuclei = tifffile.imread(NUCLEI / "mask2d.tif")
        [fast_t] = fast_times([nuclei], args.repeat)
        naive_t, naive, how = time_naive(nuclei, None)
        diff = np.abs(weight_map(nuclei) - naive).max()
        print(f"nuclei mask2d {nuclei.shape[0]}x{nuclei.shape[1]}, {count_cells(nuclei)} cells, "
              f"{touching_pairs(nuclei)} touching pairs")
        print(f"  fast  {seconds(fast_t)}")
        print(f"  naive {seconds(naive_t)}, {how}")
        print(f"  speed-up {ratio(naive_t, fast_t)}; max |fast - naive| {diff:.2e}")
    else:
        print(f"nuclei mask2d: {NUCLEI} absent, skipped")

    # The same density on both: 4x the area holds exactly 4x the cells.
    per_side = round(args.size / 44.5)
    small = make_cells(args.size, per_side)
    large = make_cells(2 * args.size, 2 * per_side, seed=1)
    fast_small_t, fast_large_t = fast_times([small, large], args.repeat)
    naive_t, naive, how = time_naive(small, args.naive_cells)
    diff = f"{np.abs(weight_map(small) - naive).max():.2e}" if naive is not None else "n/a (naive not run in full)"
    print(f"generated {args.size}x{args.size}, {count_cells(small)} cells, {touching_pairs(small)} touching pairs")
    print(f"  fast  {seconds(fast_small_t)}")
    print(f"  naive {seconds(naive_t)}, {how}")
    print(f"  speed-up {ratio(naive_t, fast_small_t)} (target >= 300x); max |fast - naive| {diff} (target <= 1e-4)")
    print(f"generated {2 * args.size}x{2 * args.size} (4x area), {count_cells(large)} cells, "
          f"{touching_pairs(large)} touching pairs")
    print(f"  fast  {seconds(fast_large_t)}; naive not run (about 16x the naive time above)")
    print(f"  time 4x area / 1x area: {ratio(fast_large_t, fast_small_t)} (target <= 4.5x)")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
