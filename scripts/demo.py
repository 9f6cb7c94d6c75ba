"""``make demo``: a synthetic cell image, a small U-Net, a blockwise prediction and a preview.

Run from the repository root::

    .venv/bin/python scripts/demo.py [--dir demo-data] [--size 8192] [-- extra 'overtile predict' options]

Stages (each prints its time):

1. ``DIR/cells.zarr``: an OME-Zarr image of ``size × size`` uint8 pixels that look like
   cells in an EM section: bright cytoplasm, dark membranes, darker nuclei and vesicles,
   blur and shot noise. Written block by block, so a large ``--size`` needs no more memory
   than a small one; seeded, so every run makes the same image. Kept between runs.
2. ``DIR/model.pt``: a valid 2-D U-Net with random weights (depth 5, 8 base channels,
   seed 0), as ``overtile model init`` writes it. Kept between runs.
3. ``DIR/prediction.zarr``: ``overtile predict`` run as a subprocess on a local Dask
   cluster, with ``--overwrite`` (so the demo always shows a full run and its progress bar).
4. ``DIR/preview.png``: the input beside the foreground probability.

The weights are random, so the prediction shows the machinery, not a segmentation.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline import storage
from pipeline.geometry import Box, iter_blocks

SEED = 0
CELL_SPACING = 64  # px between neighbouring cell centres: cells of ~60 px, many touching
BLUR_SIGMA = 1.2  # px: the optics
BLUR_HALO = 5  # px rendered past each block edge so the blur has no seams (≥ 4 σ)
DEMO_ATTR = "overtile_demo"


# --- the synthetic image ------------------------------------------------------------------

def cell_table(size: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Every cell of the image at once: centres, semi-axes, angle, brightness, nucleus, vesicles.

    The cells sit on a jittered hexagonal lattice, thinned by a smooth random density so
    that the image has tissue and gaps, like a section. Drawing the table up front (it is
    small: ~0.5 cell per 1000 px²) is what lets blocks be rendered independently and still
    agree along their edges.
    """
    rng = np.random.default_rng(seed)
    s = CELL_SPACING
    rows = np.arange(-1, size / (s * 0.866) + 1)
    cols = np.arange(-1, size / s + 1)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    cy = r * s * 0.866
    cx = c * s + (r % 2) * s / 2
    cy, cx = cy.ravel(), cx.ravel()
    n = cy.size
    cy = cy + rng.normal(0, 0.18 * s, n)
    cx = cx + rng.normal(0, 0.18 * s, n)
    # tissue density: a coarse random field, smoothed and sampled at the cell centres
    coarse = ndimage.gaussian_filter(rng.normal(size=(size // 512 + 3,) * 2), 1.0, mode="wrap")
    density = ndimage.map_coordinates(coarse, [cy / 512 + 1, cx / 512 + 1], order=1, mode="nearest")
    keep = density > np.quantile(density, 0.3) + rng.normal(0, 0.08 * density.std(), n)
    n = int(keep.sum())
    return {
        "cy": cy[keep], "cx": cx[keep],
        "a": s * rng.uniform(0.45, 0.68, n), "b": s * rng.uniform(0.38, 0.55, n),
        "angle": rng.uniform(0, np.pi, n),
        "bright": rng.uniform(165, 215, n),
        "nucleus": rng.uniform(0.25, 0.45, n) * (rng.random(n) < 0.7),  # radius fraction; 0 = none in this section
        "ny": rng.uniform(-0.25, 0.25, n), "nx": rng.uniform(-0.25, 0.25, n),
        "vesicles": rng.integers(0, 6, n),
        "vseed": rng.integers(0, 2**31, n),
    }


def render_block(cells: dict[str, np.ndarray], box: Box, seed: int = SEED) -> np.ndarray:
    """The uint8 pixels of ``box``: cells painted in table order (later ones on top), blurred, noisy.

    Cells are painted over ``box`` grown by :data:`BLUR_HALO` and blurred there, so the
    blurred block equals the same window of a whole-image blur; the noise, per pixel, comes
    after (detector noise) and is seeded by the block's position.
    """
    halo = box.grow(BLUR_HALO)
    (y0, x0), (h, w) = halo.offset, halo.shape
    canvas = np.full((h, w), 38.0, dtype=np.float32)  # resin between cells
    reach = CELL_SPACING  # > largest semi-axis plus membrane
    near = np.flatnonzero(
        (cells["cy"] > y0 - reach) & (cells["cy"] < y0 + h + reach)
        & (cells["cx"] > x0 - reach) & (cells["cx"] < x0 + w + reach)
    )
    for i in near:
        cy, cx, a, b = cells["cy"][i], cells["cx"][i], cells["a"][i], cells["b"][i]
        ext = int(math.ceil(a + 3))
        ya, yb = max(int(cy) - ext, y0), min(int(cy) + ext + 1, y0 + h)
        xa, xb = max(int(cx) - ext, x0), min(int(cx) + ext + 1, x0 + w)
        if ya >= yb or xa >= xb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        cos, sin = math.cos(cells["angle"][i]), math.sin(cells["angle"][i])
        u, v = (dx * cos + dy * sin) / a, (-dx * sin + dy * cos) / b
        rho = np.sqrt(u * u + v * v)  # 1 on the cell's outline
        membrane = 2.2 / min(a, b)  # ~2 px thick, in units of rho
        inside = rho < 1 + membrane
        patch = canvas[ya - y0:yb - y0, xa - x0:xb - x0]
        value = cells["bright"][i] * (1 - 0.12 * rho * rho)  # cytoplasm, a little darker outwards
        if cells["nucleus"][i] > 0:
            nr = np.hypot(u - cells["nx"][i], v - cells["ny"][i]) / cells["nucleus"][i]
            value = np.where(nr < 1, 105 + 25 * nr, value)
            value = np.where(np.abs(nr - 1) < 0.12, 70, value)  # nuclear envelope
        vrng = np.random.default_rng(int(cells["vseed"][i]))
        for _ in range(int(cells["vesicles"][i])):
            t, rr = vrng.uniform(0, 2 * np.pi), vrng.uniform(0.35, 0.75)
            vr = vrng.uniform(1.5, 3.5)
            d = np.hypot(u * a - rr * a * math.cos(t), v * b - rr * b * math.sin(t))
            value = np.where(d < vr, 55, value)
        value = np.where(rho > 1 - membrane, 55, value)  # the membrane: dark ring
        patch[inside] = value[inside]
    blurred = ndimage.gaussian_filter(canvas, BLUR_SIGMA, mode="nearest")
    inner = blurred[BLUR_HALO:BLUR_HALO + box.shape[0], BLUR_HALO:BLUR_HALO + box.shape[1]]
    rng = np.random.default_rng([seed, *box.offset])
    noisy = rng.poisson(np.maximum(inner, 0) / 4.0) * 4.0 + rng.normal(0, 4, inner.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def image_ready(url: Path, size: int) -> bool:
    """True when ``url`` holds a finished demo image of this size (a half-written one is not)."""
    import zarr

    try:
        attrs = dict(zarr.open_group(store=str(url), mode="r").attrs)
    except Exception:
        return False
    info = attrs.get(DEMO_ATTR, {})
    return bool(info.get("complete")) and info.get("size") == size and info.get("seed") == SEED


def make_image(url: Path, size: int, block: int = 2048) -> int:
    """Write the synthetic image block by block as an OME-Zarr image; return the cell count."""
    import zarr

    cells = cell_table(size)
    array = storage.create_image(
        str(url), (size, size), (min(1024, size),) * 2, "uint8", "yx", name="cells",
        units={"y": "nanometer", "x": "nanometer"}, scale=[4.0, 4.0],
        attrs={DEMO_ATTR: {"size": size, "seed": SEED, "complete": False}}, overwrite=True,
    )
    for b in iter_blocks((size, size), (min(block, size),) * 2):
        array[b.write.slices()] = render_block(cells, b.write)
    group = zarr.open_group(store=str(url), mode="r+")
    group.attrs[DEMO_ATTR] = {"size": size, "seed": SEED, "complete": True}
    return len(cells["cy"])


# --- the model ----------------------------------------------------------------------------

def make_model(path: Path, base_channels: int = 8) -> str:
    """A random valid U-Net as ``overtile model init --base-channels 8 --seed 0`` writes it."""
    import torch

    from pipeline.unet import UNet, num_parameters, save_model

    torch.manual_seed(SEED)
    model = UNet(in_channels=1, num_classes=2, dims=2, depth=5, base_channels=base_channels, padding="valid")
    save_model(model, path)
    return f"{num_parameters(model):,} parameters, margin {model.margin} px"


# --- the run ------------------------------------------------------------------------------

def stage(name: str, start: float, what: str) -> None:
    print(f"demo: {name:<10} {time.perf_counter() - start:6.1f} s  {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Make a synthetic cell image and a small U-Net, predict blockwise on Dask, write a preview.",
        epilog="Options after '--' go to 'overtile predict' (e.g. -- --workers 1 --block-size 1024).",
    )
    parser.add_argument("--dir", type=Path, default=Path("demo-data"), help="where everything goes (default demo-data)")
    parser.add_argument("--size", type=int, default=8192, help="image edge in px (default 8192: 67 megapixels)")
    parser.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="uint8",
                        help="probability dtype of the prediction (default uint8: round(255·p), 4× smaller)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.size < 64:
        parser.error("--size must be at least 64")
    out = args.dir
    out.mkdir(parents=True, exist_ok=True)
    image, model, prediction, png = out / "cells.zarr", out / "model.pt", out / "prediction.zarr", out / "preview.png"
    total = time.perf_counter()

    start = time.perf_counter()
    if image_ready(image, args.size):
        stage("image", start, f"{image} exists ({args.size}×{args.size} uint8), kept")
    else:
        n = make_image(image, args.size)
        stage("image", start, f"wrote {image}: {args.size}×{args.size} uint8, {n:,} cells, "
                              f"{args.size ** 2 / 1e6 / (time.perf_counter() - start):.1f} MP/s")

    start = time.perf_counter()
    if model.is_file():
        stage("model", start, f"{model} exists, kept")
    else:
        stage("model", start, f"wrote {model}: random valid 2-D U-Net, depth 5, 8 base channels, {make_model(model)}")

    start = time.perf_counter()
    command = [sys.executable, "-m", "pipeline.cli", "predict", str(image), str(prediction),
               "--model", str(model), "--dtype", args.dtype, "--overwrite", *extra]
    print("demo: running", " ".join(["overtile", *command[3:]]), flush=True)
    code = subprocess.call(command)
    if code != 0:
        print(f"demo: overtile predict failed (exit status {code})", file=sys.stderr)
        return code
    stage("predict", start, f"{args.size ** 2 / 1e6 / (time.perf_counter() - start):.2f} MP/s end to end, "
                            "cluster start-up included")

    from pipeline.preview import preview_png

    start = time.perf_counter()
    preview_png(str(image), str(prediction), png)
    stage("preview", start, f"wrote {png}")
    print(f"demo: total      {time.perf_counter() - total:6.1f} s\n")
    encoding = ", uint8 = round(255·p)" if args.dtype == "uint8" else f", {args.dtype}"
    overtile = Path(sys.executable).parent / "overtile"
    overtile_cmd = os.path.relpath(overtile) if overtile.exists() else "overtile"
    print(
        f"Input image:  {image.resolve()}   (OME-Zarr 0.5, array '0', yx)\n"
        f"Model:        {model.resolve()}   (random weights: the output shows the machinery, not cells)\n"
        f"Prediction:   {prediction.resolve()}   (OME-Zarr 0.5, array '0': (class, y, x) probabilities{encoding})\n"
        f"Preview:      {png.resolve()}\n\n"
        f"Look at the full resolution in napari (pip install 'napari[all]' napari-ome-zarr):\n"
        f"    napari --plugin napari-ome-zarr {image} {prediction}\n"
        f"Rerun the prediction without --overwrite and it resumes from its ledger (here: nothing left to do):\n"
        f"    {overtile_cmd} predict {image} {prediction} --model {model} --dtype {args.dtype} {' '.join(extra)}".rstrip()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
