"""Training U-Nets as the paper does, from Zarr image and label arrays.

Read top to bottom, :func:`train` is the whole job: plan (check the inputs, build the model,
one pass over the labels for the class balance), then the loop: data → forward → loss → step
→ eval → checkpoint → log. The pieces it calls are defined before it, in that order:

- **data**: :class:`~pipeline.jobs.patches.PatchDataset` cuts random patches out of the Zarr arrays, lazily (one
  patch's region per read, never the whole volume). A patch is the model's valid *input*
  (``tile_size``); its labels and weights are cropped to the model's *output*. Where a patch's
  context runs outside the image (or into held-out slices) it is mirrored, as overlap-tile
  prediction does. Sample ``i`` is a pure function of ``(seed, i)``, so any number of loader
  workers, and a resumed run, see exactly the same patches.
- **augmentation** (the paper's): an elastic deformation (displacements drawn on a coarse
  3×3 grid with a standard deviation of 10 px, upsampled by cubic interpolation; image
  interpolated cubically, labels and weights by nearest neighbour), flips, 90° rotations and
  gray-value variation, each switchable.
- **loss**: pixel-wise softmax and cross-entropy weighted by the weight map of eq. 2
  (:func:`pipeline.numerics.weightmap.weight_map`, computed per patch from the instance labels unless a
  weight array is given), with class weights from one pass over all training labels.
- **averaged weights** (``ema``, off by default): an exponential moving average of the
  weights after every step, which validation, ``best.pt`` and the model in ``last.pt`` use:
  with batches of one patch the weights of any single step are noisy, the average is not.
- **checkpoints**: ``OUT/last.pt`` every ``checkpoint_every`` steps (model, optimiser, step,
  random states, settings; ``torch.load(weights_only=True)`` reads it) and ``OUT/best.pt``,
  the model with the lowest validation Rand error; both are ordinary model checkpoints that
  ``overtile predict --model`` takes.
- **validation**: the held-out slices predicted with the overlap-tile path
  (:func:`pipeline.numerics.tta.predict_region_tta`, with test-time augmentation when asked) and scored by :func:`pipeline.numerics.metrics.score_segmentation`;
  ``OUT/log.csv`` holds one row per step, ``OUT/curves.png`` the loss and validation curves.

Labels: ISBI-style masks (255 = cell, 0 = membrane), 0/1 masks, or instance labels
(0 = background). The loss's classes are background 0 and cell 1 (``label > 0``); the weight
map needs cells as instances, made by connected components when the labels are a mask.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs.blockwise import Axes
from pipeline.jobs.inference import AUTOCAST, resolve_device
from pipeline.jobs.patches import (
    DataStats,
    PatchDataset,
    PatchSpec,
    Region,
    data_stats,
    seed_loader_worker,
    split_regions,
)
from pipeline.numerics.geometry import Box
from pipeline.numerics.metrics import score_segmentation
from pipeline.numerics.tta import predict_region_tta, transforms
from pipeline.numerics.unet import (
    Normalization,
    UNet,
    atomic_save,
    checkpoint_payload,
    model_from_payload,
    read_checkpoint,
)
from pipeline.numerics.weightmap import balanced_class_weights

logger = logging.getLogger("overtile")

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
LOG_FIELDS = ("step", "loss", "lr", "seconds", "pixel_error", "rand_error", "rand_error_raw", "iou", "threshold")


# --- settings ------------------------------------------------------------------------------


# Default least tile edge for validation in 2-D: one tile covers a 512² slice with the paper's
# net (700 = 516 + 2·92), and any tile gives the same scores (valid nets tile exactly).
VAL_TILE_2D = 700

class TrainSettings(BaseModel):
    """Everything a training run needs; shared by the CLI, the Python API and the flows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    images: str = Field(description="Training image: a Zarr array or an OME-Zarr image (path or URL)")
    labels: str = Field(description="Labels of the same spatial shape: a mask (255 or 1 = cell, 0 = background/membrane) or instance labels")
    weights: str | None = Field(None, description="Precomputed weight maps (float, same spatial shape); default: computed per patch from the labels")
    out: str = Field(description="Directory for last.pt, best.pt, log.csv and curves.png")
    axes: Axes = Field(None, description="Axes of a plain image array, e.g. yx, cyx, zyx, czyx")
    labels_axes: Axes = Field(None, description="Axes of a plain labels array (default: the image's without c)")
    val_slices: tuple[int, ...] = Field((), description="Indices along z of a stack held out for validation (e.g. ISBI slices 20-24)")
    test_slices: tuple[int, ...] = Field((), description="Indices along z never trained on nor validated on: kept for "
                                         "'overtile score --slices' once training is done (e.g. ISBI slices 20-24 with "
                                         "--val-slices 15-19); training never looks at them")
    labels_kind: Literal["auto", "mask", "instances"] = Field("auto", description="auto: a mask when the labels hold at most two values, else instances")
    foreground_bias: float = Field(0.0, ge=0.0, le=1.0, description="Probability of centring a patch on a labelled region (sparse data)")
    # run
    steps: int = Field(1000, ge=1, description="Optimiser steps (one batch each)")
    batch_size: int = Field(1, ge=1, description="Patches per step (1 in the paper: large tiles instead)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="SGD with momentum (the paper's) or Adam")
    lr: float | None = Field(None, gt=0, description="Learning rate (default 0.01 for SGD, 0.001 for Adam)")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD momentum (0.99 in the paper)")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 penalty on the weights (AdamW-style for Adam)")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="constant, or cosine decay to 0 at the "
                                                       "last step (at the end of --time-limit when one is given)")
    # model
    dims: Literal[2, 3] | None = Field(None, description="2-D or 3-D U-Net (default: the image's spatial axes)")
    depth: int = Field(5, ge=1, description="Resolution levels (5 in the paper: 4 poolings)")
    base_channels: int = Field(64, ge=1, description="Channels at the first level (64 in the paper)")
    padding: Literal["valid", "same"] = Field("valid", description="valid (the paper's: unpadded convolutions, exact overlap-tile) or same")
    batch_norm: bool = Field(False, description="Batch normalisation after each convolution")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout at the end of the contracting path")
    tile_size: int = Field(572, ge=4, description="Patch edge = the model's input, snapped down to a valid size; labels are cropped to its output")
    normalize: Literal["scale", "standardize"] = Field("scale", description="scale: integers divided by their dtype's max; standardize: then mean/std of the training data")
    # loss
    w0: float = Field(10.0, ge=0.0, description="Height of the weight map's border term (10 in the paper)")
    sigma: float = Field(5.0, gt=0.0, description="Width of the border term, in the labels' physical units (pixels if they have none; about 5 px in the paper), as in 'overtile weights'")
    class_balance: bool = Field(True, description="Balance background and cell by their frequency in the training labels")
    # augmentation
    elastic: bool = Field(True, description="Random elastic deformation (the paper's most important augmentation)")
    elastic_sigma: float = Field(10.0, ge=0.0, description="Std of the coarse-grid displacements in px")
    elastic_grid: int = Field(3, ge=2, description="Control points per axis of the displacement grid")
    flips: bool = Field(True, description="Random flips of each spatial axis")
    rotations: bool = Field(True, description="Random 90° rotations in the y-x plane")
    gray: bool = Field(True, description="Random contrast, brightness and gamma")
    mirror: Literal["reflect", "symmetric"] = Field("reflect", description="Mirroring at the image border, in numpy's words")
    # validation and checkpoints
    val_every: int = Field(100, ge=1, description="Validate every this many steps (and at the end)")
    val_tile_size: int | None = Field(None, ge=4, description="Tile input edge for validation (default: tile_size, and "
                                         f"in 2-D at least {VAL_TILE_2D}; the scores do not depend on it: tiles are exact)")
    val_tta: str = Field("none", description="Test-time augmentation of the validation: none, all (the 8 flips and "
                         "rotations in 2-D, the 8 flips in 3-D), or a comma-separated subset (identity,flip_x,rot90)")
    checkpoint_every: int = Field(100, ge=1, description="Write OUT/last.pt every this many steps (and at the end)")
    ema: float = Field(0.0, ge=0.0, lt=1.0, description="Decay of an exponential moving average of the weights, "
                       "updated every step (e.g. 0.995: about the last 200 steps; 0: none); validation, best.pt and "
                       "the model in last.pt are the average")
    # execution
    seed: int = Field(0, ge=0, description="Seed of the model's initialisation and of every patch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model trains")
    autocast: Literal["none", "bf16", "fp16"] = Field("fp16", description="Mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format (about 2× faster on CPU)")
    loader_workers: int = Field(0, ge=0, description="Data-loader worker processes that cut patches (0: in the training process)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")
    time_limit: float | None = Field(None, gt=0, description="Training time budget in seconds, over the run and its "
                                     "resumptions: stop (validate, checkpoint) when the next step would not fit; a "
                                     "cosine schedule then follows the budget, not the steps, and anneals fully")
    resume: bool = Field(False, description="Continue from OUT/last.pt")
    overwrite: bool = Field(False, description="Start over even if OUT holds a run")

    @field_validator("val_slices", "test_slices")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(z < 0 for z in v):
            raise ValueError("slice indices must be >= 0")
        return tuple(sorted(set(v)))


