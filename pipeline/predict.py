"""Blockwise overlap-tile inference from Zarr to Zarr.

:func:`plan_prediction` checks every input once and turns :class:`PredictSettings` into a
:class:`PredictJob` (geometry resolved, output created, ledger read); :func:`predict_block`
is the Dask task, run once per block in a worker process; :func:`predict` runs the whole
thing on a Dask cluster. The settings model is the one the CLI and the Prefect flows use.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import execute, storage
from pipeline.errors import InputError
from pipeline.geometry import Block, Box, block_at, block_grid
from pipeline.pyramid import build_pyramid, level_shapes
from pipeline.tissue import TissueMethod, tissue_mask
from pipeline.tiling import plan_tiles, predict_region, read_mirrored, softmax
from pipeline.unet import UNet, model_from_payload, read_checkpoint

OutputKind = Literal["probabilities", "labels"]
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PredictSettings(BaseModel):
    """Everything a prediction run needs; shared by the CLI, the Python API and the flows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Input image: a Zarr array or an OME-Zarr image (path or URL)")
    output: str = Field(description="Output OME-Zarr image to write (path or URL)")
    model: str = Field(description="U-Net checkpoint file written by overtile")
    axes: str | None = Field(None, description="Axes of a plain Zarr array, e.g. yx, cyx, zyx, czyx, yxc")
    block_size: int | None = Field(None, ge=16, description="Block edge in pixels: the unit of distributed work and the output chunk (default 2048 in 2D, 256 in 3D)")
    tile_size: int | None = Field(None, ge=8, description="Largest tile input edge for one forward pass (default 1212 in 2D)")
    overlap: float = Field(0.5, ge=0.0, lt=1.0, description="Same-padding models only: fraction of a tile shared with its neighbour (blended)")
    batch_size: int = Field(1, ge=1, description="Tiles per forward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs")
    workers: int | None = Field(None, ge=1, description="Worker processes of the local Dask cluster (default: one per core, or per GPU)")
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    output_kind: OutputKind = Field("probabilities", description="Softmax probabilities per class, or the argmax labels (uint8)")
    dtype: Literal["float32", "float16", "uint8"] = Field("float32", description="Probability dtype; uint8 stores round(255·p)")
    mirror: Literal["reflect", "symmetric"] = Field("reflect", description="Mirroring at the image border, in numpy's words")
    autocast: Literal["none", "bf16", "fp16"] = Field("none", description="Mixed precision (changes the numbers slightly)")
    channels_last: bool = Field(True, description="channels_last memory format (same numbers, about 2× faster on CPU)")
    tissue: TissueMethod = Field("all", description="Which blocks to compute: all, or those with tissue in a low-resolution mask: "
                                 "saturation (Otsu on HSV saturation; brightfield H&E), bright / dark (Otsu on intensity; "
                                 "fluorescence / brightfield), auto (saturation for RGB, else bright)")
    tissue_threshold: float | None = Field(None, description="A fixed threshold on the tissue feature instead of Otsu's "
                                           "(saturation 0-1; intensity in the image's units)")
    tissue_mask: str | None = Field(None, description="A mask image (any resolution, nonzero = tissue) choosing the blocks to compute")
    prefetch: bool | None = Field(None, description="Read each block in a Dask task of its own, so that the next block is "
                                  "read while this one computes (default: on CUDA)")
    pyramid: bool = Field(True, description="Also write downsampled levels (mean of probabilities, nearest labels) to the multiscales")
    overwrite: bool = Field(False, description="Replace an existing output instead of resuming it")

    @field_validator("axes")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v


