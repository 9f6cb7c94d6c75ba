"""The ``overtile`` command.

Bad input ends with one line on stderr naming the input and what is wrong, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from types import UnionType
from typing import Any, Literal, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.errors import InputError


class BlockBar:
    """The progress bar of a blockwise run: says what a resumed run skips, then counts blocks.

    A context manager: the bar is closed when the run ends, however it ends, so an error
    printed after it is the terminal's last line, alone.
    """

    def __init__(self, desc: str, quiet: bool):
        self.desc, self.quiet = desc, quiet
        self.bar: Any = None

    def start(self, pending: Any) -> None:
        from tqdm import tqdm

        todo, skipped = len(pending.blocks), pending.skipped
        if skipped:
            print(f"overtile: resuming: {skipped} blocks already done, {todo} to go")
        self.bar = tqdm(total=todo + skipped, initial=skipped, unit="block", desc=self.desc, disable=self.quiet)

    def __call__(self, record: dict[str, Any]) -> None:
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "BlockBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _at_least(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum`` (else argparse's one-line error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def _settings(model: type[BaseModel], args: argparse.Namespace, prefix: str = "") -> Any:
    """The settings model from the parsed arguments: only what the user gave is passed, so
    every default is the model's own. ``prefix``: the arguments :func:`add_settings` added
    with that prefix."""
    given = {name.removeprefix(prefix): value for name, value in vars(args).items() if name.startswith(prefix)}
    return model(**{name: value for name, value in given.items() if name in model.model_fields})


def _predict(args: argparse.Namespace) -> None:
    from pipeline.jobs.predict import PredictSettings, compile_report, predict

    settings = _settings(PredictSettings, args)
    bar = BlockBar("predict", args.quiet)

    def on_plan(job: Any, pending: Any) -> None:
        shape = "×".join(map(str, job.spatial_shape))
        block = "×".join(map(str, job.block_shape))
        print(f"overtile: {shape} px in {pending.total} blocks of {block}, tiles up to {job.tile_size} px, on {job.device}")
        print(f"overtile: model: {job.model.summary()}")
        if job.sliced:
            print(f"overtile: a 2-D model over {job.spatial_shape[0]} slices: each predicted on its own, as a 2-D image")
        if not job.model.exact and job.model.geometry.margin:
            print(f"overtile: warning: {settings.model} crops its tiles but shifted tiles disagree: it is not translation "
                  f"equivariant, so tiles are blended and the output depends (slightly) on the tile size", file=sys.stderr)
        if job.tissue:
            print(f"overtile: tissue mask {job.tissue}; {pending.background} blocks without tissue are not computed")
        bar.start(pending)

    with bar:
        job, summary = predict(settings, on_result=bar, on_plan=on_plan)
    background = f", {summary.background} without tissue (not computed)" if summary.background else ""
    print(
        f"overtile: done: {summary.done} blocks computed, {summary.skipped} skipped (already done){background}, "
        f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s = {summary.megapixels_per_second:.2f} MP/s\n"
        f"overtile: tiles {job.model.tiling}\n"
        + (f"overtile: test-time augmentation: {job.augmentation}\n" if job.augmented else "")
        + f"overtile: {settings.output_kind} written to {job.output} (array '0', shape {job.output_shape}, {job.output_dtype})"
    )
    if job.compile and summary.records:
        print(f"overtile: {compile_report(summary.records)}")


def _weights(args: argparse.Namespace) -> None:
    from pipeline.jobs.weights import WeightSettings, weight_maps

    settings = _settings(WeightSettings, args)
    bar = BlockBar("weights", args.quiet)

    def on_plan(job: Any, pending: Any) -> None:
        print(f"overtile: {'×'.join(map(str, job.spatial_shape))} px in {pending.total} blocks, halo {job.halo} px")
        bar.start(pending)

    with bar:
        job, summary = weight_maps(settings, on_result=bar, on_plan=on_plan)
    bg, fg = job.class_weights or (float("nan"), float("nan"))
    print(f"overtile: done: {summary.done} blocks computed, {summary.skipped} skipped (already done), "
          f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s; class weights background {bg:.3f}, cells {fg:.3f}\n"
          f"overtile: weight map written to {job.output} (array '0', float32)")
    if args.preview:
        from pipeline.preview import weights_png

        print(f"overtile: preview written to {weights_png(job.labels_url, job.output, args.preview, job.labels_axes)}")


def _objects(args: argparse.Namespace) -> None:
    from pipeline.jobs.objects import ObjectSettings, find_objects

    settings = _settings(ObjectSettings, args)
    bar = BlockBar("objects", args.quiet)

    def on_plan(job: Any, pending: Any) -> None:
        print(f"overtile: {'×'.join(map(str, job.spatial_shape))} px in {pending.total} blocks "
              f"({len(job.present)} with probabilities); seeds, faces and the merge first")
        bar.start(pending)

    with bar:
        job, summary = find_objects(settings, on_result=bar, on_plan=on_plan)
    print(f"overtile: done: {job.objects} objects; {summary.done} blocks computed, {summary.skipped} skipped "
          f"(already done) in {summary.seconds:.1f} s\n"
          f"overtile: labels written to {job.output} (array '0', {settings.dtype}), table to {job.table}"
          + (f", outlines to {settings.geojson}" if settings.geojson else ""))


def _cohort(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from pipeline.jobs.cohort import CohortSettings, SlideObjects, SlideRun, list_slides, run_cohort

    objects = _settings(SlideObjects, args, "objects_") if args.find_objects else None
    settings = CohortSettings(**{k: v for k, v in vars(args).items() if k in CohortSettings.model_fields},
                              objects=objects)
    total = len(list_slides(settings.slides))
    print(f"overtile: {total} slides in {settings.slides}; {settings.slides_in_flight} at a time")
    bar = tqdm(total=0, unit="block", desc="cohort", disable=args.quiet)
    done: list[dict[str, Any]] = []

    def on_plan(name: str, job: Any, pending: Any) -> None:
        bar.total += len(pending.blocks)
        bar.refresh()

    def on_slide(row: dict[str, Any]) -> None:
        done.append(row)
        what = row["error"] if row["status"] == "failed" else "skipped" if row["status"] == "finished before" else (
            f"{row['blocks_computed']} blocks computed, {row['blocks_skipped']} resumed, "
            f"{row['blocks_without_tissue']} without tissue" + (f", {row['objects']} objects" if row["objects"] is not None else ""))
        bar.write(f"overtile: [{len(done)}/{total}] {row['name']}: {row['status']}; {what} ({row['seconds']} s)")

    with bar:
        rows = run_cohort(settings, report=SlideRun(on_plan, lambda name, record: bar.update(1)), on_slide=on_slide)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"overtile: done: {len(rows) - len(failed)} of {len(rows)} slides finished, {len(failed)} failed; study table "
          f"{settings.output.rstrip('/')}/study.csv (and .parquet)")
    if failed:
        raise InputError(f"{len(failed)} slide(s) failed: " + "; ".join(r["error"] for r in failed[:3])
                         + ("; ..." if len(failed) > 3 else "") + " (the others are finished; fix and rerun)")


def _score(args: argparse.Namespace) -> None:
    import json

    from pipeline.jobs.score import ScoreSettings, score

    result = score(_settings(ScoreSettings, args))
    names = {"rand_error": "Rand error", "rand_error_raw": "Rand error (not grown)", "pixel_error": "pixel error",
             "iou": "IoU"}
    slices = f"{result['slices'][0]}-{result['slices'][-1]}" if len(result["slices"]) > 1 else str(result["slices"][0])
    print(f"overtile: slices {slices} scored once; cells are components of p > threshold (grown over the "
          f"membrane for the Rand error, as the challenge did; not grown beside it)")
    rows = [("0.5", result["at_0.5"])]
    if "at_chosen" in result:
        rows.append((f"{result['threshold']:.1f} (chosen on {result['choose_on'][0]}-{result['choose_on'][-1]})",
                     result["at_chosen"]))
    print("| threshold | " + " | ".join(names.values()) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " |")
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{values[k]:.4f}" for k in names) + " |")
    if "at_chosen" in result:
        print(f"Rand error of cells agglomerated by their borders (fragments merged while the mean membrane "
              f"probability along a border is below {result['merge_threshold']:.2f}, chosen on the same slices): "
              f"{result['at_chosen']['rand_error_agglomerated']:.4f}")
        on = result["on_choice"]
        print(f"On {result['choose_on'][0]}-{result['choose_on'][-1]} the Rand error was {on['rand_error']:.4f} "
              f"grown and {on['rand_error_agglomerated']:.4f} agglomerated: the rule chosen there is {result['rule']}")
        print(f"Pixel error at {result['pixel_threshold']:.2f} (the threshold with the lowest pixel error on the same "
              f"slices, {on['pixel_error']:.4f} there): {result['pixel_error_at_pixel_threshold']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def _train(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from pipeline.jobs.train import TrainSettings, train
    from pipeline.numerics.unet import num_parameters

    settings = _settings(TrainSettings, args)
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
        for warning in job.warnings:
            print(f"overtile: warning: {warning}", file=sys.stderr)
        if job.start:
            done = " (nothing left to do)" if job.start >= s.steps else ""
            print(f"overtile: resuming after step {job.start} of {s.steps}{done}")
        if s.time_limit:  # the budget ends the run, not the step count: the bar counts its seconds
            bar.append(tqdm(total=round(s.time_limit), unit="s", desc="train (time budget)", disable=args.quiet,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"))
        else:
            bar.append(tqdm(total=s.steps, initial=min(job.start, s.steps), unit="step", desc="train", disable=args.quiet))

    def on_step(row: dict[str, Any]) -> None:
        running.append(row["loss"] if not running else 0.98 * running[-1] + 0.02 * row["loss"])
        postfix = {"loss": f"{running[-1]:.4f}"}
        if "rand_error" in row:
            postfix["rand"] = f"{row['rand_error']:.4f}"
        if settings.time_limit:
            bar[0].set_postfix({"step": row["step"], **postfix}, refresh=False)
            bar[0].update(min(row["seconds"], bar[0].total) - bar[0].n)
        else:
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
    from pipeline.jobs.ingest import IngestSettings, ingest

    settings = _settings(IngestSettings, args)
    bar = BlockBar("ingest", args.quiet)

    def on_plan(job: Any, pending: Any) -> None:
        shapes = ", ".join("×".join(map(str, lv.shape[1:])) for lv in job.levels)
        size = ", ".join(f"{a} {s:g} {job.units[a]}" for a, s in zip(job.axes[1:], job.levels[0].scale[1:]) if a in job.units)
        print(f"overtile: {job.format} slide, {job.levels[0].shape[0]} channel(s) {job.dtype}, {len(job.levels)} level(s) "
              f"({shapes} px), pixel size {size or 'unknown'}; {pending.total} blocks of "
              f"{'×'.join(map(str, job.levels[0].chunks[1:]))}")
        bar.start(pending)

    with bar:
        job, summary = ingest(settings, on_result=bar, on_plan=on_plan)
    print(f"overtile: done: {summary.done} blocks copied, {summary.skipped} skipped (already done), "
          f"{summary.pixels / 1e6:.1f} MP in {summary.seconds:.1f} s\n"
          f"overtile: OME-Zarr written to {job.output} (arrays {', '.join(map(str, range(len(job.levels))))}, "
          f"axes {job.axes}, {job.dtype})")


def _model_init(args: argparse.Namespace) -> None:
    import torch

    from pipeline.numerics.unet import UNet, num_parameters, save_model

    torch.manual_seed(args.seed)
    model = UNet(
        in_channels=args.in_channels, num_classes=args.classes, dims=args.dims, depth=args.depth,
        base_channels=args.base_channels, padding=args.padding, batch_norm=args.batch_norm,
    )
    save_model(model, args.out)
    print(f"overtile: wrote a random {args.dims}-D U-Net ({num_parameters(model):,} parameters, "
          f"margin {model.margin} px, smallest tile {model.min_input_size(model.factor + model.output_remainder)} px) to {args.out}")


def _model_info(args: argparse.Namespace) -> None:
    from pipeline.models import KIND_NAMES, describe
    from pipeline.numerics.unet import num_parameters

    info, model = describe(args.model, weights=args.weights)
    g = info.geometry
    if info.unet:
        c = dict(info.unet)
        print(f"{args.model}: {KIND_NAMES[info.kind]}: {c['dims']}-D U-Net, depth {c['depth']}, {c['base_channels']} "
              f"base channels, {c['padding']} padding, {c['in_channels']} → {c['num_classes']} channels, "
              f"{num_parameters(model):,} parameters")
    else:
        print(f"{args.model}: {info.summary()}")
    if g.fixed:
        print(f"  margin {g.margin} px per side; fixed input size {g.input_size} px (output {g.smallest} px)")
    elif not g.blend:
        sizes = [g.min_input_size(g.factor * k + g.remainder) for k in (1, 8, 16, 32, 64)]
        print(f"  margin {g.margin} px per side; tile sizes e.g. {', '.join(map(str, sizes))} "
              f"(output = input − {2 * g.margin})")
    print(f"  tiles {info.tiling}")
    print(f"  normalisation: {info.normalization}")


def _model_export(args: argparse.Namespace) -> None:
    from pipeline.models import export

    print(f"overtile: {export(args.checkpoint, args.out, args.format, args.name, args.description, tuple(args.author), args.license)}")


# --- options from the settings models --------------------------------------------------------

# Flags whose name is not the field's: predict's output is positional, so its kind is --output.
FLAG_NAMES = {"output_kind": "--output"}


class _IntRanges(argparse.Action):
    """Slice numbers as ``20 21``, ``20,21`` or ``20-24``, flattened into one tuple."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option: str | None = None) -> None:
        numbers: list[int] = []
        for text in values:
            for part in str(text).replace(",", " ").split():
                first, _, last = part.partition("-")
                try:
                    numbers.extend(range(int(first), int(last or first) + 1))
                except ValueError:
                    raise InputError(f"{option}: {part!r}; expected numbers like 20 21 or a range 20-24") from None
        setattr(namespace, self.dest, tuple(numbers))


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The annotation without ``None``, and whether ``None`` was allowed."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else Union[tuple(args)]), len(args) < len(get_args(annotation))
    return annotation, False


