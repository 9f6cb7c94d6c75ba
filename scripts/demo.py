"""``make demo``: the whole overtile pipeline as Prefect flows, on generated data.

Run from the repository root::

    .venv/bin/python scripts/demo.py [--dir demo-data] [--size 8192] [--steps 300]

The flows report to the Prefect server of ``PREFECT_API_URL`` when one is set, and otherwise
run in Prefect's ephemeral mode with the database under ``DIR/prefect``, so that
``prefect server start`` with that ``PREFECT_HOME`` shows the runs afterwards. Stages (each
prints its time):

1. ``DIR/cells.zarr``: an OME-Zarr image of ``size × size`` uint8 pixels that look like
   cells in an EM section: bright cytoplasm, dark membranes, darker nuclei and vesicles,
   blur and shot noise. Written block by block, so a large ``--size`` needs no more memory
   than a small one; seeded, so every run makes the same image. Kept between runs.
2. ``DIR/train-image.zarr``, ``DIR/train-labels.zarr``: a smaller image of the same kind
   with its cell instances (the generator knows where every cell is).
3. ``DIR/train-weights.zarr`` and its ``.preview.png``: the paper's weight maps of those
   labels (the ``weight-maps`` flow), pictured like its Figure 3.
4. ``DIR/run/``, ``DIR/model.pt``: a small valid U-Net (depth 5, 8 base channels) trained
   briefly on them (the ``train`` flow: Adam; elastic deformation, flips, rotations).
5. ``DIR/prediction.zarr`` and its ``.preview.png``: the large image segmented with that
   model (the ``segment`` flow) on a local Dask cluster, with ``overwrite`` so the demo
   always shows a full run; the preview shows the input beside the cell probability.
6. ``DIR/cells.zarr/labels/cells``, ``DIR/cells.cells.parquet``, ``DIR/cells.geojson.gz``:
   the cells as objects (the same flow's ``objects`` option): instance labels over the
   image, their table, and their outlines for QuPath.
7. ``DIR/slides/``, ``DIR/study/``: a small study (three crops of the image as pyramidal
   OME-TIFF slides) through the model with the ``cohort`` flow: one folder per slide and
   the study table ``DIR/study/study.csv``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline import storage
from pipeline.numerics.geometry import Box, iter_blocks

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


def cell_shape(cells: dict[str, np.ndarray], i: int, y0: int, x0: int, h: int, w: int) -> tuple | None:
    """Where cell ``i`` lies in the box ``(y0, x0, h, w)``: its window ``(ya, yb, xa, xb)``,
    the cell's own coordinates ``u, v`` there, ``rho`` (1 on its outline) and the membrane's
    thickness in units of ``rho``; None when it misses the box."""
    cy, cx, a, b = cells["cy"][i], cells["cx"][i], cells["a"][i], cells["b"][i]
    ext = int(math.ceil(a + 3))
    ya, yb = max(int(cy) - ext, y0), min(int(cy) + ext + 1, y0 + h)
    xa, xb = max(int(cx) - ext, x0), min(int(cx) + ext + 1, x0 + w)
    if ya >= yb or xa >= xb:
        return None
    yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    cos, sin = math.cos(cells["angle"][i]), math.sin(cells["angle"][i])
    u, v = (dx * cos + dy * sin) / a, (-dx * sin + dy * cos) / b
    rho = np.sqrt(u * u + v * v)
    return (ya, yb, xa, xb), u, v, rho, 2.2 / min(a, b)  # the membrane: ~2 px thick


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
        shape = cell_shape(cells, i, y0, x0, h, w)
        if shape is None:
            continue
        (ya, yb, xa, xb), u, v, rho, membrane = shape
        a, b = cells["a"][i], cells["b"][i]
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


def render_labels(cells: dict[str, np.ndarray], box: Box) -> np.ndarray:
    """The cell instances of ``box`` (uint32; 0 = resin and membranes), in the same drawing
    order as :func:`render_block`, so a cell's id covers exactly its interior there."""
    (y0, x0), (h, w) = box.offset, box.shape
    labels = np.zeros((h, w), dtype=np.uint32)
    for i in range(len(cells["cy"])):
        shape = cell_shape(cells, i, y0, x0, h, w)
        if shape is None:
            continue
        (ya, yb, xa, xb), _, _, rho, membrane = shape
        patch = labels[ya - y0:yb - y0, xa - x0:xb - x0]
        patch[rho < 1 + membrane] = 0  # a later cell's membrane covers what was below
        patch[rho < 1 - membrane] = i + 1
    return labels


