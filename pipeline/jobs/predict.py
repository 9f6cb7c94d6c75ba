"""Blockwise overlap-tile inference from Zarr (or a slide read in place) to OME-Zarr.

:func:`plan_prediction` checks every input once and turns :class:`PredictSettings` into a
:class:`PredictJob` (geometry resolved, output created, ledger read, tissue mask applied);
:meth:`PredictJob.run_block` is the Dask task, run once per block in a worker process;
:func:`predict` runs the whole thing (the shape of :mod:`pipeline.jobs.blockwise`). The
settings model is the one the CLI and the Prefect flows use.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
import zarr
from pydantic import Field

from pipeline import models, storage
from pipeline.clusters import scheduler_setting
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.jobs.inference import (
    AUTOCAST,
    COMPILE_BREAK_EVEN_BLOCKS,
    cached_model,
    compiled_runner,
    file_digest,
    model_geometry,
    on_device,
    resolve_device,
    run_tiles,
)
from pipeline.jobs.pyramid import build_pyramid, unlist_levels
from pipeline.jobs.tissue import TissueMethod, tissue_mask
from pipeline.numerics.downsample import level_shapes
from pipeline.numerics.geometry import Block, Box, block_at, block_grid
from pipeline.numerics.tiling import class_labels, plan_tiles, predict_region, read_mirrored, softmax
from pipeline.numerics.tta import Transform, predict_region_tta, read_box, transforms
from pipeline.numerics.unet import Normalization

OutputKind = Literal["probabilities", "labels"]
# Integer images that a block kept on the device uploads as stored and normalises there.
DEVICE_NORMALISED = {np.dtype(t) for t in ("uint8", "int8", "int16", "int32")}
TTA_HELP = ("Test-time augmentation, averaged in probability space and exact under tiling: none, all (the 8 flips and "
            "90° rotations in 2-D, the 8 flips in 3-D), or a comma-separated subset such as identity,flip_x,rot90 "
            "(one forward pass per transform)")


class PredictSettings(blockwise.BlockwiseSettings):
    """Everything a prediction run needs; shared by the CLI, the Python API and the flows."""

    input: str = Field(description="Input image: a Zarr array, an OME-Zarr image, or a TIFF-based slide (SVS, NDPI, OME-TIFF) read in place (path or URL)")
    output: str = Field(description="Output OME-Zarr image to write (path or URL); IMAGE/labels/NAME makes labels an NGFF label image of the input")
    model: str = Field(description="The model: an overtile checkpoint, a TorchScript or ONNX file, or a bioimage.io "
                       "package (zip, folder or rdf.yaml); the kind is read from the file")
    axes: blockwise.Axes = Field(None, description="Axes of a plain Zarr array, e.g. yx, cyx, zyx, czyx, yxc")
    block_size: blockwise.BlockSize = None
    tile_size: int | None = Field(None, ge=8, description="Largest tile input edge for one forward pass (default 1212 in 2D)")
    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="Blended models only (same padding, or not translation "
                           "equivariant): fraction of a tile shared with its neighbour")
    batch_size: int = Field(1, ge=1, description="Tiles per forward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs")
    workers: blockwise.Workers = None
    scheduler: blockwise.Scheduler = None
    output_kind: OutputKind = Field("probabilities", description="Softmax probabilities per class, or the argmax labels (uint8)")
    dtype: Literal["float32", "float16", "uint8"] = Field("float32", description="Probability dtype; uint8 stores round(255·p)")
    activation: Literal["auto", "softmax", "sigmoid", "none"] = Field(
        "auto", description="How the model's outputs become probabilities: auto (a checkpoint: softmax; a package: its "
        "postprocessing; a bare TorchScript or ONNX file: none where the probe finds its outputs already are "
        "probabilities, else softmax, or sigmoid for one channel), or softmax, sigmoid, none")
    mirror: Literal["reflect", "symmetric"] = Field("reflect", description="Mirroring at the image border, in numpy's words")
    tta: str = Field("none", description=TTA_HELP)
    autocast: Literal["none", "fp32", "bf16", "fp16"] = Field(
        "none", description="Precision: none (float32 as torch runs it: TensorFloat-32 convolutions on GPUs that have "
        "them), fp32 (strict float32 on GPUs too: tiled output measured equal to whole-image inference on an H200, "
        "at about 1/8 the speed for the paper-width net), bf16 or fp16 (mixed precision); all but fp32 change GPU "
        "numbers slightly; ONNX models take none only")
    channels_last: bool = Field(True, description="channels_last memory format (same numbers, about 2× faster on CPU)")
    tissue: TissueMethod = Field("all", description="Which blocks to compute: all, or those with tissue in a low-resolution mask: "
                                 "saturation (Otsu on HSV saturation; brightfield H&E), bright / dark (Otsu on intensity; "
                                 "fluorescence / brightfield), auto (saturation for 8-bit RGB, "
                                 "dark for one 8-bit channel on a bright border, else bright)")
    tissue_threshold: float | None = Field(None, description="A fixed threshold on the tissue feature instead of Otsu's "
                                           "(saturation 0-1; intensity in the image's units)")
    tissue_mask: str | None = Field(None, description="A mask image (any resolution, nonzero = tissue) choosing the blocks to compute")
    compile: bool | None = Field(None, description="torch.compile the model, once per worker process and reused across "
                                 "blocks (the compile time is in the summary; same numbers within float rounding). "
                                 "Default: on GPUs when each task slot has enough blocks to pay for compiling "
                                 f"({COMPILE_BREAK_EVEN_BLOCKS} or more); off on CPUs, where it measured no gain")
    prefetch: bool | None = Field(None, description="Read each block in a Dask task of its own, so that the next block is "
                                  "read while this one computes (default: on CUDA)")
    device_stitch: bool | None = Field(None, description="Keep each block on the model's device from its upload to its "
                                       "stored form: integer images normalised, tiles cut, stitched, activated and encoded there, only the output "
                                       "dtype downloaded (default: on CUDA for torch models; the host then only reads "
                                       "and writes); test-time transforms too")
    pyramid: bool = Field(True, description="Also write downsampled levels (mean of probabilities, nearest labels) to the multiscales")
    shards: blockwise.Shards = None
    chunk_size: blockwise.ChunkSize = None
    overwrite: blockwise.Overwrite = False



@dataclass(frozen=True)
class PredictJob(blockwise.BlockwiseJob):
    """A planned prediction: what every block task needs, small enough to send with each."""

    kind: ClassVar[str] = "predict"

    settings: PredictSettings
    model: models.ModelInfo  # kind, geometry, normalisation (statistics fixed from the image), tiling
    device: str
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    tile_size: int
    output_shape: tuple[int, ...]
    output_dtype: str
    tissue: str = ""  # how the tissue mask was made, for the summary ("" without one)
    tissue_fraction: float = 1.0  # share of the image's pixels that are tissue (1 without a mask)
    compile: bool = False  # torch.compile, as the settings ask or the job's length decides

    @property
    def output_array(self) -> str:
        return f"{self.output.rstrip('/')}/0"

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def sliced(self) -> bool:
        """A 2-D model over a zyx stack: each z slice is predicted as a 2-D image of its own
        (blocks one slice deep), exactly as if it were stored alone."""
        return self.model.dims < len(self.spatial_shape)

    @property
    def plane_shape(self) -> tuple[int, ...]:
        """The shape the model tiles: the image's, or one slice's."""
        return self.spatial_shape[-self.model.dims:]

    def plane(self, box: Box) -> Box:
        """The part of a box the model tiles: all of it, or its y and x."""
        return Box(box.offset[-self.model.dims:], box.shape[-self.model.dims:])

    def stacked(self, block: Block, box: Box) -> Box:
        """A box of the model's plane over the block's slices (itself when not sliced)."""
        if not self.sliced:
            return box
        return Box((block.write.offset[0], *box.offset), (block.write.shape[0], *box.shape))

    @property
    def transforms(self) -> list[Transform]:
        """The test-time transforms (of the model's plane); just the identity without augmentation."""
        return transforms(self.model.dims, self.settings.tta)

    @property
    def augmented(self) -> bool:
        return self.settings.tta != "none"

    @property
    def augmentation(self) -> str:
        """The test-time augmentation and its cost, in words ("" without one)."""
        if not self.augmented:
            return ""
        names = [t.name for t in self.transforms]
        how = "each tiled from its own origin (exact)" if self.model.exact else "each tiled and blended"
        return (f"{len(names)} transforms ({', '.join(names)}) averaged in probability space, {how}: "
                f"{len(names)}× the forward passes of a plain run")

    def tta_read(self, block: Block) -> Box:
        """What a block reads under test-time augmentation: every transform's tiles, inside the image."""
        s = self.settings
        plane = read_box(self.model, self.plane(block.write), self.plane_shape, self.transforms, self.tile_size,
                         s.overlap, s.mirror)
        return self.stacked(block, plane)

    @property
    def prefetch(self) -> bool:
        """Read-ahead: by default on CUDA, where the GPU must not wait for the next block."""
        return self.settings.prefetch if self.settings.prefetch is not None else self.gpu

    @property
    def stitch_on_device(self) -> bool:
        """Whether a block stays on the model's device until encoded (``device_stitch``; by
        default where a torch model runs on a GPU), test-time transforms included."""
        if self.settings.device_stitch is not None:
            return self.settings.device_stitch
        return self.gpu and self.model.weights != "onnx"

    def normalise_on_device(self, dtype: np.dtype) -> bool:
        """Whether a block is read as it is stored and normalised on the device, after a
        quarter of the upload: with :attr:`stitch_on_device`, overtile's own normalisation
        and integer types that torch supports everywhere (uint16 stays on the host)."""
        return (self.stitch_on_device and isinstance(self.model.normalization, Normalization)
                and np.dtype(dtype) in DEVICE_NORMALISED)

    def blocks(self) -> list[Block]:
        grid = block_grid(self.spatial_shape, self.block_shape)
        return [block_at(i, self.spatial_shape, self.block_shape) for i in np.ndindex(*grid)]

    def read_block(self, block: Block) -> np.ndarray:
        """The block's input with its context (mirrored at the image border), normalised: what
        the tiles of :meth:`run_block` cut from. With read-ahead, a Dask task of its own,
        which may run on any worker (it needs no GPU)."""
        s = self.settings
        source = storage.cached_image(s.input, s.axes, self.fingerprint)
        if self.augmented:  # each transform mirrors what it needs from this box (tta.predict_region_tta)
            raw = source.read(self.tta_read(block))
        else:
            read = plan_tiles(self.model, self.plane(block.write), self.tile_size, s.overlap).read
            raw = read_mirrored(source.read, self.stacked(block, read), self.spatial_shape, s.mirror)  # slices: inside in z
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise InputError(f"{s.input}: NaN or Inf values near block {block.write}")
        return raw if self.normalise_on_device(raw.dtype) else self.model.normalization(raw)

    def run_block(self, block: Block, image: np.ndarray | None = None) -> dict[str, Any]:
        """Read the block and its context (unless read-ahead passed ``image``), run its tiles,
        write it, mark it done."""
        s = self.settings
        started = time.time()
        watch = blockwise.Stopwatch()
        with watch("load"):
            model = cached_model(self.model, self.device, s.channels_last)
            if self.device == "cuda":  # torch's cuDNN default (TensorFloat-32 convolutions) unless strict fp32
                torch.backends.cudnn.allow_tf32 = s.autocast != "fp32"
        plan = plan_tiles(self.model, self.plane(block.write), self.tile_size, s.overlap)
        if image is None:
            with watch("read"):
                image = self.read_block(block)
        runner, compiling, compile_note = run_tiles, 0.0, ""
        if self.compile:
            shape = (min(s.batch_size, len(plan.tiles)), image.shape[0], *plan.tiles[0].input.shape)
            runner, compiling, compile_note = compiled_runner(model, shape, AUTOCAST[s.autocast])
        autocast = AUTOCAST[s.autocast]

        def predict_plane(x: Any) -> Any:
            """The logits of the block's plane, or its augmented probabilities: of arrays or tensors alike."""
            if not self.augmented:
                return predict_region(model, plan, x, s.batch_size, autocast, runner=runner)
            held = self.plane(self.tta_read(block))
            return predict_region_tta(
                model, self.plane(block.write), self.plane_shape, lambda box: x[(slice(None), *box.relative_to(held))],
                self.transforms, self.tile_size, overlap=s.overlap, mirror=s.mirror,
                activation=lambda y: activate(y, self.model.activation), batch_size=s.batch_size,
                autocast=autocast, runner=runner)

        def predict(x: Any) -> Any:
            """The block's, slice by slice when the model is 2-D and the image a stack (x: C, Z, Y, X)."""
            if not self.sliced:
                return predict_plane(x)
            planes = [predict_plane(x[:, k]) for k in range(x.shape[1])]
            return torch.stack(planes, 1) if isinstance(x, torch.Tensor) else np.stack(planes, 1)

        activation = "none" if self.augmented else self.model.activation
        with watch("compute"):
            if self.stitch_on_device:  # an integer image comes as stored (normalise_on_device)
                result = on_device(model, image, lambda x: encode_output(predict(x), s.output_kind, self.output_dtype, activation),
                                   self.model.normalization if image.dtype.kind in "iu" else None)
            else:
                result = encode_output(predict(image), s.output_kind, self.output_dtype, activation)
        with watch("write"):
            array = storage.open_array(self.output_array)
            array[(Ellipsis, *block.write.slices())] = result if array.ndim == result.ndim else result[0]
            self.ledger.mark(block)
        slices = block.write.shape[0] if self.sliced else 1
        return {"block": block.key, "pixels": block.write.size, "tiles": len(plan.tiles) * len(self.transforms) * slices,
                "worker_pid": os.getpid(),
                "started": started, "finished": time.time(), "compile_s": compiling,
                **({"compile_note": compile_note} if compile_note else {}),
                **{f"{k}_s": v for k, v in watch.seconds.items()}}

    def before_blocks(self) -> None:
        unlist_levels(self.output)  # derived from level 0, which changes now

    def wants_finish(self, computing: int) -> bool:
        """Build the pyramid when blocks are computed now, or when an earlier run left none."""
        if not self.settings.pyramid or not level_shapes(self.output_shape, len(self.spatial_shape)):
            return False
        if computing:
            return True
        group = zarr.open_group(store=self.output, mode="r")
        return len(storage.ome_metadata(dict(group.attrs))["datasets"]) == 1

    def finish(self, client: Any) -> int:
        """Levels 1, 2, ... of the output (mean of probabilities, nearest labels), below the
        blocks that are finished; returns how many levels."""
        kind = "nearest" if self.settings.output_kind == "labels" else "mean"
        return build_pyramid(client, self.output, kind, present=self.ledger.done(), present_block=self.block_shape)


def precision(autocast: str, device: str) -> str:
    """The arithmetic a run's forward passes use, as the fingerprint keeps it: without autocast
    a GPU runs TF32 convolutions and a CPU float32, so a run resumed on the other device would
    mix them; on a CPU "none" and "fp32" are the same arithmetic."""
    if autocast in ("none", "fp32"):
        return "tf32" if device == "cuda" and autocast == "none" else "float32"
    return autocast


def plan_prediction(settings: PredictSettings, remote: bool = False) -> tuple[PredictJob, blockwise.Pending]:
    """Check the inputs, create or reopen the output, read the ledger, apply the tissue mask.

    Returns the job and what is pending. Every check that can fail on user input happens
    before the output is touched. ``remote``: the blocks run on a cluster elsewhere (also
    implied by a cluster of :func:`~pipeline.clusters.scheduler_setting`), so ``device="cuda"`` is not
    checked against this machine.
    """
    settings = blockwise.absolute_paths(settings, "input", "output", "model", "tissue_mask")
    if settings.tissue_threshold is not None and settings.tissue_mask:
        raise InputError("--tissue-threshold thresholds a computed tissue mask, not one given with --tissue-mask "
                         "(nonzero is tissue there)")
    if settings.tissue_threshold is not None and settings.tissue == "all" and not settings.tissue_mask:
        raise InputError("--tissue-threshold thresholds a computed tissue mask; add --tissue auto, saturation, "
                         "bright or dark")
    source = storage.open_image(settings.input, settings.axes)
    nd = len(source.spatial_shape)
    model = model_geometry(settings.model, nd, source.channels)
    sliced = model.dims == 2 and nd == 3  # a 2-D model over a stack: slice by slice
    if model.dims != nd and not sliced:
        raise InputError(f"{settings.model}: a {model.dims}-D model; {settings.input} has {nd} spatial axes ({source.spatial_axes})")
    if model.in_channels != source.channels:
        raise InputError(f"{settings.model}: the model expects {model.in_channels} input channel(s); {settings.input} has {source.channels}")
    try:
        augmentation = transforms(model.dims, settings.tta)
    except ValueError as exc:
        raise InputError(f"--tta: {exc}") from None
    if model.weights == "onnx" and settings.autocast != "none":
        raise InputError(f"--autocast {settings.autocast}: {settings.model} is an ONNX model, run in float32 by onnxruntime")
    remote = remote or bool(scheduler_setting(settings.scheduler))
    device = onnx_device(resolve_device(settings.device, remote=remote), settings, model, remote)
    # slice by slice: blocks one slice deep, of the 2-D edge
    block_shape = (1, *settings.block_shape(source.spatial_shape[1:])) if sliced else settings.block_shape(source.spatial_shape)
    g = model.geometry
    tile = settings.tile_size or (1212 if model.dims == 2 else g.min_input_size(4 * g.factor))
    try:
        plan_tiles(model, Box.from_shape((max(block_shape),) * model.dims), tile, settings.overlap)  # validates the tile size
        tile = g.max_input_size(tile)
    except ValueError as exc:
        raise InputError(f"--tile-size {settings.tile_size or tile}: {exc}") from None
    # what earlier versions applied (no probe for probabilities, no --activation): a run that applies it
    # keeps its old fingerprint, and resumes
    usual = model.activation if model.kind in ("overtile", "bioimageio") else models.logit_activation(model.num_classes)
    if settings.activation == "softmax" and model.num_classes == 1:
        raise InputError(f"--activation softmax: {settings.model} has one output channel, whose softmax is 1 "
                         f"everywhere; use sigmoid (logits) or none (probabilities)")
    if settings.activation != "auto":
        model = replace(model, activation=settings.activation, probabilities=False)
    if model.needs_statistics:  # the package's per-sample statistics, of the whole image (never per tile)
        model = model.with_statistics(statistics_sample(source))
    into_image = storage.label_parent(settings.input, settings.output)
    if into_image and settings.output_kind != "labels":
        raise InputError(f"{settings.output}: only labels go under an image's labels/ group (use --output labels)")
    channel_axis = not (into_image and "c" not in source.axes)  # an NGFF label image has its image's axes
    if settings.output_kind == "labels":
        out_shape, out_dtype = ((1,) if channel_axis else ()) + tuple(source.spatial_shape), "uint8"
    else:
        out_shape, out_dtype = (model.num_classes, *source.spatial_shape), settings.dtype
    if settings.output_kind == "labels" and model.num_classes > 255:
        raise InputError(f"{settings.model}: {model.num_classes} classes do not fit uint8 labels")
    if source.dtype.kind == "f":
        check_finite(source)
    existed = storage.check_output(settings.output, out_shape, out_dtype, settings.overwrite,
                                   reads=(settings.input, settings.tissue_mask, settings.model))
    mask = tissue_mask(source, settings.tissue, settings.tissue_threshold, settings.tissue_mask)
    run = blockwise.fingerprint(
        input=settings.input, stamp=storage.stamp(source), model=file_digest(settings.model),
        block=block_shape, tile=tile, kind=settings.output_kind, dtype=out_dtype,
        **({"sliced": True} if sliced else {}),  # (absent otherwise: earlier runs' outputs resume)
        overlap=settings.overlap if g.blend else None,  # exact tiling ignores it
        mirror=settings.mirror, precision=precision(settings.autocast, device),
        **({"tta": [t.name for t in augmentation]} if settings.tta != "none" else {}),
        **({"weights": model.weights} if model.kind == "bioimageio" else {}),  # a package runs one of its forms
        **({"activation": model.activation} if model.activation != usual else {}),
    )
    scale, translation = source.placement(channel=channel_axis)
    # slice by slice, z is laid out as channels are: a chunk holds the block's slice whole
    chunks, shards = settings.output_layout(out_shape, ((out_shape[0],) if channel_axis else ()) + tuple(block_shape),
                                            model.dims)
    storage.create_image(
        settings.output, out_shape, chunks, out_dtype, ("c" if channel_axis else "") + source.spatial_axes,
        name=settings.output_kind, scale=scale, translation=translation, units=source.units, overwrite=settings.overwrite, shards=shards,
        attrs={"overtile": {"input": settings.input, "model": str(settings.model), "output_kind": settings.output_kind,
                            "model_kind": models.KIND_NAMES[model.kind], "tiling": model.tiling}},
    )
    if into_image:
        storage.register_label(into_image, settings.output, max(2, model.num_classes))
    grid = block_grid(source.spatial_shape, block_shape)
    ledger = storage.Ledger.prepare(settings.output, grid, run, overwrite=settings.overwrite or not existed)
    done = ledger.done()
    context = (0, g.margin + 1, g.margin + 1) if sliced else g.margin + 1  # slices see no context in z
    wanted = np.ones(grid, bool) if mask is None else mask.blocks(source.spatial_shape, block_shape, context)
    blocks = [block_at(index, source.spatial_shape, block_shape) for index in np.argwhere(wanted & ~done)]
    tissue = "" if mask is None else (
        f"{mask.method}{'' if mask.threshold is None else f' {mask.relation} {mask.threshold:.3g}'} on {mask.source}: "
        f"{100 * mask.fraction:.2g}% tissue")
    compile = settings.compile
    if compile is None and device != "cuda":
        # on CPUs compiling bought 0-5% per tile in a plain process and nothing in a Dask worker
        # (bench/compile.py, RESULTS.md), and every other tile shape compiles again: a 400-block
        # stack of 128² blocks spent 66 s compiling in a 56 s run (2.4× the eager run's time)
        compile = False
    if compile is None:  # on when every task slot has enough blocks to pay for compiling
        if settings.workers:
            slots = settings.workers
        elif device == "cuda":  # a local cluster's GPU workers; a remote cluster's are unknown here
            slots = 1 if remote else blockwise.default_gpu_workers()
        else:
            slots = blockwise.default_workers()
        compile = int(wanted.sum()) >= COMPILE_BREAK_EVEN_BLOCKS * slots  # all wanted: a resumed run decides alike
    compile = compile and model.compilable  # TorchScript and ONNX models run as they are
    job = PredictJob(
        output=settings.output, ledger=ledger, fingerprint=run, settings=settings, model=model, device=device,
        spatial_shape=source.spatial_shape, block_shape=block_shape, tile_size=tile, output_shape=out_shape,
        output_dtype=out_dtype, tissue=tissue, tissue_fraction=1.0 if mask is None else mask.fraction,
        compile=compile,
    )
    return job, blockwise.Pending(blocks, int(done.sum()), int((~wanted & ~done).sum()))


def check_finite(source: storage.ImageSource) -> None:
    """Raise if a float image holds NaN or Inf anywhere (read chunk by chunk, not at once)."""
    import dask.array as da

    array = da.from_zarr(source.array)
    if bool((~da.isfinite(array)).any().compute(scheduler="threads")):
        raise InputError(f"{source.url}: NaN or Inf values in the image; clean them before prediction")


def compile_report(records: list[dict[str, Any]]) -> str:
    """What compiling cost, from the block records: per worker process, the first blocks pay."""
    notes = {r["compile_note"] for r in records if r.get("compile_note")}
    if notes:
        return "; ".join(sorted(notes))
    per_worker: dict[Any, float] = {}
    for r in records:
        per_worker[r.get("worker_pid")] = per_worker.get(r.get("worker_pid"), 0.0) + r.get("compile_s", 0.0)
    seconds = sorted(per_worker.values())
    return (f"torch.compile: {seconds[-1]:.1f} s in the slowest of {len(seconds)} worker process(es), "
            f"paid once per process and tile shape")


def encode_output(logits: np.ndarray | torch.Tensor, kind: str, dtype: str,
                  activation: str = "softmax") -> np.ndarray | torch.Tensor:
    """Model outputs ``(K, ...)`` to what is stored: probabilities in ``dtype`` or uint8 labels;
    a tensor is encoded by torch where it lies (a block kept on the GPU), equal within float
    rounding of the activation (tests/test_device_stitch.py).

    ``activation`` makes the outputs probabilities: ``softmax`` of logits (overtile's own
    models), ``sigmoid`` (one logit per class), or ``none`` (they already are). Labels are the
    argmax of several classes, or probability above 0.5 for one (for a sigmoid: its logit above
    0, which no device's rounding of exp moves).
    """
    if kind == "labels" and len(logits) > 1:  # every activation keeps the order of the classes
        return class_labels(logits)[None]
    tensor = isinstance(logits, torch.Tensor)

    def as_dtype(a: Any, name: str) -> Any:
        return a.to(getattr(torch, name)) if tensor else a.astype(name)

    if kind == "labels":
        return as_dtype(logits > 0 if activation == "sigmoid" else activate(logits, activation) > 0.5, "uint8")
    p = activate(logits, activation)
    if dtype == "uint8":  # torch.round, as np.rint: halves to even
        return as_dtype(torch.round(p.clamp(0, 1) * 255) if tensor else np.rint(np.clip(p, 0, 1) * 255), "uint8")
    return as_dtype(p, dtype)


def activate(logits: np.ndarray | torch.Tensor, activation: str) -> np.ndarray | torch.Tensor:
    """Model outputs ``(K, ...)`` as probabilities: ``softmax`` of logits (overtile's own
    models), ``sigmoid`` (one logit per class), or ``none`` (they already are). A tensor is
    activated by torch, where it lies."""
    tensor = isinstance(logits, torch.Tensor)
    if activation == "softmax":
        return torch.softmax(logits, 0) if tensor else softmax(logits)
    if activation == "sigmoid":
        return torch.sigmoid(logits) if tensor else 1.0 / (1.0 + np.exp(-logits))
    return logits


def onnx_device(device: str, settings: PredictSettings, model: models.ModelInfo, remote: bool) -> str:
    """An ONNX model runs where onnxruntime can: on CUDA only with its CUDA provider installed
    (``onnxruntime-gpu``); ``auto`` then falls back to the CPU."""
    if model.weights != "onnx" or device != "cuda" or remote:
        return device
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return device
    if settings.device == "cuda":
        raise InputError(f"--device cuda: {settings.model} is an ONNX model and this onnxruntime has no CUDA provider "
                         f"(install onnxruntime-gpu)")
    return "cpu"


def statistics_sample(source: storage.ImageSource, limit: int = 1 << 24) -> np.ndarray:
    """The image, or a regular subsample of at most about ``limit`` values, channel first: what
    a package's per-sample statistics (mean and std, percentiles) are taken from, once for the
    whole image. The coarsest stored level of at least 4096 px is read where there is one."""
    level, _ = source.overview(4096)
    array = level.to_dask()
    nd = array.ndim - 1
    stride = max(1, int(np.ceil((array.size / limit) ** (1 / nd))))
    return np.asarray(array[(slice(None), *(slice(None, None, stride),) * nd)].compute(scheduler="threads"))


def predict(
    settings: PredictSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[PredictJob, blockwise.Pending], None] | None = None,
    failures: list[str] | None = None,
) -> tuple[PredictJob, blockwise.RunSummary]:
    """Run overlap-tile prediction blockwise on Dask; the Python entry point behind the CLI.

    Parameters
    ----------
    settings : PredictSettings
    client : distributed.Client, optional
        Use this client; otherwise connect to ``settings.scheduler`` or start a LocalCluster.
    on_result : callable, optional
        Called with each finished block's record (progress).
    on_plan : callable, optional
        Called once with ``(job, pending)`` before the blocks start.
    failures : list, optional
        Try every block and collect the failed ones here (``"key: error"``) instead of
        stopping at the first.
    """
    return blockwise.execute(plan_prediction, settings, client, on_plan, on_result, failures)