def _default_text(info: FieldInfo) -> str:
    if info.is_required() or info.default is None:
        return ""
    value = info.default
    if isinstance(value, bool):
        return ""  # --x / --no-x shows it
    if isinstance(value, tuple):
        return "" if not value else f" (default {' '.join(map(str, value))})"
    return f" (default {value})"


def add_settings(parser: argparse.ArgumentParser, model: type[BaseModel], positional: Sequence[str] = (),
                 prefix: str = "", exclude: Sequence[str] = ()) -> None:
    """One argument per field of a settings model: ``input`` / ``output``-like fields named in
    ``positional`` as positionals, the others as ``--kebab-case`` options. Types, choices,
    help and defaults come from the model (its field descriptions and defaults), and only what
    the user gives is passed on, so the command line cannot drift from the Python API and the
    Prefect form. Booleans get ``--x`` / ``--no-x``. Positionals come in the order given.
    ``prefix``: a nested model's fields, as ``--PREFIX-field`` into ``PREFIX_field`` (see
    :func:`_settings`); ``exclude``: fields left to the caller."""
    fields = model.model_fields
    for name in positional:
        parser.add_argument(name, help=(fields[name].description or name).replace("%", "%%"))
    for name, info in fields.items():
        if name in positional or name in exclude:
            continue
        help_text = (info.description or name.replace("_", " ")) + _default_text(info)
        help_text = help_text.replace("%", "%%")
        kind, optional = _plain(info.annotation)
        flag = "--" + prefix + name.replace("_", "-") if prefix else FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        options: dict[str, Any] = {"dest": prefix.replace("-", "_") + name, "help": help_text,
                                   "default": argparse.SUPPRESS}
        if info.is_required():
            options["required"] = True
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            choices = list(get_args(kind))
            options.update(choices=choices, type=type(choices[0]))
        elif get_origin(kind) is tuple and get_args(kind)[:1] == (int,):
            options.update(nargs="+", action=_IntRanges, metavar="N")
        elif kind in (int, float, str):
            options["type"] = kind
        # anything else (e.g. "all" or a count) goes to the model as text, which validates it
        parser.add_argument(flag, **options)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.jobs.cohort import CohortSettings, SlideObjects
    from pipeline.jobs.ingest import IngestSettings
    from pipeline.jobs.objects import ObjectSettings
    from pipeline.jobs.predict import PredictSettings
    from pipeline.jobs.score import ScoreSettings
    from pipeline.jobs.train import TrainSettings
    from pipeline.jobs.weights import WeightSettings

    parser = argparse.ArgumentParser(
        prog="overtile",
        description="Overlap-tile U-Net inference over huge Zarr images on Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="run a U-Net over a Zarr image, blockwise on Dask",
                       description="Run a U-Net over a Zarr / OME-Zarr image (or a slide read in place) with the "
                                   "overlap-tile strategy, one Dask task per output block, and write an OME-Zarr "
                                   "image. A rerun resumes where the last one stopped.")
    add_settings(p, PredictSettings, positional=("input", "output"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    w = sub.add_parser("weights", help="compute the paper's training weight maps, blockwise on Dask",
                       description="Weight map w = w_c + w0·exp(−(d1+d2)²/2σ²) of an instance label image "
                                   "(0 = background), blockwise with a halo; class weights from a global pass. "
                                   "A rerun resumes.")
    add_settings(w, WeightSettings, positional=("labels", "output"))
    w.add_argument("--preview", help="also write a PNG of the labels beside the weight map")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=_weights)

    o = sub.add_parser("objects", help="label, measure and outline cells from probabilities, blockwise on Dask",
                       description="Objects of one class from a probability image written by 'overtile predict': "
                                   "seeds above --threshold, their face-connected components (merged across blocks), "
                                   "grown by at most --grow-distance pixels over --grow-threshold. Writes an NGFF "
                                   "label image, a Parquet object table and optionally GeoJSON outlines for QuPath. "
                                   "Exactly the labels of the same rule on the whole image; a rerun resumes.")
    add_settings(o, ObjectSettings, positional=("probabilities", "output"))
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.set_defaults(func=_objects)

    c = sub.add_parser("cohort", help="a study of slides (folder, glob or CSV; local or s3://) through one model",
                       description="Every slide of a folder, glob or CSV manifest (local paths or URLs): read in place "
                                   "(or ingested), tissue mask, prediction and optionally the cells as objects, one "
                                   "output folder per slide under OUTPUT, on one shared Dask cluster with several "
                                   "slides in flight. Writes OUTPUT/study.parquet and OUTPUT/study.csv. A slide's "
                                   "failure is its row; a rerun skips finished slides and resumes the others.")
    add_settings(c, CohortSettings, positional=("slides", "output"), exclude=("objects",))
    c.add_argument("--objects", dest="find_objects", action="store_true", help="also find the cells as objects (the --objects-* options)")
    add_settings(c, SlideObjects, prefix="objects-")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cohort)

    t = sub.add_parser("train", help="train a U-Net from Zarr images and labels",
                       description="Train a U-Net as the paper does: random patches from Zarr, elastic deformation, "
                                   "weighted cross-entropy with the weight map, SGD with momentum 0.99 (or Adam). "
                                   "Writes OUT/last.pt (resumable), OUT/best.pt (by validation Rand error), "
                                   "OUT/log.csv and OUT/curves.png; best.pt is a model for 'overtile predict'.")
    add_settings(t, TrainSettings)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    sc = sub.add_parser("score", help="score probabilities against labels, ISBI 2012's way, on slices held out",
                        description="Pixel error and foreground-restricted Rand error (cells grown over the membrane, "
                                    "and not grown) of the scored --slices, at 0.5 and at the threshold chosen on "
                                    "--choose-on (never the scored slices); beside them the Rand error of cells "
                                    "agglomerated by their borders, the rule that scored lower on --choose-on, and "
                                    "the pixel error at the threshold with the lowest pixel error there.")
    add_settings(sc, ScoreSettings, positional=("probabilities", "labels"))
    sc.add_argument("--json", help="also write the scores to this JSON file")
    sc.set_defaults(func=_score)

    g = sub.add_parser("ingest", help="convert a slide (SVS, NDPI, OME-TIFF, TIFF, PNG, JPEG) to OME-Zarr",
                       description="Convert a whole-slide image or picture to an OME-Zarr 0.5 image with every "
                                   "pyramid level the file has, block by block (memory bounded by the block size). "
                                   "'overtile predict' also reads TIFF-based slides directly. A rerun resumes.")
    add_settings(g, IngestSettings, positional=("slide", "output"))
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_ingest)

    m = sub.add_parser("model", help="create, inspect or export models")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    i = msub.add_parser("init", help="write a checkpoint with random (He-initialised) weights",
                        description="Write a U-Net checkpoint with random weights, for trying things out.")
    i.add_argument("out", help="checkpoint file to write")
    i.add_argument("--dims", type=int, choices=[2, 3], default=2)
    i.add_argument("--in-channels", type=_at_least(1), default=1)
    i.add_argument("--classes", type=_at_least(2), default=2, help="output classes, background included (2: cells "
                   "and background; softmax over them)")
    i.add_argument("--depth", type=_at_least(1), default=5, help="resolution levels (5 in the paper: 4 poolings)")
    i.add_argument("--base-channels", type=_at_least(1), default=64, help="channels at the first level (64 in the paper)")
    i.add_argument("--padding", choices=["valid", "same"], default="valid")
    i.add_argument("--batch-norm", action="store_true")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=_model_init)
    info = msub.add_parser("info", help="describe a model of any kind",
                           description="Print a model's kind, architecture, tile sizes and whether it is tiled exactly "
                                       "(an overtile checkpoint, TorchScript, ONNX or a bioimage.io package; foreign models "
                                       "are probed: valid sizes, margin, translation equivariance).")
    info.add_argument("model", help="model file, or bioimage.io package (zip, folder or rdf.yaml)")
    info.add_argument("--weights", choices=["pytorch_state_dict", "torchscript", "onnx"],
                      help="a package's weights to describe (default: the first of these it has)")
    info.set_defaults(func=_model_info)
    x = msub.add_parser("export", help="write a checkpoint as a bioimage.io package, ONNX or TorchScript",
                        description="Write an overtile checkpoint for other tools: a bioimage.io package (rdf.yaml "
                                    "validated by bioimageio.spec, with state-dict, TorchScript and ONNX weights, axes, "
                                    "tile sizes, crop, preprocessing, test input and output; OUT ending in .zip is a "
                                    "zip, else a folder), or a bare ONNX or TorchScript file (normalisation built in).")
    x.add_argument("checkpoint", help="overtile checkpoint to export")
    x.add_argument("out", help="file (or package folder) to write")
    x.add_argument("--format", required=True, choices=["bioimageio", "onnx", "torchscript"])
    x.add_argument("--name", help="the package's name (5-64 characters; default from the checkpoint's file name)")
    x.add_argument("--description", help="the package's one-line description")
    x.add_argument("--author", action="append", default=[], help="an author of the package (repeatable)")
    x.add_argument("--license", default="CC-BY-4.0", help="SPDX licence of the package (default CC-BY-4.0)")
    x.set_defaults(func=_model_export)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; one that no option of the command knows is an error of that command (its
    own usage line, and the option meant when it is a near miss), not of ``overtile``."""
    import difflib

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    leaf = parser
    for name in (getattr(args, "command", None), getattr(args, "model_command", None)):
        actions = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not actions:
            break
        leaf = actions[0].choices[name]
    known = [o for a in leaf._actions for o in a.option_strings if o.startswith("--")]
    near = [m for e in extras if e.startswith("--") for m in difflib.get_close_matches(e.split("=")[0], known, 1)]
    leaf.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    raise AssertionError("unreachable")  # error() exits


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
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