def make_training_data(image_url: Path, labels_url: Path, size: int, seed: int = SEED + 1) -> int:
    """A smaller image of the same kind, with its cell instances: what the demo trains on."""
    import zarr

    cells = cell_table(size, seed)
    box = Box.from_shape((size, size))
    for url, data in ((image_url, render_block(cells, box, seed)), (labels_url, render_labels(cells, box))):
        zarr.create_array(str(url), shape=data.shape, chunks=(256, 256), dtype=data.dtype, overwrite=True)[...] = data
    return len(cells["cy"])


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


# --- the run ------------------------------------------------------------------------------

def make_slides(image: Path, folder: Path, count: int = 3) -> Path:
    """A small study: ``count`` crops of the image of different sizes, each written as a
    pyramidal OME-TIFF (what a scanner's export looks like), for the cohort flow."""
    import tifffile
    import zarr

    folder.mkdir(parents=True, exist_ok=True)
    array = zarr.open_group(str(image), mode="r")["0"]
    edge = min(array.shape)
    for k in range(count):
        path = folder / f"slide{k + 1}.ome.tiff"
        h, w = max(64, edge // (2 + k)), max(64, edge // (3 - k % 2 + k))
        y0, x0 = (edge - h) * k // max(1, count), (edge - w) // 2
        crop = np.asarray(array[y0:y0 + h, x0:x0 + w])
        options = dict(tile=(256, 256), photometric="minisblack", compression="zlib")
        with tifffile.TiffWriter(path, ome=True) as tif:
            tif.write(crop, subifds=1, metadata={"axes": "YX"}, **options)
            tif.write(crop[::2, ::2], subfiletype=1, **options)
    return folder


def stage(name: str, start: float, what: str) -> None:
    print(f"demo: {name:<10} {time.perf_counter() - start:6.1f} s  {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The whole overtile pipeline as Prefect flows on generated data: weight maps, "
                    "training, then segmentation of a large image blockwise on Dask.",
    )
    parser.add_argument("--dir", type=Path, default=Path("demo-data"), help="where everything goes (default demo-data)")
    parser.add_argument("--size", type=int, default=8192, help="image edge in px (default 8192: 67 megapixels)")
    parser.add_argument("--train-size", type=int, default=1024, help="edge of the generated training image (default 1024)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--workers", type=int, default=None, help="Dask worker processes (default: one per core)")
    parser.add_argument("--block-size", type=int, default=None, help="prediction block edge (default 2048)")
    parser.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="uint8",
                        help="probability dtype of the prediction (default uint8: round(255·p), 4× smaller)")
    args = parser.parse_args(argv)
    if args.size < 64:
        parser.error("--size must be at least 64")
    out = args.dir
    out.mkdir(parents=True, exist_ok=True)
    image, model, prediction = out / "cells.zarr", out / "model.pt", out / "prediction.zarr"
    # Prefect: the server of PREFECT_API_URL if one is set, else ephemeral mode with its
    # database under DIR/prefect, where `prefect server start` finds the runs afterwards
    os.environ.setdefault("PREFECT_HOME", str((out / "prefect").resolve()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    ephemeral = "PREFECT_API_URL" not in os.environ
    total = time.perf_counter()

    start = time.perf_counter()
    if image_ready(image, args.size):
        stage("image", start, f"{image} exists ({args.size}×{args.size} uint8), kept")
    else:
        n = make_image(image, args.size)
        stage("image", start, f"wrote {image}: {args.size}×{args.size} uint8, {n:,} cells, "
                              f"{args.size ** 2 / 1e6 / (time.perf_counter() - start):.1f} MP/s")

    start = time.perf_counter()
    train_image, train_labels = out / "train-image.zarr", out / "train-labels.zarr"
    n = make_training_data(train_image, train_labels, args.train_size)
    stage("labels", start, f"wrote {train_image} and {train_labels}: {args.train_size}² px, {n:,} labelled cells")

    from flows.segment import segment
    from flows.train import train_flow
    from flows.weight_maps import weight_maps_flow
    from pipeline.jobs.predict import PredictSettings
    from pipeline.jobs.train import TrainSettings
    from pipeline.jobs.weights import WeightSettings

    print(f"demo: Prefect {'ephemeral mode, database in ' + os.environ['PREFECT_HOME'] if ephemeral else 'server ' + os.environ['PREFECT_API_URL']}",
          flush=True)
    start = time.perf_counter()
    weights = out / "train-weights.zarr"
    state = weight_maps_flow(WeightSettings(labels=str(train_labels), output=str(weights), block_size=512,
                                            workers=args.workers, overwrite=True), return_state=True)
    if not state.is_completed():
        print(f"demo: the weight-maps flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    stage("weights", start, f"weight maps (w0 = 10, sigma = 5 px) in {weights}, picture {weights}.preview.png")

    start = time.perf_counter()
    run = out / "run"
    state = train_flow(TrainSettings(
        images=str(train_image), labels=str(train_labels), weights=str(weights), out=str(run), steps=args.steps,
        optimizer="adam", base_channels=8, tile_size=380, checkpoint_every=100, lr_schedule="cosine", overwrite=True,
    ), return_state=True)
    if not state.is_completed():
        print(f"demo: the train flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    shutil.copyfile(run / "last.pt", model)
    stage("train", start, f"{args.steps} steps of Adam on {train_image.name}; model {model} (log and curves in {run})")

    start = time.perf_counter()
    from pipeline.jobs.objects import ObjectOptions

    cells = ObjectOptions(output=f"{image}/labels/cells", grow_distance=2, min_size=10,
                          geojson=str(Path(args.dir) / "cells.geojson.gz"))
    state = segment(PredictSettings(input=str(image), output=str(prediction), model=str(model), dtype=args.dtype,
                                    workers=args.workers, block_size=args.block_size, overwrite=True),
                    objects=cells, return_state=True)
    if not state.is_completed():
        print(f"demo: the segment flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    objects = state.result()["objects"]
    stage("segment", start, f"{args.size ** 2 / 1e6 / (time.perf_counter() - start):.2f} MP/s end to end, "
                            f"cluster start-up, preview and {objects['objects']:,} cells as objects included")
    start = time.perf_counter()
    from flows.cohort import cohort
    from pipeline.jobs.cohort import CohortSettings

    study, slides = out / "study", make_slides(image, out / "slides")
    state = cohort(CohortSettings(slides=str(out / "slides"), output=str(study), model=str(model), workers=args.workers,
                                  block_size=args.block_size, overwrite=True), return_state=True)
    if not state.is_completed():
        print(f"demo: the cohort flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    rows = state.result()
    stage("study", start, f"{sum(r['status'] == 'finished' for r in rows)} of {len(rows)} slides (OME-TIFF, read in "
                          f"place) through the model on one cluster; study table {study / 'study.csv'}")
    png = Path(f"{prediction}.preview.png")
    print(f"demo: total      {time.perf_counter() - total:6.1f} s\n")
    encoding = ", uint8 = round(255·p)" if args.dtype == "uint8" else f", {args.dtype}"
    bin_dir = Path(sys.executable).parent
    overtile = os.path.relpath(bin_dir / "overtile") if (bin_dir / "overtile").exists() else "overtile"
    prefect = os.path.relpath(bin_dir / "prefect") if (bin_dir / "prefect").exists() else "prefect"
    ui = (f"    PREFECT_HOME={os.environ['PREFECT_HOME']} {prefect} server start\n"
          f"then open http://127.0.0.1:4200/runs (flow runs weight-maps, train and segment, with their artifacts)"
          if ephemeral else f"open the UI of {os.environ['PREFECT_API_URL'].removesuffix('/api')}/runs")
    print(
        f"Input image:  {image.resolve()}   (OME-Zarr 0.5, array '0', yx)\n"
        f"Weight maps:  {weights.resolve()}.preview.png   (the paper's Figure 3 for the training labels)\n"
        f"Model:        {model.resolve()}   (trained for {args.steps} steps; curves in {(run / 'curves.png').resolve()})\n"
        f"Prediction:   {prediction.resolve()}   (OME-Zarr 0.5, array '0': (class, y, x) probabilities{encoding})\n"
        f"Preview:      {png.resolve()}\n"
        f"Cells:        {cells.output}   (NGFF labels of the image), table {objects['object table (Parquet)']},\n"
        f"              outlines {cells.geojson} (QuPath: File > Import objects)\n"
        f"Study:        {study.resolve()}/study.csv   (one row per slide of {slides}; a folder per slide)\n\n"
        f"See the runs, their logs, progress and artifacts (tables, pictures) in the Prefect UI:\n{ui}\n"
        f"Look at the full resolution in napari (pip install 'napari[all]' napari-ome-zarr):\n"
        f"    napari --plugin napari-ome-zarr {image} {prediction}\n"
        f"Rerun the segmentation without --overwrite and it resumes from its ledger (here: nothing left to do):\n"
        f"    {overtile} predict {image} {prediction} --model {model} --dtype {args.dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