# --- loss ----------------------------------------------------------------------------------


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The paper's energy, negated and averaged: ``-mean_x w(x) log softmax(logits)_{ℓ(x)}(x)``.

    ``logits (N, K, *spatial)``, ``target (N, *spatial)`` int64 classes, ``weight (N, *spatial)``.
    """
    return (weight * F.cross_entropy(logits.float(), target, reduction="none")).mean()


def learning_rate(base: float, schedule: str, step: int, steps: int, progress: float | None = None) -> float:
    """The rate for ``step`` (1-based): a pure function of the step, so resuming needs no
    state; or, with a time budget, of ``progress`` (the share of the budget spent when this
    step ends, 0 to 1), so that a time-limited run anneals fully whatever its speed."""
    if schedule == "cosine":
        done = (step - 1) / steps if progress is None else min(1.0, max(0.0, progress))
        return base * 0.5 * (1.0 + math.cos(math.pi * done))
    return base


class Budget:
    """A training time budget in seconds, over every run of a training (a resumed run has
    what its earlier runs left). A step's share of it is estimated from the steps timed so
    far (a moving average), so the schedule knows where the budget will be when the step ends,
    and the loop stops when the next step would not fit: a time-limited cosine run ends at
    a rate near 0, then validates and writes its checkpoints."""

    def __init__(self, seconds: float | None):
        self.seconds, self.step_time, self.steps = seconds, None, 0

    def progress(self, spent: float) -> float | None:
        """The share of the budget spent when a step started now (at ``spent``) ends."""
        if self.seconds is None:
            return None
        return (spent + (self.step_time or 0.0)) / self.seconds

    def timed(self, seconds: float) -> None:
        """A step took ``seconds``; the first of a run (warming up: allocations, the loader)
        is not one to go by."""
        self.steps += 1
        if self.steps > 1:
            self.step_time = seconds if self.step_time is None else 0.8 * self.step_time + 0.2 * seconds

    def exhausted(self, spent: float) -> bool:
        """Whether another step would end past the budget."""
        return self.seconds is not None and spent + (self.step_time or 0.0) >= self.seconds


# --- checkpoints ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and strings (``weights_only``-loadable)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps(np_state),
        "python": json.dumps(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.array(np_state["state"]["key"], np.uint32)
    np.random.set_state(np_state)
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def make_optimizer(params: Iterable[torch.Tensor], s: TrainSettings, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (L2 penalty in the gradient, as the paper's Caffe solver) or Adam with
    decoupled weight decay (AdamW, Loshchilov & Hutter 2019: an L2 term added to Adam's gradient
    is rescaled with it, so the weights with large gradients are barely decayed)."""
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=s.weight_decay, decoupled_weight_decay=True)


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The update of :class:`~torch.optim.swa_utils.AveragedModel` for an exponential moving
    average: ``avg += (1 - d) (w - avg)`` with ``d = min(decay, (1 + n) / (10 + n))`` after
    ``n`` updates, so the first steps' weights (far from trained) fade quickly instead of
    weighing ``decay**n``; integer buffers (batch-norm counters) take the model's value."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = float(updates)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def averaged(model: UNet, decay: float) -> AveragedModel | None:
    """The moving average of ``model``'s weights and buffers (batch-norm statistics), or None."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)


def save_checkpoint(path: Path, model: UNet, training: dict[str, Any]) -> None:
    """A model checkpoint (``overtile predict`` reads it) plus the state to resume training."""
    atomic_save({**checkpoint_payload(model), "training": training}, path)


def read_training_checkpoint(path: Path, settings: TrainSettings, model: UNet) -> dict[str, Any]:
    """Read ``last.pt`` and check that these settings can continue it; the payload or InputError."""
    payload = read_checkpoint(path)
    training = payload.get("training")
    if not isinstance(training, dict) or not {"step", "optimizer", "rng"} <= set(training):
        raise InputError(f"{path}: a model checkpoint without training state; cannot resume from it")
    ours = asdict(model.config)
    theirs = payload.get("config")
    if not isinstance(theirs, dict) or theirs != ours:
        diff = ", ".join(f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items()
                         if isinstance(theirs, dict) and theirs.get(k) != v) or "no model config"
        raise InputError(f"{path}: incompatible with these settings ({diff})")
    was = training.get("settings", {}).get("optimizer")
    if was != settings.optimizer:
        raise InputError(f"{path}: trained with optimizer {was!r}; --optimizer {settings.optimizer} cannot continue it")
    return payload


def restore(payload: dict[str, Any], path: Path, model: UNet, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, ema: AveragedModel | None) -> None:
    """Load model, optimiser, scaler, averaged weights and generators from a checked training
    checkpoint. With an average, the checkpoint's model is the average and the trained weights
    are in ``training["weights"]``; an average asked for anew starts from the weights."""
    training = payload["training"]
    try:
        model.load_state_dict(training.get("weights", payload["state_dict"]))
        if ema is not None and "ema_updates" in training:
            ema.module.load_state_dict(payload["state_dict"])
            ema.n_averaged.fill_(int(training["ema_updates"]))
        optimizer.load_state_dict(training["optimizer"])
        if training.get("scaler"):
            scaler.load_state_dict(training["scaler"])
        set_rng_state(training["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: incompatible checkpoint ({str(exc).splitlines()[0]})") from None


# --- validation, log and curves ------------------------------------------------------------


def validate(model: UNet, images: storage.ImageSource, labels: storage.ImageSource, regions: Sequence[Region],
             tile_size: int, mirror: str, tta: str = "none", mask: bool | None = None) -> dict[str, float]:
    """Predict the held-out regions with the overlap-tile path (averaged over the ``tta``
    transforms, each tiled from its own origin) and score them (slice by slice)."""
    model.eval()
    chosen = transforms(model.dims, tta)
    probabilities, truths = [], []
    for region in regions:
        whole = Box.from_shape(region.shape)
        image = model.normalization(region.read(images, whole))
        probability = predict_region_tta(model, whole, whole.shape, lambda box: image[(slice(None), *box.slices())],
                                         chosen, tile_size, mirror=mirror)[1]
        truth = region.read(labels, whole)[0]
        probabilities.append(probability if region.dims == 3 else probability[None])
        truths.append(truth if region.dims == 3 else truth[None])
    model.train()
    # a mask's cells are its components; instance labels keep their ids (touching cells stay two).
    # ``mask``: what training took the labels for (--labels-kind); else the scores tell by the values
    truth = np.concatenate(truths)
    return score_segmentation(np.concatenate(probabilities), truth > 0 if mask else truth).as_dict()


class TrainingLog:
    """``OUT/log.csv``, one row per step; a resumed run drops the rows after its checkpoint."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if start and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= start]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, LOG_FIELDS)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k, "") for k in LOG_FIELDS}
        self.rows.append(row)
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_curves(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """A PNG of the training loss (and its running mean) and the validation scores by step."""
    from matplotlib.figure import Figure

    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
    if len(loss) >= 10:
        k = max(5, len(loss) // 50)
        left.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), label=f"mean of {k}")
    left.set(xlabel="step", ylabel="weighted cross-entropy", title="training loss")
    if loss.size and loss.min() > 0:
        left.set_yscale("log")
    left.legend()
    val = [r for r in rows if str(r.get("rand_error", "")) != ""]
    right.set(xlabel="step", title="validation (held-out slices)")
    if val:
        for key, name in (("rand_error", "Rand error"), ("rand_error_raw", "Rand error, not grown"), ("pixel_error", "pixel error")):
            right.plot([int(r["step"]) for r in val], [float(r[key]) for r in val], "o-", ms=3, label=name)
        right.legend()
    else:
        right.text(0.5, 0.5, "no validation slices", ha="center", va="center", transform=right.transAxes)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    tmp.replace(path)


