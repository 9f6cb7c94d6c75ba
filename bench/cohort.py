"""Benchmark: a study of slides on one shared cluster against one run per slide (issue 13).

Eight (or ``--slides``) RGB OME-TIFF pyramids of different sizes and tissue shares, and a
16-base valid U-Net. Measured, each as a user runs it, one after another in one session:

- **one run per slide**: ``overtile predict SLIDE OUT --tissue auto --dtype uint8`` per
  slide, a process of its own each (its own cluster: start, tail and pyramid paid per slide);
- **one warm cluster, slides in turn**: ``predict`` per slide on one LocalCluster started
  once, the slides one after another (what overlapping slides alone buys: no idle tail);
- **the cohort**: ``overtile cohort FOLDER OUT --tissue auto --dtype uint8`` (one process,
  one cluster, ``--slides-in-flight`` slides at once).

Printed: each wall time, the cohort's against the sum of the single runs (target ≤ 0.9),
the task slots' busy share (block compute time / slots × wall) of each, and a check that the
cohort's outputs equal the single runs' byte for byte. The allocator is overtile's worker
setting (glibc, no trim, no mmap: ``pipeline.clusters.WORKER_ENVIRONMENT``) in all three.

    .venv/bin/python bench/cohort.py --json bench/out/cohort.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (height, width, tissue share of the area): different sizes and amounts of glass
SLIDES = [(4096, 6144, 0.5), (2048, 2048, 1.0), (6144, 4096, 0.3), (3072, 3072, 0.7), (2048, 4096, 0.4),
          (4096, 4096, 0.25), (1536, 2560, 1.0), (3072, 5120, 0.6)]


def write_slide(path: Path, height: int, width: int, share: float, seed: int) -> None:
    """White glass with noise and a pink tissue rectangle covering ``share`` of the area: a
    BigTIFF OME-TIFF, zlib tiles of 256, sub-resolutions halving down to 1024 px."""
    import tifffile

    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(235, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    th, tw = int(height * np.sqrt(share)), int(width * np.sqrt(share))
    y0, x0 = (height - th) // 2, (width - tw) // 2
    tissue = np.array([200, 110, 170]) + rng.normal(0, 20, (th, tw, 3))
    image[y0:y0 + th, x0:x0 + tw] = np.clip(tissue, 0, 255).astype(np.uint8)
    levels = [image]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(levels[-1][::2, ::2])
    options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata={"axes": "YXS", "PhysicalSizeX": 0.5,
                                                                 "PhysicalSizeY": 0.5}, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)


def busy_share(records: list[dict], slots: int, wall: float) -> float:
    """Block compute time over what the task slots could have computed in ``wall``."""
    return sum(r.get("compute_s", 0.0) for r in records) / (slots * wall) if wall > 0 else 0.0


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=len(SLIDES), help=f"how many slides (at most {len(SLIDES)})")
    p.add_argument("--scale", type=float, default=1.0, help="edge factor on the slides' sizes (0.5: quick try)")
    p.add_argument("--block", type=int, default=1024, help="block edge (default 1024)")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--in-flight", type=int, default=3, help="the cohort's slides in flight (default 3)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    import torch
    import zarr

    from pipeline.clusters import WORKER_ENVIRONMENT
    from pipeline.jobs import blockwise
    from pipeline.jobs.predict import PredictSettings, predict
    from pipeline.numerics.unet import UNet, save_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="overtile-cohort-"))
    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    chosen = SLIDES[: args.slides]
    for k, (h, w, share) in enumerate(chosen):
        path = slides / f"slide{k}.ome.tiff"
        if not path.exists():
            write_slide(path, int(h * args.scale) // 16 * 16, int(w * args.scale) // 16 * 16, share, k)
    model = work / "model.pt"
    torch.manual_seed(0)
    save_model(UNet(in_channels=3, base_channels=args.base), model)
    common = ["--model", str(model), "--tissue", "auto", "--dtype", "uint8", "--block-size", str(args.block)]
    cli = [sys.executable, "-m", "pipeline.cli"]
    names = sorted(s.name for s in slides.glob("*.ome.tiff"))
    mpx = sum(int(h * args.scale) * int(w * args.scale) for h, w, _ in chosen) / 1e6
    print(f"{len(names)} slides, {mpx:.0f} MP in all, blocks of {args.block}, {args.base}-base U-Net, "
          f"{blockwise.default_workers()} task slots; work in {work}")

    single = {}
    for name in names:
        out = work / "single" / name.replace(".ome.tiff", ".zarr")
        single[name] = run(cli + ["predict", str(slides / name), str(out), "--overwrite", "--quiet"] + common)
        print(f"  one run per slide: {name}: {single[name]:.1f} s")
    single_total = sum(single.values())

    records: list[dict] = []
    start = time.perf_counter()
    with blockwise.dask_client(None, None, warm="pipeline.jobs.predict") as client:
        for name in names:
            predict(PredictSettings(input=str(slides / name), output=str(work / "warm" / name.replace(".ome.tiff", ".zarr")),
                                    model=str(model), tissue="auto", dtype="uint8", block_size=args.block, overwrite=True),
                    client=client, on_result=records.append)
    warm = time.perf_counter() - start
    slots = blockwise.default_workers()
    warm_busy = busy_share(records, slots, warm)
    print(f"  one warm cluster, slides in turn: {warm:.1f} s (task slots busy {100 * warm_busy:.0f}%)")

    cohort_out = work / "cohort"
    cohort = run(cli + ["cohort", str(slides), str(cohort_out), "--overwrite", "--quiet", "--slides-in-flight",
                        str(args.in_flight)] + common)
    table = {row["name"]: row for row in _csv(cohort_out / "study.csv")}
    print(f"  cohort ({args.in_flight} slides in flight): {cohort:.1f} s")

    same = all(np.array_equal(zarr.open_array(str(work / "single" / n.replace(".ome.tiff", ".zarr") / "0"), mode="r")[...],
                              zarr.open_array(str(cohort_out / n.replace(".ome.tiff", "") / "prediction.zarr" / "0"),
                                              mode="r")[...]) for n in names)
    computed = sum(int(r["blocks_computed"]) for r in table.values())
    result = {
        "slides": len(names), "megapixels": round(mpx, 1), "blocks_computed": computed, "block": args.block,
        "single_runs_s": {k: round(v, 2) for k, v in single.items()}, "single_total_s": round(single_total, 2),
        "warm_sequential_s": round(warm, 2), "warm_sequential_busy": round(warm_busy, 3),
        "cohort_s": round(cohort, 2), "cohort_vs_single": round(cohort / single_total, 3),
        "cohort_vs_warm_sequential": round(cohort / warm, 3), "outputs_identical": same,
        "in_flight": args.in_flight, "allocator": "glibc; " + ", ".join(f"{k}={v}" for k, v in
                                                                        WORKER_ENVIRONMENT.items()),
    }
    print(f"cohort / sum of single runs = {result['cohort_vs_single']:.3f} (target <= 0.9); "
          f"cohort / one warm cluster in turn = {result['cohort_vs_warm_sequential']:.3f}; "
          f"{computed} blocks; outputs identical: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if same else 1


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    sys.exit(main())
