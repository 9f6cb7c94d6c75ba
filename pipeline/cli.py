"""The ``overtile`` command.

Bad input ends with one line on stderr naming the input and what is wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from pydantic import ValidationError

from pipeline.errors import InputError


class BlockBar:
    """The progress bar of a blockwise run: says what a resumed run skips, then counts blocks."""

    def __init__(self, desc: str, quiet: bool):
        self.desc, self.quiet = desc, quiet
        self.bar: Any = None

    def start(self, todo: int, skipped: int) -> None:
        from tqdm import tqdm

        if skipped:
            print(f"overtile: resuming: {skipped} blocks already done, {todo} to go")
        self.bar = tqdm(total=todo + skipped, initial=skipped, unit="block", desc=self.desc, disable=self.quiet)

    def __call__(self, record: dict[str, Any]) -> None:
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _predict(args: argparse.Namespace) -> None:
    from pipeline.predict import PredictSettings, predict

    settings = PredictSettings(
        input=args.input, output=args.output, model=args.model, axes=args.axes,
        block_size=args.block_size, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
        device=args.device, workers=args.workers, scheduler=args.scheduler,
        output_kind=args.output_kind, dtype=args.dtype, mirror=args.mirror,
        autocast=args.autocast, tissue=args.tissue, tissue_threshold=args.tissue_threshold,
        tissue_mask=args.tissue_mask, pyramid=not args.no_pyramid, overwrite=args.overwrite,
    )
    bar = BlockBar("predict", args.quiet)

    def on_plan(job: Any, todo: int, skipped: int) -> None:
        shape = "×".join(map(str, job.spatial_shape))
        block = "×".join(map(str, job.block_shape))
        print(f"overtile: {shape} px in {todo + skipped + job.background} blocks of {block}, tiles of {job.tile_size} px, on {job.device}")
        if job.tissue:
            print(f"overtile: tissue mask {job.tissue}; {job.background} blocks without tissue are not computed")
        bar.start(todo, skipped)

    job, summary = predict(settings, on_result=bar, on_plan=on_plan)
    bar.close()
    background = f", {summary.background} without tissue (not computed)" if summary.background else ""
    print(
        f"overtile: done: {summary.done} blocks computed, {summary.skipped} skipped (already done){background}, "
        f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s = {summary.megapixels_per_second:.2f} MP/s\n"
        f"overtile: {settings.output_kind} written to {job.settings.output} (array '0', shape {job.output_shape}, {job.output_dtype})"
    )


def _weights(args: argparse.Namespace) -> None:
    from pipeline.weightmaps import WeightSettings, weight_maps

    settings = WeightSettings(
        labels=args.labels, output=args.output, axes=args.axes, w0=args.w0, sigma=args.sigma,
        binary=args.binary, block_size=args.block_size, workers=args.workers,
        scheduler=args.scheduler, overwrite=args.overwrite,
    )
    bar = BlockBar("weights", args.quiet)

    def on_plan(job: Any, todo: int, skipped: int) -> None:
        bg, fg = job.class_weights
        print(f"overtile: {'×'.join(map(str, job.spatial_shape))} px in {todo + skipped} blocks, halo {job.halo} px; "
              f"class weights background {bg:.3f}, foreground {fg:.3f}")
        bar.start(todo, skipped)

    job, summary = weight_maps(settings, on_result=bar, on_plan=on_plan)
    bar.close()
    print(f"overtile: done: {summary.done} blocks computed, {summary.skipped} skipped (already done), "
          f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s\n"
          f"overtile: weight map written to {job.settings.output} (array '0', float32)")
    if args.preview:
        from pipeline.preview import weights_png

        print(f"overtile: preview written to {weights_png(job.labels_url, job.output_array.rsplit('/', 1)[0], args.preview, job.labels_axes)}")


def _train(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from pipeline.train import TrainSettings, train
    from pipeline.unet import num_parameters

    val_slices: list[int] = []
    for text in args.val_slices or []:  # "20 21 22", "20-24" or "20,21"
        for part in text.replace(",", " ").split():
            first, _, last = part.partition("-")
            try:
                val_slices.extend(range(int(first), int(last or first) + 1))
            except ValueError:
                raise InputError(f"--val-slices: {part!r}; expected slice numbers like 20 21 or a range 20-24") from None
    settings = TrainSettings(
        images=args.images, labels=args.labels, weights=args.weights, out=args.out, axes=args.axes,
        labels_axes=args.labels_axes, val_slices=tuple(val_slices), steps=args.steps, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, lr_schedule=args.lr_schedule,
        dims=args.dims, depth=args.depth, base_channels=args.base_channels, padding=args.padding,
        batch_norm=args.batch_norm, dropout=args.dropout, tile_size=args.tile_size, normalize=args.normalize,
        w0=args.w0, sigma=args.sigma, class_balance=not args.no_class_balance, foreground_bias=args.foreground_bias,
        elastic=not args.no_elastic, flips=not args.no_flips, rotations=not args.no_rotations, gray=not args.no_gray,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
        amp=args.amp, num_workers=args.workers, threads=args.threads, time_limit=args.time_limit,
        resume=args.resume, overwrite=args.overwrite,
    )
    bar: list[Any] = []
    running: list[float] = []

    def on_start(job: Any) -> None:
        c, s = job.model.config, job.settings
        n_train, n_val = len(job.spec.regions), len(job.val_regions)
        if c.dims == 2 and len(job.images.spatial_shape) == 3:
            where = f"{n_train} slices" + (f" ({n_val} more held out for validation)" if n_val else "")
        else:
            where = "the image" if n_train == 1 else f"{n_train} runs of slices"
            where += " (held-out slices for validation)" if n_val else ""
        where += "" if n_val else "; no validation: best.pt is the latest model"
        optimiser = f"SGD momentum {s.momentum}" if s.optimizer == "sgd" else "Adam"
        print(f"overtile: training a {c.dims}-D U-Net ({num_parameters(job.model):,} parameters, depth {c.depth}, "
              f"{c.base_channels} base channels, {c.padding}) on {job.spec.input_size} px patches "
              f"(labels {job.spec.output_size} px) from {where}; {optimiser}, lr {job.lr:g}, "
              f"batch {s.batch_size}, on {job.device}")
        if job.start:
            done = " (nothing left to do)" if job.start >= s.steps else ""
            print(f"overtile: resuming after step {job.start} of {s.steps}{done}")
        bar.append(tqdm(total=s.steps, initial=min(job.start, s.steps), unit="step", desc="train", disable=args.quiet))

    def on_step(row: dict[str, Any]) -> None:
        running.append(row["loss"] if not running else 0.98 * running[-1] + 0.02 * row["loss"])
        postfix = {"loss": f"{running[-1]:.4f}"}
        if "rand_error" in row:
            postfix["rand"] = f"{row['rand_error']:.4f}"
        bar[0].set_postfix(postfix, refresh=False)
        bar[0].update(1)

    try:
        summary = train(settings, on_start=on_start, on_step=on_step)
    except KeyboardInterrupt:
        if bar:
            bar[0].close()
        print(f"overtile: interrupted; rerun with --resume to continue from {settings.out}/last.pt", file=sys.stderr)
        raise SystemExit(130) from None
    if bar:
        bar[0].close()
    out = summary.out
    if summary.best.get("rand_error") is not None:
        b = summary.best
        best = (f"best Rand error {b['rand_error']:.4f} at step {summary.best_step} "
                f"(pixel error {b['pixel_error']:.4f}, IoU {b['iou']:.4f}, raw Rand error {b['rand_error_raw']:.4f})")
    else:
        best = "best Rand error: none (no --val-slices; best.pt is the latest model)"
    ran = f"steps {summary.start + 1}-{summary.step} in {summary.seconds:.1f} s" if summary.step > summary.start else "no steps"
    loss = f", last loss {summary.loss:.4f}" if summary.loss is not None else ""
    print(f"overtile: done: {ran}{loss}; {best}\n"
          f"overtile: checkpoints {out / 'best.pt'} and {out / 'last.pt'}; log {out / 'log.csv'}, curves {out / 'curves.png'}")


def _ingest(args: argparse.Namespace) -> None:
    from pipeline.slides import IngestSettings, ingest

    settings = IngestSettings(
        slide=args.slide, output=args.output, block_size=args.block_size, levels=args.levels, axes=args.axes,
        workers=args.workers, scheduler=args.scheduler, overwrite=args.overwrite,
    )
    bar = BlockBar("ingest", args.quiet)

    def on_plan(job: Any, todo: int, skipped: int) -> None:
        shapes = ", ".join("×".join(map(str, lv.shape[1:])) for lv in job.levels)
        size = ", ".join(f"{a} {s:g} {job.units[a]}" for a, s in zip(job.axes[1:], job.levels[0].scale[1:]) if a in job.units)
        print(f"overtile: {job.kind} slide, {job.levels[0].shape[0]} channel(s) {job.dtype}, {len(job.levels)} level(s) "
              f"({shapes} px), pixel size {size or 'unknown'}; {todo + skipped} blocks of "
              f"{'×'.join(map(str, job.levels[0].chunks[1:]))}")
        bar.start(todo, skipped)

    job, summary = ingest(settings, on_result=bar, on_plan=on_plan)
    bar.close()
    print(f"overtile: done: {summary.done} blocks copied, {summary.skipped} skipped (already done), "
          f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s\n"
          f"overtile: OME-Zarr written to {job.settings.output} (arrays {', '.join(map(str, range(len(job.levels))))}, "
          f"axes {job.axes}, {job.dtype})")


def _model_init(args: argparse.Namespace) -> None:
    import torch

    from pipeline.unet import UNet, num_parameters, save_model

    torch.manual_seed(args.seed)
    model = UNet(
        in_channels=args.in_channels, num_classes=args.classes, dims=args.dims, depth=args.depth,
        base_channels=args.base_channels, padding=args.padding, batch_norm=args.batch_norm,
    )
    save_model(model, args.out)
    print(f"overtile: wrote a random {args.dims}-D U-Net ({num_parameters(model):,} parameters, "
          f"margin {model.margin} px, smallest tile {model.min_input_size(model.factor + model.output_remainder)} px) to {args.out}")


def _model_info(args: argparse.Namespace) -> None:
    from pipeline.unet import load_model, num_parameters

    model = load_model(args.checkpoint)
    c = model.config
    print(f"{args.checkpoint}: {c.dims}-D U-Net, depth {c.depth}, {c.base_channels} base channels, "
          f"{c.padding} padding, {c.in_channels} → {c.num_classes} channels, {num_parameters(model):,} parameters")
    if c.padding == "valid":
        sizes = [model.min_input_size(model.factor * k + model.output_remainder) for k in (1, 8, 16, 32, 64)]
        print(f"  margin {model.margin} px per side; tile sizes e.g. {', '.join(map(str, sizes))} "
              f"(output = input − {2 * model.margin})")
    print(f"  normalisation: {model.normalization}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overtile",
        description="Overlap-tile U-Net inference over huge Zarr images on Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="run a U-Net over a Zarr image, blockwise on Dask",
                       description="Run a U-Net over a Zarr / OME-Zarr image with the overlap-tile strategy, "
                                   "one Dask task per output block, and write an OME-Zarr image. "
                                   "A rerun resumes where the last one stopped.")
    p.add_argument("input", help="input Zarr array or OME-Zarr image (path or URL)")
    p.add_argument("output", help="output OME-Zarr image (path or URL)")
    p.add_argument("--model", required=True, help="checkpoint file (see 'overtile model init')")
    p.add_argument("--axes", help="axes of a plain Zarr array: yx, cyx, zyx, czyx or yxc (default yx for 2-D)")
    p.add_argument("--block-size", type=int, help="block edge in px: unit of work and output chunk (default 2048 in 2-D, 256 in 3-D)")
    p.add_argument("--tile-size", type=int, help="largest tile input edge in px (default 1212 in 2-D); snapped to a valid size")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="same-padding models only: fraction of a tile shared with its neighbour, blended (default 0.5)")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, help="worker processes of the local Dask cluster (default: one per core or GPU)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (default: start a local cluster)")
    p.add_argument("--output", dest="output_kind", choices=["probabilities", "labels"], default="probabilities",
                   help="softmax probabilities (classes, [Z,] Y, X) or argmax labels as uint8 (default probabilities)")
    p.add_argument("--dtype", choices=["float32", "float16", "uint8"], default="float32",
                   help="dtype of probabilities; uint8 stores round(255·p) (default float32)")
    p.add_argument("--mirror", choices=["reflect", "symmetric"], default="reflect",
                   help="mirroring at the image border, in numpy's words (default reflect)")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision; faster on GPUs, slightly different numbers (default none)")
    p.add_argument("--tissue", choices=["all", "auto", "saturation", "bright", "dark"], default="all",
                   help="compute only blocks with tissue in a low-resolution mask: saturation (Otsu on HSV saturation, "
                        "brightfield H&E), bright / dark (Otsu on intensity), auto (saturation for RGB, else bright); "
                        "default all")
    p.add_argument("--tissue-threshold", type=float, help="fixed threshold on that feature instead of Otsu's")
    p.add_argument("--tissue-mask", help="a mask image (any resolution, nonzero = tissue) choosing the blocks to compute")
    p.add_argument("--no-pyramid", action="store_true", help="write only the full resolution (no downsampled levels)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    w = sub.add_parser("weights", help="compute the paper's training weight maps, blockwise on Dask",
                       description="Weight map w = w_c + w0·exp(−(d1+d2)²/2σ²) of an instance label image "
                                   "(0 = background), blockwise with a halo; class weights from a global pass. "
                                   "A rerun resumes.")
    w.add_argument("labels", help="instance labels (integers, 0 = background) or, with --binary, a 0/1 mask")
    w.add_argument("output", help="output OME-Zarr image of float32 weights")
    w.add_argument("--axes", help="axes of a plain Zarr array: yx or zyx (default yx for 2-D)")
    w.add_argument("--w0", type=float, default=10.0, help="height of the border term (default 10, as in the paper)")
    w.add_argument("--sigma", type=float, default=5.0, help="width of the border term in px or physical units (default 5)")
    w.add_argument("--binary", action="store_true", help="labels are a 0/1 mask: make cells by connected components")
    w.add_argument("--block-size", type=int, help="block edge in px (default 2048 in 2-D, 256 in 3-D)")
    w.add_argument("--workers", type=int, help="worker processes of the local Dask cluster")
    w.add_argument("--scheduler", help="address of an existing Dask scheduler")
    w.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming it")
    w.add_argument("--preview", help="also write a PNG of the labels beside the weight map")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=_weights)

    t = sub.add_parser("train", help="train a U-Net from Zarr images and labels",
                       description="Train a U-Net as the paper does: random patches from Zarr, elastic deformation, "
                                   "weighted cross-entropy with the weight map, SGD with momentum 0.99 (or Adam). "
                                   "Writes OUT/last.pt (resumable), OUT/best.pt (by validation Rand error), "
                                   "OUT/log.csv and OUT/curves.png; best.pt is a model for 'overtile predict'.")
    t.add_argument("--images", required=True, help="training image: Zarr array or OME-Zarr image")
    t.add_argument("--labels", required=True, help="labels: a mask (255 or 1 = cell, 0 = membrane/background) or instance labels")
    t.add_argument("--weights", help="precomputed weight maps (see 'overtile weights'); default: computed per patch")
    t.add_argument("--out", required=True, help="directory for checkpoints, log and curves")
    t.add_argument("--axes", help="axes of a plain image array: yx, cyx, zyx, czyx or yxc (default yx for 2-D)")
    t.add_argument("--labels-axes", help="axes of a plain labels array (default: the image's without c)")
    t.add_argument("--val-slices", nargs="+", metavar="Z", help="z-slices of a stack held out for validation, e.g. 20-24")
    t.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    t.add_argument("--batch-size", type=int, default=1, help="patches per step (default 1, as in the paper)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="SGD with momentum (the paper's) or Adam")
    t.add_argument("--lr", type=float, help="learning rate (default 0.01 for SGD, 0.001 for Adam)")
    t.add_argument("--momentum", type=float, default=0.99, help="SGD momentum (default 0.99, as in the paper)")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    t.add_argument("--dims", type=int, choices=[2, 3], help="2-D or 3-D U-Net (default: the image's spatial axes)")
    t.add_argument("--depth", type=int, default=5, help="resolution levels (5 in the paper: 4 poolings)")
    t.add_argument("--base-channels", type=int, default=64, help="channels at the first level (64 in the paper)")
    t.add_argument("--padding", choices=["valid", "same"], default="valid")
    t.add_argument("--batch-norm", action="store_true")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout at the end of the contracting path")
    t.add_argument("--tile-size", type=int, default=572, help="patch edge = model input, snapped to a valid size (default 572)")
    t.add_argument("--normalize", choices=["scale", "standardize"], default="scale",
                   help="scale: integers divided by their dtype's max; standardize: then the training data's mean/std")
    t.add_argument("--w0", type=float, default=10.0, help="weight map border term height (default 10)")
    t.add_argument("--sigma", type=float, default=5.0, help="weight map border term width in px (default 5)")
    t.add_argument("--no-class-balance", action="store_true", help="do not balance background and cell frequencies")
    t.add_argument("--foreground-bias", type=float, default=0.0, help="probability of centring a patch on cells (default 0)")
    t.add_argument("--no-elastic", action="store_true", help="no elastic deformation")
    t.add_argument("--no-flips", action="store_true", help="no random flips")
    t.add_argument("--no-rotations", action="store_true", help="no random 90° rotations")
    t.add_argument("--no-gray", action="store_true", help="no gray-value variation")
    t.add_argument("--val-every", type=int, default=100, help="validate every N steps (default 100)")
    t.add_argument("--checkpoint-every", type=int, default=100, help="write last.pt every N steps (default 100)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--amp", choices=["none", "bf16", "fp16"], default="fp16", help="mixed precision on CUDA (default fp16)")
    t.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default 0)")
    t.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    t.add_argument("--time-limit", type=float, help="stop after this many seconds (validate and checkpoint first)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--overwrite", action="store_true", help="start over even if OUT holds a run")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    g = sub.add_parser("ingest", help="convert a slide (SVS, NDPI, OME-TIFF, TIFF, PNG, JPEG) to OME-Zarr",
                       description="Convert a whole-slide image or picture to an OME-Zarr 0.5 image with every "
                                   "pyramid level the file has, block by block (memory bounded by the block size). "
                                   "'overtile predict' also reads TIFF-based slides directly. A rerun resumes.")
    g.add_argument("slide", help="SVS, NDPI, OME-TIFF, SCN, BIF or other (pyramidal) TIFF; PNG or JPEG (read whole)")
    g.add_argument("output", help="output OME-Zarr image (path or URL)")
    g.add_argument("--block-size", type=int, help="block edge in px: unit of work and output chunk (default 2048 in 2-D, 256 in 3-D)")
    g.add_argument("--levels", default="all", help="pyramid levels to write: all (default) or the first N")
    g.add_argument("--axes", help="axes of a TIFF stack whose axes the file does not name, e.g. zyx")
    g.add_argument("--workers", type=int, help="copy blocks on a local Dask cluster of N processes (default: in this process)")
    g.add_argument("--scheduler", help="address of an existing Dask scheduler to copy blocks on")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming it")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_ingest)

    m = sub.add_parser("model", help="create or inspect U-Net checkpoints")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    i = msub.add_parser("init", help="write a checkpoint with random (He-initialised) weights",
                        description="Write a U-Net checkpoint with random weights, for trying things out.")
    i.add_argument("out", help="checkpoint file to write")
    i.add_argument("--dims", type=int, choices=[2, 3], default=2)
    i.add_argument("--in-channels", type=int, default=1)
    i.add_argument("--classes", type=int, default=2)
    i.add_argument("--depth", type=int, default=5, help="resolution levels (5 in the paper: 4 poolings)")
    i.add_argument("--base-channels", type=int, default=64, help="channels at the first level (64 in the paper)")
    i.add_argument("--padding", choices=["valid", "same"], default="valid")
    i.add_argument("--batch-norm", action="store_true")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=_model_init)
    info = msub.add_parser("info", help="describe a checkpoint", description="Print a checkpoint's architecture and tile sizes.")
    info.add_argument("checkpoint")
    info.set_defaults(func=_model_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InputError as exc:
        print(f"overtile: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"overtile: error: --{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("overtile: interrupted; finished blocks are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