# --- planning: inputs checked once, model built --------------------------------------------


@dataclass
class TrainJob:
    """A planned run: checked inputs, the model, the patch spec and where things go."""

    settings: TrainSettings
    device: str
    lr: float
    model: UNet
    spec: PatchSpec
    val_regions: tuple[Region, ...]
    val_tile_size: int
    out: Path
    images: storage.ImageSource
    labels: storage.ImageSource
    resume_payload: dict[str, Any] | None = None

    @property
    def start(self) -> int:
        return int(self.resume_payload["training"]["step"]) if self.resume_payload else 0

    @property
    def warnings(self) -> list[str]:
        """What the user should know before the run: settings that will likely teach nothing."""
        found = []
        s = self.settings
        dtype = np.dtype(self.images.dtype)
        if s.normalize == "scale" and dtype.kind in "ui" and not self.resume_payload:
            high = image_maximum(self.images)
            if high <= 0.01 * np.iinfo(dtype).max:
                found.append(f"{s.images}: {dtype} values reach {high} of {np.iinfo(dtype).max}: scaled by the dtype's "
                             f"maximum the net sees inputs of at most {high / np.iinfo(dtype).max:.2g} and may learn "
                             f"nothing; pass --normalize standardize")
        return found


def image_maximum(images: storage.ImageSource, per_axis: int = 4) -> int:
    """The largest value of an image, from at most ``per_axis`` stored chunks along each
    spatial axis, spread over it (a dim image's range shows in any of them; a strided read
    would still fetch every chunk of a large remote image)."""
    array = images.to_dask()
    steps = (1,) + tuple(max(1, -(-n // per_axis)) for n in array.numblocks[1:])
    sample = array.blocks[tuple(slice(None, None, s) for s in steps)]
    return int(sample.max().compute(scheduler="threads"))


def _open(url: str, axes: str | None, fallback: str | None) -> storage.ImageSource:
    """Open with the axes given, or else try the image's axes (labels usually share them)."""
    if axes is not None or fallback is None:
        return storage.open_image(url, axes)
    try:
        return storage.open_image(url, None)
    except InputError:
        return storage.open_image(url, fallback)


def _overtile_attrs(url: str) -> dict[str, Any]:
    """The ``overtile`` attributes of the group at ``url`` ({} when it has none or is no group)."""
    import zarr

    try:
        return dict(zarr.open_group(store=url, mode="r").attrs.get("overtile", {}))
    except Exception:  # noqa: BLE001 - a plain array, or not Zarr: nothing said about its making
        return {}


def plan_training(settings: TrainSettings) -> TrainJob:
    """Check every input once, build the model, read the class balance; nothing is written."""
    s = settings
    images = storage.open_image(storage.absolute(s.images), s.axes)
    plain = "".join(a for a in images.axes if a in "zyx")
    labels = _open(storage.absolute(s.labels), s.labels_axes, plain)
    weights = _open(storage.absolute(s.weights), s.labels_axes, plain) if s.weights else None
    for source, what in ((labels, "labels"), (weights, "weights")):
        if source is None:
            continue
        if source.spatial_shape != images.spatial_shape:
            raise InputError(f"{source.url}: {what} of spatial shape {source.spatial_shape}; the image has {images.spatial_shape}")
        if source.channels != 1:
            raise InputError(f"{source.url}: {what} with {source.channels} channels; expected one")
    if labels.dtype.kind not in "ui":
        raise InputError(f"{labels.url}: {labels.dtype} labels; expected integers (0 = background, cells > 0)")

    nd = len(images.spatial_shape)
    dims = s.dims or nd
    if dims > nd:
        raise InputError(f"--dims {dims}: {images.url} has only {nd} spatial axes ({images.spatial_axes})")
    if weights is not None:  # the map is what it is: options of the per-patch map would be silently dropped
        fields = TrainSettings.model_fields
        changed = [f"--{name.replace('_', '-')}" for name in ("w0", "sigma") if getattr(s, name) != fields[name].default]
        changed += ["--no-class-balance"] if not s.class_balance else []
        if changed:
            raise InputError(f"--weights {s.weights}: its map has its own w0, sigma and class weights; "
                             f"{', '.join(changed)} apply to maps computed per patch (leave out --weights)")
        if dims < nd and "class_weights" in _overtile_attrs(weights.url):  # made by overtile weights over zyx
            raise InputError(f"--weights {s.weights}: a {nd}-D map (distances across slices) for a {dims}-D model; "
                             f"leave out --weights to compute the map per slice")
        if dims < nd:
            logger.warning("--weights %s: used as it is by a %d-D model; its distances must be per slice", s.weights, dims)
    held = tuple(sorted(set(s.val_slices) | set(s.test_slices)))
    for flag, chosen in (("--val-slices", s.val_slices), ("--test-slices", s.test_slices)):
        if chosen and nd != 3:
            raise InputError(f"{flag}: {images.url} is 2-D; held-out slices need a z axis")
        if chosen and chosen[-1] >= images.spatial_shape[0]:
            raise InputError(f"{flag} {chosen[-1]}: {images.url} has {images.spatial_shape[0]} slices (0-{images.spatial_shape[0] - 1})")
    if set(s.val_slices) & set(s.test_slices):
        raise InputError(f"--val-slices and --test-slices share {sorted(set(s.val_slices) & set(s.test_slices))}: a "
                         f"slice scored at the end must not choose the checkpoint")
    if held and len(held) == images.spatial_shape[0]:
        raise InputError("--val-slices / --test-slices: every slice is held out; nothing is left to train on")
    try:
        transforms(dims, s.val_tta)
    except ValueError as exc:
        raise InputError(f"--val-tta: {exc}") from None
    train_regions, _ = split_regions(images.spatial_shape, dims, held)  # the test slices: neither trained on
    _, val_regions = split_regions(images.spatial_shape, dims, s.val_slices)  # nor validated on

    torch.manual_seed(s.seed)  # He initialisation, reproducibly
    model = UNet(images.channels, 2, dims, s.depth, s.base_channels, s.padding, s.batch_norm, s.dropout)
    try:
        tile = model.max_input_size(s.tile_size)
    except ValueError as exc:
        raise InputError(f"--tile-size: {exc}") from None
    g = model.geometry
    tiled = g.min_input_size(g.factor + g.remainder)  # the smallest tile that steps on the pooling grid
    if s.val_tile_size is not None and s.val_tile_size < tiled:
        raise InputError(f"--val-tile-size {s.val_tile_size}: too small for this model; the smallest is {tiled}")
    # small patches train fast, but a tile that small validates slowly (a 204 px tile yields 20 px)
    val_tile = model.max_input_size(s.val_tile_size or max(s.tile_size, tiled, VAL_TILE_2D if dims == 2 else 0))

    out = Path(storage.absolute(s.out))
    last = out / "last.pt"
    payload = None
    if s.resume and last.exists():
        payload = read_training_checkpoint(last, s, model)
    elif last.exists() and not s.overwrite:
        raise InputError(f"{out}: holds a training run (last.pt); pass --resume to continue it or --overwrite to start over")

    data_keys = ("images", "labels", "axes", "labels_axes", "val_slices", "test_slices", "dims", "labels_kind", "normalize", "tile_size")
    old = payload["training"].get("settings", {}) if payload else {}
    if payload and "stats" in payload["training"] and all(old.get(k) == v for k, v in s.model_dump(mode="json", include=set(data_keys)).items()):
        stats = DataStats.from_dict(payload["training"]["stats"])  # the same data: no second pass
    else:
        cell = max(1, model.output_size(tile) // 2)
        stats = data_stats(images, labels, train_regions, cell, s.normalize == "standardize", s.labels_kind)
    if payload:
        model = model_from_payload(payload, last)  # normalisation as it was trained
    else:
        model.normalization = Normalization(stats.mean, stats.std, scale_integers=True)
    class_weights = balanced_class_weights(stats.counts) if s.class_balance else (1.0, 1.0)

    spec = PatchSpec(
        images=images.url, images_axes=images.axes, labels=labels.url, labels_axes=labels.axes,
        weights=weights.url if weights else None, weights_axes=weights.axes if weights else None,
        regions=tuple(train_regions), dims=dims, input_size=tile, margin=model.margin, seed=s.seed,
        length=s.steps * s.batch_size, stats=stats, normalization=model.normalization,
        class_weights=class_weights, w0=s.w0, sigma=s.sigma, foreground_bias=s.foreground_bias,
        spacing=tuple(labels.scale.get(a, 1.0) for a in labels.spatial_axes)[-dims:],
        elastic=s.elastic and s.elastic_sigma > 0, elastic_sigma=s.elastic_sigma, elastic_grid=s.elastic_grid,
        flips=s.flips, rotations=s.rotations, gray=s.gray, mirror=s.mirror,
    )
    return TrainJob(s, resolve_device(s.device), s.lr or DEFAULT_LR[s.optimizer], model, spec,
                    tuple(val_regions), val_tile, out, images, labels, payload)


# --- the training loop ---------------------------------------------------------------------


@dataclass
class TrainSummary:
    start: int  # the step this run started after (0 for a fresh run)
    step: int  # the last step done
    seconds: float  # this run's wall time
    loss: float | None  # the last step's loss
    best_step: int | None
    best: dict[str, float] = field(default_factory=dict)  # validation scores of best.pt
    out: Path = Path(".")


def train(
    settings: TrainSettings,
    on_start: Callable[[TrainJob], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    job: TrainJob | None = None,
) -> TrainSummary:
    """Train a U-Net; the Python entry point behind ``overtile train``.

    Parameters
    ----------
    settings : TrainSettings
    on_start : callable, optional
        Called once with the planned :class:`TrainJob` before the first step.
    on_step : callable, optional
        Called after every step with its log row (``step``, ``loss``, ``lr``, ``seconds`` and,
        on validation steps, the scores).
    job : TrainJob, optional
        The job :func:`plan_training` made of ``settings`` (a flow plans in a stage of its
        own); planned here otherwise. Its model is trained in place: plan anew to train again.
    """
    s = settings
    job = job or plan_training(s)  # every check before anything is written
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(job.device)
    model = job.model.to(device)
    fmt = torch.contiguous_format
    if s.channels_last:
        fmt = torch.channels_last if model.dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    optimizer = make_optimizer(model.parameters(), s, job.lr)
    amp = AUTOCAST[s.autocast] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    ema = averaged(model, s.ema)
    served = ema.module if ema is not None else model  # what is validated and saved as the model

    # resume: model, optimiser, scaler, average and generators exactly as after step `start`
    start, elapsed, best = 0, 0.0, {}
    if job.resume_payload:
        restore(job.resume_payload, job.out / "last.pt", model, optimizer, scaler, ema)
        start = job.start
        earlier = job.resume_payload["training"]
        elapsed = float(earlier.get("seconds", 0.0))
        best = dict(earlier.get("best", {}))
        if s.time_limit is not None and (elapsed >= s.time_limit or (
                earlier.get("budget_spent") and earlier.get("settings", {}).get("time_limit") == s.time_limit)):
            logger.info("training: the %g s budget was spent at step %d; nothing to resume (a larger "
                        "--time-limit goes on)", s.time_limit, start)
            return TrainSummary(start, start, 0.0, None, best.get("step"),
                                {k: v for k, v in best.items() if k != "step"}, job.out)
    job.out.mkdir(parents=True, exist_ok=True)
    if s.overwrite and not job.resume_payload:  # starting over: an old run's checkpoints must not outlive it
        for name in ("last.pt", "best.pt"):
            (job.out / name).unlink(missing_ok=True)
    log = TrainingLog(job.out / "log.csv", start)
    if on_start is not None:
        on_start(job)

    def training_state(step: int, seconds: float, budget_spent: bool = False) -> dict[str, Any]:
        state = {"step": step, "seconds": seconds, "budget_spent": budget_spent, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(), "settings": s.model_dump(mode="json"),
                 "best": best, "stats": job.spec.stats.as_dict()}
        if ema is not None:
            state["weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            state["ema_updates"] = int(ema.n_averaged)
        return state

    # data: the samples of steps start+1 .. steps, in order; each a function of (seed, index)
    loader = DataLoader(
        PatchDataset(job.spec), batch_size=s.batch_size, sampler=range(start * s.batch_size, s.steps * s.batch_size),
        num_workers=s.loader_workers, worker_init_fn=seed_loader_worker, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(s.seed),  # the loader never draws from the global generator
        persistent_workers=False,
    )
    clock = time.perf_counter()
    step, loss_value = start, None
    budget = Budget(s.time_limit)
    model.train()
    try:
        for step, (image, target, weight) in enumerate(loader, start=start + 1):
            began = time.perf_counter()
            # forward
            image = image.to(device, non_blocking=True).contiguous(memory_format=fmt)
            target, weight = target.to(device, non_blocking=True), weight.to(device, non_blocking=True)
            lr = learning_rate(job.lr, s.lr_schedule, step, s.steps, budget.progress(elapsed + began - clock))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(image)
            # loss
            loss = weighted_cross_entropy(logits, target, weight)
            # step
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            loss_value = float(loss.item())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"step {step}: the loss is {loss_value}; lower --lr (now {lr:g})")
            budget.timed(time.perf_counter() - began)
            seconds = elapsed + time.perf_counter() - clock
            spent = budget.exhausted(seconds)
            final = step == s.steps or spent
            row: dict[str, Any] = {"step": step, "loss": loss_value, "lr": lr, "seconds": round(seconds, 3)}
            # eval
            if job.val_regions and (step % s.val_every == 0 or final):
                scores = validate(served, job.images, job.labels, job.val_regions, job.val_tile_size, s.mirror,
                                  s.val_tta, job.spec.stats.mask)
                row.update(scores)
                if not best or scores["rand_error"] < best["rand_error"]:
                    best = {"step": step, **scores}
                    save_checkpoint(job.out / "best.pt", served, {"step": step, "scores": scores})
            # checkpoint
            if step % s.checkpoint_every == 0 or final:
                if not job.val_regions:  # nothing to choose by: the best model is the latest
                    best = {"step": step}
                    save_checkpoint(job.out / "best.pt", served, {"step": step, "scores": {}})
                save_checkpoint(job.out / "last.pt", served, training_state(step, seconds, spent))
            log.write(row)
            if "rand_error" in row or final:
                write_curves(job.out / "curves.png", log.rows)
            if on_step is not None:
                on_step(row)
            if final:
                break
    finally:
        log.close()
    return TrainSummary(start, step, time.perf_counter() - clock, loss_value, best.get("step"),
                        {k: v for k, v in best.items() if k != "step"}, job.out)