def resolve_device(device: str, remote: bool = False) -> str:
    """``auto`` becomes ``cuda`` where this process sees a GPU. With ``remote`` (the blocks run
    on another cluster, whose workers may have GPUs this planning machine lacks) ``cuda`` is
    taken on trust: the blocks then wait for workers offering the ``GPU`` resource."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not remote and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (and no --scheduler of a GPU cluster given)")
    return device


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class PredictJob:
    """A planned run: what every block task needs, small enough to send with each task."""

    settings: PredictSettings
    device: str
    spatial_shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    tile_size: int
    output_shape: tuple[int, ...]
    output_dtype: str
    output_array: str
    ledger: execute.Ledger
    fingerprint: str
    background: int = 0  # blocks without tissue: not computed, left at the fill value
    tissue: str = ""  # how the tissue mask was made, for the summary ("" without one)

    @property
    def name(self) -> str:
        """Prefix of the run's Dask keys: one per output, so two runs with the same settings
        into different outputs on a shared scheduler never share a task."""
        return f"predict-{hashlib.sha256((self.fingerprint + self.settings.output).encode()).hexdigest()[:12]}"


def plan_prediction(settings: PredictSettings, remote: bool = False) -> tuple[PredictJob, list[Block], int]:
    """Check the inputs, create or reopen the output, read the ledger.

    Returns the job, the blocks still to do and the number already finished. Every check
    that can fail on user input happens before the output is touched. ``remote``: the blocks
    run on a cluster elsewhere (also implied by ``scheduler`` or Dask's ``scheduler-address``),
    so ``device="cuda"`` is not checked against this machine.
    """
    settings = settings.model_copy(update={k: storage.absolute(getattr(settings, k)) for k in ("input", "output", "model")})
    source = storage.open_image(settings.input, settings.axes)
    payload = read_checkpoint(settings.model)
    model = model_from_payload(payload, settings.model)
    cfg = model.config
    nd = len(source.spatial_shape)
    if cfg.dims != nd:
        raise InputError(f"{settings.model}: a {cfg.dims}-D model; {settings.input} has {nd} spatial axes ({source.spatial_axes})")
    if cfg.in_channels != source.channels:
        raise InputError(f"{settings.model}: the model expects {cfg.in_channels} input channel(s); {settings.input} has {source.channels}")
    import dask

    remote = remote or bool(settings.scheduler or dask.config.get("scheduler-address", None))
    device = resolve_device(settings.device, remote=remote)
    block = settings.block_size or (2048 if nd == 2 else 256)
    tile = settings.tile_size or (1212 if nd == 2 else model.min_input_size(4 * model.factor))
    try:
        plan_tiles(model, Box.from_shape((block,) * nd), tile, settings.overlap)  # validates the tile size
        tile = model.max_input_size(tile)
    except ValueError as exc:
        raise InputError(f"--tile-size {settings.tile_size or tile}: {exc}") from None
    block_shape = tuple(min(block, n) for n in source.spatial_shape)
    into_image = storage.label_parent(settings.input, settings.output)
    if into_image and settings.output_kind != "labels":
        raise InputError(f"{settings.output}: only labels go under an image's labels/ group (use --output labels)")
    channel_axis = not (into_image and "c" not in source.axes)  # an NGFF label image has its image's axes
    if settings.output_kind == "labels":
        out_shape, out_dtype = ((1,) if channel_axis else ()) + tuple(source.spatial_shape), "uint8"
    else:
        out_shape, out_dtype = (cfg.num_classes, *source.spatial_shape), settings.dtype
    if settings.output_kind == "labels" and cfg.num_classes > 255:
        raise InputError(f"{settings.model}: {cfg.num_classes} classes do not fit uint8 labels")
    if source.dtype.kind == "f":
        check_finite(source)
    existed = storage.check_output(settings.output, out_shape, out_dtype, settings.overwrite)
    mask = tissue_mask(source, settings.tissue, settings.tissue_threshold,
                       storage.absolute(settings.tissue_mask) if settings.tissue_mask else None)
    fingerprint = hashlib.sha256(json.dumps({
        "input": settings.input, "axes": source.axes, "model": file_digest(settings.model),
        "block": block_shape, "tile": tile, "kind": settings.output_kind, "dtype": out_dtype,
        "overlap": settings.overlap if cfg.padding == "same" else None,  # valid nets ignore it
        "mirror": settings.mirror, "autocast": settings.autocast,
    }, sort_keys=True).encode()).hexdigest()

    scale = ([1.0] if channel_axis else []) + [source.scale.get(a, 1.0) for a in source.spatial_axes]
    storage.create_image(
        settings.output, out_shape, ((out_shape[0],) if channel_axis else ()) + tuple(block_shape), out_dtype,
        ("c" if channel_axis else "") + source.spatial_axes,
        name=settings.output_kind, scale=scale, units=source.units, overwrite=settings.overwrite,
        attrs={"overtile": {"input": settings.input, "model": str(settings.model), "output_kind": settings.output_kind}},
    )
    if into_image:
        storage.register_label(into_image, settings.output, cfg.num_classes)
    grid = block_grid(source.spatial_shape, block_shape)
    ledger = execute.Ledger.prepare(settings.output, grid, fingerprint, overwrite=settings.overwrite or not existed)
    done = ledger.done()
    wanted = np.ones(grid, bool) if mask is None else mask.blocks(source.spatial_shape, block_shape, model.margin + 1)
    todo = wanted & ~done
    blocks = [block_at(index, source.spatial_shape, block_shape) for index in np.argwhere(todo)]
    tissue = "" if mask is None else (
        f"{mask.method}{'' if mask.threshold is None else f' > {mask.threshold:.3g}'} on {mask.source}: "
        f"{100 * mask.fraction:.2g}% tissue")
    job = PredictJob(
        settings=settings, device=device, spatial_shape=source.spatial_shape,
        block_shape=block_shape, tile_size=tile, output_shape=out_shape, output_dtype=out_dtype,
        output_array=f"{settings.output.rstrip('/')}/0", ledger=ledger, fingerprint=fingerprint,
        background=int((~wanted & ~done).sum()), tissue=tissue,
    )
    return job, blocks, int(done.sum())


def check_finite(source: storage.ImageSource) -> None:
    """Raise if a float image holds NaN or Inf anywhere (read chunk by chunk, not at once)."""
    import dask.array as da

    array = da.from_zarr(source.array)
    if bool((~da.isfinite(array)).any().compute(scheduler="threads")):
        raise InputError(f"{source.url}: NaN or Inf values in the image; clean them before prediction")


# --- worker side ------------------------------------------------------------------------

_MODELS: dict[tuple[Any, ...], UNet] = {}


def cached_model(path: str, device: str, channels_last: bool) -> UNet:
    """The model, loaded once per worker process and kept (keyed by file, device, format).

    On CPU every forward pass runs on one thread: convolution results depend (in the last
    bit) on torch's thread count, so parallelism comes from Dask task slots instead, which
    keeps the output bit-identical whatever the cluster layout. Two one-thread streams are
    also faster than one two-thread stream on these CPUs.
    """
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, device, channels_last)
    model = _MODELS.get(key)
    if model is None:
        if device == "cpu":
            torch.set_num_threads(1)
        model = model_from_payload(read_checkpoint(path), path).eval().to(device)
        if channels_last:
            fmt = torch.channels_last if model.dims == 2 else torch.channels_last_3d
            model = model.to(memory_format=fmt)
        _MODELS.clear()  # one model per process: a new checkpoint replaces the old one
        _MODELS[key] = model
    return model


_GEOMETRY: dict[tuple[Any, ...], UNet] = {}


def model_geometry(path: str) -> UNet:
    """The model on the CPU, for its size arithmetic and normalisation only: what a read task
    needs, which may run on a worker without a GPU (its weights are never used there)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _GEOMETRY:
        _GEOMETRY.clear()
        _GEOMETRY[key] = model_from_payload(read_checkpoint(path), path)
    return _GEOMETRY[key]


def read_block(block: Block, job: PredictJob) -> np.ndarray:
    """The block's input with its context (mirrored at the image border), normalised: what
    the tiles of :func:`predict_block` cut from. A Dask task of its own with ``prefetch``,
    which may run on any worker (it needs no GPU)."""
    s = job.settings
    source = execute.open_source(s.input, s.axes)
    model = model_geometry(s.model)
    plan = plan_tiles(model, block.write, job.tile_size, s.overlap)
    raw = read_mirrored(source.read, plan.read, job.spatial_shape, s.mirror)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise InputError(f"{s.input}: NaN or Inf values near block {block.write}")
    return model.normalization(raw)


def predict_block(block: Block, job: PredictJob, image: np.ndarray | None = None) -> dict[str, Any]:
    """The Dask task: read the block and its context (unless a prefetch task passed ``image``),
    run its tiles, write it, mark it done."""
    s = job.settings
    watch = execute.Stopwatch()
    with watch("load"):
        model = cached_model(s.model, job.device, s.channels_last)
    plan = plan_tiles(model, block.write, job.tile_size, s.overlap)
    if image is None:
        with watch("read"):
            image = read_block(block, job)
    with watch("compute"):
        logits = predict_region(model, plan, image, s.batch_size, AUTOCAST[s.autocast])
        result = encode_output(logits, s.output_kind, job.output_dtype)
    with watch("write"):
        array = execute.open_array(job.output_array)
        array[(Ellipsis, *block.write.slices())] = result if array.ndim == result.ndim else result[0]
        job.ledger.mark(block)
    return {"block": block.key, "pixels": block.write.size, "tiles": len(plan.tiles),
            "worker_pid": os.getpid(), **{f"{k}_s": v for k, v in watch.seconds.items()}}


def run_job_blocks(client: Any, job: PredictJob, blocks: list[Block],
                   on_result: Callable[[dict[str, Any]], None] | None = None,
                   failures: list[str] | None = None) -> list[dict[str, Any]]:
    """The job's blocks on Dask: CUDA blocks ask for the ``GPU`` resource, and with prefetch
    (default on CUDA) each block's reading is a task of its own that runs while the previous
    block computes (it needs no GPU), its result staying on the worker."""
    gpu = job.device == "cuda"
    prefetch = job.settings.prefetch if job.settings.prefetch is not None else gpu
    return execute.run_blocks(client, predict_block, blocks, job, name=job.name, resources={"GPU": 1} if gpu else None,
                              on_result=on_result, failures=failures, prefetch=read_block if prefetch else None)


def encode_output(logits: np.ndarray, kind: str, dtype: str) -> np.ndarray:
    """Logits ``(K, ...)`` to what is stored: probabilities in ``dtype`` or uint8 argmax labels."""
    if kind == "labels":
        return logits.argmax(axis=0).astype(np.uint8)[None]
    p = softmax(logits)
    if dtype == "uint8":
        return np.rint(p * 255).astype(np.uint8)
    return p.astype(dtype)


def predict(
    settings: PredictSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[PredictJob, int, int], None] | None = None,
) -> tuple[PredictJob, execute.RunSummary]:
    """Run overlap-tile prediction blockwise on Dask; the Python entry point behind the CLI.

    Parameters
    ----------
    settings : PredictSettings
    client : distributed.Client, optional
        Use this client; otherwise connect to ``settings.scheduler`` or start a LocalCluster.
    on_result : callable, optional
        Called with each finished block's record (progress).
    on_plan : callable, optional
        Called once with ``(job, blocks_to_do, blocks_skipped)`` before the blocks start.
    """
    start = time.perf_counter()
    job, blocks, skipped = plan_prediction(settings)  # every check before a cluster starts
    if on_plan is not None:
        on_plan(job, len(blocks), skipped)
    records: list[dict[str, Any]] = []
    pyramid = wants_pyramid(job, len(blocks))
    if blocks or pyramid:  # a finished output needs no cluster
        with execute.client_or_cluster(client, settings.scheduler, settings.workers, job.device == "cuda") as client:
            records = run_job_blocks(client, job, blocks, on_result)
            if pyramid:
                write_pyramid(client, job)
    summary = execute.RunSummary(total=len(blocks) + skipped + job.background, skipped=skipped, records=records,
                                 seconds=time.perf_counter() - start, background=job.background)
    return job, summary


def wants_pyramid(job: PredictJob, computing: int) -> bool:
    """Build the pyramid when blocks are computed now, or when an earlier run left none."""
    if not job.settings.pyramid or not level_shapes(job.output_shape, len(job.spatial_shape)):
        return False
    if computing:
        return True
    group = zarr.open_group(store=job.settings.output, mode="r")
    return len(storage.ome_metadata(dict(group.attrs))["datasets"]) == 1


def write_pyramid(client: Any, job: PredictJob) -> int:
    """Levels 1, 2, ... of the output (mean of probabilities, nearest labels), below the
    blocks that are finished; returns how many levels."""
    kind = "nearest" if job.settings.output_kind == "labels" else "mean"
    return build_pyramid(client, job.settings.output, kind, present=job.ledger.done())
