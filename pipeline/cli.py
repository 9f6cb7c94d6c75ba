"""The ``overtile`` command.

Bad input ends with one line on stderr naming the input and what is wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from pydantic import ValidationError

from pipeline.errors import InputError


def _predict(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from pipeline.predict import PredictSettings, predict

    settings = PredictSettings(
        input=args.input, output=args.output, model=args.model, axes=args.axes,
        block_size=args.block_size, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
        device=args.device, workers=args.workers, scheduler=args.scheduler,
        output_kind=args.output_kind, dtype=args.dtype, mirror=args.mirror,
        autocast=args.autocast, overwrite=args.overwrite,
    )
    bar: list[Any] = []

    def on_plan(job: Any, todo: int, skipped: int) -> None:
        shape = "×".join(map(str, job.spatial_shape))
        block = "×".join(map(str, job.block_shape))
        print(f"overtile: {shape} px in {todo + skipped} blocks of {block}, tiles of {job.tile_size} px, on {job.device}")
        if skipped:
            print(f"overtile: resuming: {skipped} blocks already done, {todo} to go")
        bar.append(tqdm(total=todo + skipped, initial=skipped, unit="block", desc="predict", disable=args.quiet))

    def on_result(record: dict[str, Any]) -> None:
        bar[0].update(1)

    job, summary = predict(settings, on_result=on_result, on_plan=on_plan)
    if bar:
        bar[0].close()
    print(
        f"overtile: done: {summary.done} blocks computed, {summary.skipped} skipped (already done), "
        f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s = {summary.megapixels_per_second:.2f} MP/s\n"
        f"overtile: {settings.output_kind} written to {job.settings.output} (array '0', shape {job.output_shape}, {job.output_dtype})"
    )


def _weights(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from pipeline.weightmaps import WeightSettings, weight_maps

    settings = WeightSettings(
        labels=args.labels, output=args.output, axes=args.axes, w0=args.w0, sigma=args.sigma,
        binary=args.binary, block_size=args.block_size, workers=args.workers,
        scheduler=args.scheduler, overwrite=args.overwrite,
    )
    bar: list[Any] = []

    def on_plan(job: Any, todo: int, skipped: int) -> None:
        bg, fg = job.class_weights
        print(f"overtile: {'×'.join(map(str, job.spatial_shape))} px in {todo + skipped} blocks, halo {job.halo} px; "
              f"class weights background {bg:.3f}, foreground {fg:.3f}")
        if skipped:
            print(f"overtile: resuming: {skipped} blocks already done, {todo} to go")
        bar.append(tqdm(total=todo + skipped, initial=skipped, unit="block", desc="weights", disable=args.quiet))

    job, summary = weight_maps(settings, on_result=lambda record: bar[0].update(1), on_plan=on_plan)
    if bar:
        bar[0].close()
    print(f"overtile: done: {summary.done} blocks computed, {summary.skipped} skipped (already done), "
          f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s\n"
          f"overtile: weight map written to {job.settings.output} (array '0', float32)")
    if args.preview:
        from pipeline.preview import weights_png

        print(f"overtile: preview written to {weights_png(job.labels_url, job.output_array.rsplit('/', 1)[0], args.preview, job.labels_axes)}")


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
