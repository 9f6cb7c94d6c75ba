"""Training U-Nets as the paper does, from Zarr image and label arrays.

Read top to bottom, :func:`train` is the whole job: plan (check the inputs, build the model,
one pass over the labels for the class balance), then the loop: data → forward → loss → step
→ eval → checkpoint → log. The pieces it calls are defined before it, in that order:

- **data**: :class:`PatchDataset` cuts random patches out of the Zarr arrays, lazily (one
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
  (:func:`pipeline.weights.weight_map`, computed per patch from the instance labels unless a
  weight array is given), with class weights from one pass over all training labels.
- **checkpoints**: ``OUT/last.pt`` every ``checkpoint_every`` steps (model, optimiser, step,
  random states, settings; ``torch.load(weights_only=True)`` reads it) and ``OUT/best.pt``,
  the model with the lowest validation Rand error; both are ordinary model checkpoints that
  ``overtile predict --model`` takes.
- **validation**: the held-out slices predicted with the overlap-tile path
  (:func:`pipeline.tiling.overlap_tile`) and scored by :func:`pipeline.metrics.score_segmentation`;
  ``OUT/log.csv`` holds one row per step, ``OUT/curves.png`` the loss and validation curves.

Labels: ISBI-style masks (255 = cell, 0 = membrane), 0/1 masks, or instance labels
(0 = background). The loss's classes are background 0 and cell 1 (``label > 0``); the weight
map needs cells as instances, made by connected components when the labels are a mask.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from pipeline import storage
from pipeline.errors import InputError
from pipeline.geometry import Box, iter_blocks
from pipeline.metrics import score_segmentation
from pipeline.predict import resolve_device
from pipeline.tiling import overlap_tile, read_mirrored, softmax
from pipeline.unet import (
    Normalization,
    UNet,
    atomic_save,
    checkpoint_payload,
    model_from_payload,
    read_checkpoint,
)
from pipeline.weights import balanced_class_weights, weight_map

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG_FIELDS = ("step", "loss", "lr", "seconds", "pixel_error", "rand_error", "rand_error_raw", "iou", "threshold")


# --- settings ------------------------------------------------------------------------------


class TrainSettings(BaseModel):
    """Everything a training run needs; shared by the CLI, the Python API and the flows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # data
    images: str = Field(description="Training image: a Zarr array or an OME-Zarr image (path or URL)")
    labels: str = Field(description="Labels of the same spatial shape: a mask (255 or 1 = cell, 0 = background/membrane) or instance labels")
    weights: str | None = Field(None, description="Precomputed weight maps (float, same spatial shape); default: computed per patch from the labels")
    out: str = Field(description="Directory for last.pt, best.pt, log.csv and curves.png")
    axes: str | None = Field(None, description="Axes of a plain image array, e.g. yx, cyx, zyx, czyx")
    labels_axes: str | None = Field(None, description="Axes of a plain labels array (default: the image's without c)")
    val_slices: tuple[int, ...] = Field((), description="Indices along z of a stack held out for validation (e.g. ISBI slices 20-24)")
    labels_kind: Literal["auto", "mask", "instances"] = Field("auto", description="auto: a mask when the labels hold at most two values, else instances")
    foreground_bias: float = Field(0.0, ge=0.0, le=1.0, description="Probability of centring a patch on a labelled region (sparse data)")
    # run
    steps: int = Field(1000, ge=1, description="Optimiser steps (one batch each)")
    batch_size: int = Field(1, ge=1, description="Patches per step (1 in the paper: large tiles instead)")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="SGD with momentum (the paper's) or Adam")
    lr: float | None = Field(None, gt=0, description="Learning rate (default 0.01 for SGD, 0.001 for Adam)")
    momentum: float = Field(0.99, ge=0.0, lt=1.0, description="SGD momentum (0.99 in the paper)")
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="constant, or cosine decay to 0 at the last step")
    # model
    dims: Literal[2, 3] | None = Field(None, description="2-D or 3-D U-Net (default: the image's spatial axes)")
    depth: int = Field(5, ge=1, description="Resolution levels (5 in the paper: 4 poolings)")
    base_channels: int = Field(64, ge=1, description="Channels at the first level (64 in the paper)")
    padding: Literal["valid", "same"] = "valid"
    batch_norm: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout at the end of the contracting path")
    tile_size: int = Field(572, ge=4, description="Patch edge = the model's input, snapped down to a valid size; labels are cropped to its output")
    normalize: Literal["scale", "standardize"] = Field("scale", description="scale: integers divided by their dtype's max; standardize: then mean/std of the training data")
    # loss
    w0: float = Field(10.0, ge=0.0, description="Height of the weight map's border term (10 in the paper)")
    sigma: float = Field(5.0, gt=0.0, description="Width of the border term in px (about 5 in the paper)")
    class_balance: bool = Field(True, description="Balance background and cell by their frequency in the training labels")
    # augmentation
    elastic: bool = Field(True, description="Random elastic deformation (the paper's most important augmentation)")
    elastic_sigma: float = Field(10.0, ge=0.0, description="Std of the coarse-grid displacements in px")
    elastic_grid: int = Field(3, ge=2, description="Control points per axis of the displacement grid")
    flips: bool = True
    rotations: bool = Field(True, description="Random 90° rotations in the y-x plane")
    gray: bool = Field(True, description="Random contrast, brightness and gamma")
    mirror: Literal["reflect", "symmetric"] = Field("reflect", description="Mirroring at the image border, in numpy's words")
    # validation and checkpoints
    val_every: int = Field(100, ge=1, description="Validate every this many steps (and at the end)")
    val_tile_size: int | None = Field(None, ge=4, description="Tile input edge for validation (default: tile_size)")
    checkpoint_every: int = Field(100, ge=1, description="Write OUT/last.pt every this many steps (and at the end)")
    # execution
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = Field("fp16", description="Mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format (about 2× faster on CPU)")
    num_workers: int = Field(0, ge=0, description="Data-loader worker processes")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")
    time_limit: float | None = Field(None, gt=0, description="Stop (validate, checkpoint) after this many seconds")
    resume: bool = Field(False, description="Continue from OUT/last.pt")
    overwrite: bool = Field(False, description="Start over even if OUT holds a run")

    @field_validator("axes", "labels_axes")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @field_validator("val_slices")
    @classmethod
    def _sorted(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(z < 0 for z in v):
            raise ValueError("slice indices must be >= 0")
        return tuple(sorted(set(v)))


# --- regions: where patches come from -----------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A part of the image that the model sees as a whole image: the full image, one z-slice
    of a stack (2-D model) or a run of consecutive slices (3-D model).

    ``box`` is in the image's spatial coordinates; the model sees its last ``dims`` axes, of
    ``shape``. Reads are in region coordinates, so mirroring stops at the region's edge and
    training never sees a held-out slice.
    """

    box: Box
    dims: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.box.shape[-self.dims :]

    def read(self, source: storage.ImageSource, inner: Box) -> np.ndarray:
        """``(C, *inner.shape)`` for a box inside ``[0, shape)``."""
        lead = self.box.ndim - self.dims
        full = Box(
            self.box.offset[:lead] + tuple(o + a for o, a in zip(inner.offset, self.box.offset[lead:])),
            self.box.shape[:lead] + inner.shape,
        )
        data = source.read(full)
        return data.reshape(data.shape[0], *inner.shape)

    def read_mirrored(self, source: storage.ImageSource, box: Box, mode: str) -> np.ndarray:
        return read_mirrored(lambda inner: self.read(source, inner), box, self.shape, mode)


def split_regions(spatial_shape: Sequence[int], dims: int, val_slices: Sequence[int]) -> tuple[list[Region], list[Region]]:
    """Training and validation regions of an image; ``val_slices`` index its first (z) axis.

    Examples
    --------
    >>> train, val = split_regions((5, 64, 64), 3, [3])
    >>> [r.box.shape for r in train], [r.box.shape for r in val]
    ([(3, 64, 64), (1, 64, 64)], [(1, 64, 64)])
    """
    spatial_shape = tuple(spatial_shape)
    if len(spatial_shape) == 2:
        return [Region(Box.from_shape(spatial_shape), 2)], []
    depth, plane = spatial_shape[0], spatial_shape[1:]
    held = set(val_slices)
    if dims == 2:
        def slab(z0: int, z1: int) -> list[Region]:
            return [Region(Box((z, 0, 0), (1, *plane)), 2) for z in range(z0, z1)]
    else:
        def slab(z0: int, z1: int) -> list[Region]:
            return [Region(Box((z0, 0, 0), (z1 - z0, *plane)), 3)]
    train: list[Region] = []
    val: list[Region] = []
    start = 0
    for z in range(depth + 1):  # runs of consecutive slices of the same kind
        if z == depth or (z in held) != (start in held):
            (val if start in held else train).extend(slab(start, z))
            start = z
    return train, val


# --- data statistics: one pass over the training labels ------------------------------------


@dataclass(frozen=True)
class DataStats:
    """What one pass over the training regions learns, kept in the checkpoint.

    ``counts``: (background, cell) pixels; ``mask``: the labels hold at most two values (a
    mask, cells made by connected components) rather than instances; ``foreground``: the
    cells of a ``cell``-pixel grid that hold labelled pixels, one row ``(region, *offset)``
    each, for foreground-biased sampling; ``mean`` and ``std`` of the scaled image (only
    with ``normalize="standardize"``).
    """

    counts: tuple[int, int]
    mask: bool
    cell: int
    foreground: np.ndarray = field(compare=False, repr=False)
    mean: float = 0.0
    std: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "mask": self.mask, "cell": self.cell,
                "foreground": torch.from_numpy(self.foreground), "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataStats:
        return cls((int(d["counts"][0]), int(d["counts"][1])), bool(d["mask"]), int(d["cell"]),
                   np.asarray(d["foreground"], np.int64), float(d["mean"]), float(d["std"]))


def data_stats(images: storage.ImageSource, labels: storage.ImageSource, regions: Sequence[Region],
               cell: int, standardize: bool = False, labels_kind: str = "auto") -> DataStats:
    """Read the training regions once, block by block: class counts, label kind, the grid
    cells (``cell`` px) that hold labelled pixels, and the image's mean and std if asked."""
    scale = Normalization()
    counts = np.zeros(2, np.int64)
    values: set[int] = set()
    foreground = []
    total, total_sq, n = 0.0, 0.0, 0
    for r, region in enumerate(regions):
        block = cell * max(1, (1024 if region.dims == 2 else 128) // cell)  # a whole number of cells
        for b in iter_blocks(region.shape, (block,) * region.dims):
            lab = region.read(labels, b.write)[0]
            fg = lab != 0
            count = int(np.count_nonzero(fg))
            counts += (lab.size - count, count)
            if count:
                for axis, size in enumerate(fg.shape):  # any() per grid cell
                    fg = np.logical_or.reduceat(fg, np.arange(0, size, cell), axis=axis)
                cells = np.argwhere(fg) * cell + np.array(b.write.offset)
                foreground.append(np.column_stack([np.full(len(cells), r), cells]))
            if len(values) <= 2:
                values |= set(np.unique(lab).tolist())
            if standardize:
                img = scale(region.read(images, b.write)).astype(np.float64)
                total, total_sq, n = total + img.sum(), total_sq + (img * img).sum(), n + img.size
    mask = len(values) <= 2 if labels_kind == "auto" else labels_kind == "mask"
    mean, std = 0.0, 1.0
    if standardize and n:
        mean = float(total / n)  # plain floats: numpy scalars would not load with weights_only
        std = float(math.sqrt(max(total_sq / n - mean * mean, 0.0))) or 1.0
    dims = regions[0].dims if regions else 2
    rows = np.concatenate(foreground) if foreground else np.zeros((0, 1 + dims), np.int64)
    return DataStats((int(counts[0]), int(counts[1])), mask, cell, rows.astype(np.int64), mean, std)


# --- augmentation (pure functions of an array and a random generator) ----------------------


def elastic_field(shape: Sequence[int], rng: np.random.Generator, sigma: float = 10.0, grid: int = 3,
                  limit: float | None = None) -> np.ndarray:
    """Per-pixel displacements ``(ndim, *shape)``, float64, of the paper's elastic deformation.

    Displacement vectors are drawn on a coarse ``grid``×``grid`` (×``grid``) lattice spanning
    the patch, each component from N(0, ``sigma``) px, and upsampled to every pixel by cubic
    spline interpolation (bicubic in 2-D). ``limit`` clips them, so a caller that reads
    ``limit`` extra pixels per side always has data under the displaced pixels.
    """
    shape = tuple(int(n) for n in shape)
    coarse = rng.normal(0.0, sigma, size=(len(shape),) + (grid,) * len(shape))
    field = np.stack([ndimage.zoom(c, [n / grid for n in shape], order=3, mode="mirror") for c in coarse])
    if limit is not None:
        np.clip(field, -limit, limit, out=field)
    return field


def deform(array: np.ndarray, field: np.ndarray, order: int, offset: Sequence[int] | int = 0) -> np.ndarray:
    """Sample ``array`` at ``x + offset + field(x)`` for every pixel ``x`` of the field.

    The result has the field's shape and ``array``'s dtype. ``order`` 3 (cubic) or 1 for
    images, 0 (nearest neighbour) for labels and weights, so labels stay labels. ``offset``
    places the field inside a larger ``array`` (the margin read for the displacement).
    """
    ndim = field.shape[0]
    offset = (offset,) * ndim if isinstance(offset, (int, np.integer)) else tuple(offset)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) + o for n, o in zip(field.shape[1:], offset)), indexing="ij")
    coords = np.stack(grid) + field
    return ndimage.map_coordinates(array, coords, order=order, mode="mirror", output=array.dtype, prefilter=order > 1)


def flip_rotate(arrays: Sequence[np.ndarray], rng: np.random.Generator, dims: int, flips: bool,
                rotations: bool) -> list[np.ndarray]:
    """The same random flips (each spatial axis, p = ½) and 90° rotation (y-x plane) of every
    array; arrays share their last ``dims`` axes (an image may lead with channels)."""
    turns = int(rng.integers(4)) if rotations else 0
    flipped = [a for a in range(dims) if rng.random() < 0.5] if flips else []
    out = []
    for array in arrays:
        lead = array.ndim - dims
        if flipped:
            array = np.flip(array, [lead + a for a in flipped])
        if turns:
            array = np.rot90(array, turns, axes=(array.ndim - 2, array.ndim - 1))
        out.append(np.ascontiguousarray(array))
    return out


def gray_values(image: np.ndarray, rng: np.random.Generator, gamma: bool = True) -> np.ndarray:
    """Random gray-value variation: gamma in [0.7, 1.43] (only for an image scaled to [0, 1]),
    contrast in [0.8, 1.25] about the patch mean, brightness ±0.1 of the patch's spread."""
    g = math.exp(rng.uniform(math.log(0.7), -math.log(0.7)))
    contrast = rng.uniform(0.8, 1.25)
    brightness = rng.uniform(-0.1, 0.1)
    if gamma:
        image = np.clip(image, 0.0, 1.0) ** np.float32(g)
        spread = 1.0
    else:
        spread = float(image.std()) or 1.0
    mean = float(image.mean())
    return ((image - mean) * contrast + mean + brightness * spread).astype(np.float32)


# --- the patch dataset ---------------------------------------------------------------------


@dataclass(frozen=True)
class PatchSpec:
    """Everything a data-loader worker needs to make any patch; small and picklable."""

    images: str
    images_axes: str
    labels: str
    labels_axes: str
    weights: str | None
    weights_axes: str | None
    regions: tuple[Region, ...]
    dims: int
    input_size: int  # the model's valid input (the patch)
    margin: int  # context per side: labels and weights are cropped by it
    seed: int
    length: int  # samples in all (steps × batch size)
    stats: DataStats
    normalization: Normalization
    class_weights: tuple[float, float]
    w0: float = 10.0
    sigma: float = 5.0
    foreground_bias: float = 0.0
    elastic: bool = True
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    flips: bool = True
    rotations: bool = True
    gray: bool = True
    mirror: str = "reflect"

    @property
    def output_size(self) -> int:
        return self.input_size - 2 * self.margin

    @property
    def pad(self) -> int:
        """Extra pixels read per side so that the displaced patch still lies on real data."""
        return math.ceil(3 * self.elastic_sigma) if self.elastic and self.elastic_sigma > 0 else 0


class PatchDataset(Dataset):
    """Training patches read lazily from Zarr; sample ``i`` depends only on ``(seed, i)``.

    Each item is ``(image (C, *input), classes (*output) int64, weights (*output) float32)``.
    Sources are opened on first use in each process, so the dataset can go to loader workers.
    """

    def __init__(self, spec: PatchSpec):
        self.spec = spec
        self._sources: tuple[Any, Any, Any] | None = None
        sizes = np.array([math.prod(r.shape) for r in spec.regions], np.float64)
        self._region_p = sizes / sizes.sum()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_sources": None}

    def __len__(self) -> int:
        return self.spec.length

    def sources(self) -> tuple[Any, Any, Any]:
        if self._sources is None:
            s = self.spec
            self._sources = (storage.open_image(s.images, s.images_axes), storage.open_image(s.labels, s.labels_axes),
                             storage.open_image(s.weights, s.weights_axes) if s.weights else None)
        return self._sources

    def sample_box(self, rng: np.random.Generator) -> tuple[Region, Box]:
        """Where a patch's output lies: uniform over the training regions or, with probability
        ``foreground_bias``, around a grid cell that holds labels (the cell is half the
        output's size, so the output holds the whole cell)."""
        s = self.spec
        out = s.output_size
        fg = s.stats.foreground
        if rng.random() < s.foreground_bias and len(fg):
            r, *offset = (int(v) for v in fg[int(rng.integers(len(fg)))])
            region = s.regions[r]
            centre = [int(rng.integers(o, min(o + s.stats.cell, n))) for o, n in zip(offset, region.shape)]
            start = [min(max(c - out // 2, 0), n - out) if n >= out else (n - out) // 2
                     for c, n in zip(centre, region.shape)]
        else:
            region = s.regions[int(rng.choice(len(s.regions), p=self._region_p))]
            # a region smaller than the output is centred, its labels mirrored like its image
            start = [int(rng.integers(0, n - out + 1)) if n >= out else (n - out) // 2 for n in region.shape]
        return region, Box(tuple(start), (out,) * s.dims)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.spec
        rng = np.random.default_rng([s.seed, int(index)])
        images, labels, weights = self.sources()
        region, out_box = self.sample_box(rng)
        in_box = out_box.grow(s.margin)
        read_box = in_box.grow(s.pad)

        image = Normalization(scale_integers=s.normalization.scale_integers)(
            region.read_mirrored(images, read_box, s.mirror))
        label = region.read_mirrored(labels, read_box, s.mirror)[0]
        weight = region.read_mirrored(weights, read_box, s.mirror)[0].astype(np.float32) if weights else None

        if s.elastic:  # one field for all, over the input patch; labels are later cropped from it
            field = elastic_field(in_box.shape, rng, s.elastic_sigma, s.elastic_grid, limit=s.pad)
            image = np.stack([deform(c, field, 3, s.pad) for c in image])
            label = deform(label, field, 0, s.pad)
            weight = deform(weight, field, 0, s.pad) if weight is not None else None
        parts = flip_rotate([image, label] + ([weight] if weight is not None else []), rng, s.dims, s.flips, s.rotations)
        image, label = parts[0], parts[1]
        weight = parts[2] if weight is not None else None
        if s.gray:
            image = gray_values(image, rng, gamma=s.normalization.scale_integers and np.issubdtype(images.dtype, np.integer))
        image = _standardize(image, s.normalization)

        cells = label > 0
        if weight is None:  # eq. 2 on the whole input patch, so distances see the context
            instances = ndimage.label(cells)[0] if s.stats.mask else label
            weight = weight_map(instances, s.w0, s.sigma, class_weights=s.class_weights)
        crop = (slice(s.margin, s.margin + s.output_size),) * s.dims
        return (torch.from_numpy(np.ascontiguousarray(image, np.float32)),
                torch.from_numpy(cells[crop].astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(weight[crop], np.float32)))


def _standardize(image: np.ndarray, norm: Normalization) -> np.ndarray:
    """The mean/std part of :class:`Normalization`, in the same float32 arithmetic."""
    if norm.mean != 0.0:
        image = image - np.float32(norm.mean)
    if norm.std != 1.0:
        image = image * np.float32(1.0 / norm.std)
    return image.astype(np.float32, copy=False)


def _worker_init(worker_id: int) -> None:
    """Loader workers: one torch thread each, and their own seeded global generators."""
    torch.set_num_threads(1)
    seed = torch.utils.data.get_worker_info().seed
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- loss ----------------------------------------------------------------------------------


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The paper's energy, negated and averaged: ``-mean_x w(x) log softmax(logits)_{ℓ(x)}(x)``.

    ``logits (N, K, *spatial)``, ``target (N, *spatial)`` int64 classes, ``weight (N, *spatial)``.
    """
    return (weight * F.cross_entropy(logits.float(), target, reduction="none")).mean()


def learning_rate(base: float, schedule: str, step: int, steps: int) -> float:
    """The rate for ``step`` (1-based); a pure function of the step, so resuming needs no state."""
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
    return base


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
            scaler: torch.amp.GradScaler) -> None:
    """Load model, optimiser, scaler and generators from a checked training checkpoint."""
    training = payload["training"]
    try:
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(training["optimizer"])
        if training.get("scaler"):
            scaler.load_state_dict(training["scaler"])
        set_rng_state(training["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: incompatible checkpoint ({str(exc).splitlines()[0]})") from None


# --- validation, log and curves ------------------------------------------------------------


def validate(model: UNet, images: storage.ImageSource, labels: storage.ImageSource, regions: Sequence[Region],
             tile_size: int, mirror: str) -> dict[str, float]:
    """Predict the held-out regions with the overlap-tile path and score them (slice by slice)."""
    model.eval()
    probabilities, truths = [], []
    for region in regions:
        whole = Box.from_shape(region.shape)
        image = model.normalization(region.read(images, whole))
        probability = softmax(overlap_tile(model, image, tile_size=tile_size, mirror=mirror))[1]
        truth = region.read(labels, whole)[0] > 0
        probabilities.append(probability if region.dims == 3 else probability[None])
        truths.append(truth if region.dims == 3 else truth[None])
    model.train()
    return score_segmentation(np.concatenate(probabilities), np.concatenate(truths)).as_dict()


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


def _open(url: str, axes: str | None, fallback: str | None) -> storage.ImageSource:
    """Open with the axes given, or else try the image's axes (labels usually share them)."""
    if axes is not None or fallback is None:
        return storage.open_image(url, axes)
    try:
        return storage.open_image(url, None)
    except InputError:
        return storage.open_image(url, fallback)


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
    if s.val_slices:
        if nd != 3:
            raise InputError(f"--val-slices: {images.url} is 2-D; held-out slices need a z axis")
        if s.val_slices[-1] >= images.spatial_shape[0]:
            raise InputError(f"--val-slices {s.val_slices[-1]}: {images.url} has {images.spatial_shape[0]} slices (0-{images.spatial_shape[0] - 1})")
        if len(s.val_slices) == images.spatial_shape[0]:
            raise InputError("--val-slices: every slice is held out; nothing is left to train on")
    train_regions, val_regions = split_regions(images.spatial_shape, dims, s.val_slices)

    torch.manual_seed(s.seed)  # He initialisation, reproducibly
    model = UNet(images.channels, 2, dims, s.depth, s.base_channels, s.padding, s.batch_norm, s.dropout)
    try:
        tile = model.max_input_size(s.tile_size)
        val_tile = model.max_input_size(s.val_tile_size or s.tile_size)
    except ValueError as exc:
        raise InputError(f"--tile-size: {exc}") from None

    out = Path(storage.absolute(s.out))
    last = out / "last.pt"
    payload = None
    if s.resume and last.exists():
        payload = read_training_checkpoint(last, s, model)
    elif last.exists() and not s.overwrite:
        raise InputError(f"{out}: holds a training run (last.pt); pass --resume to continue it or --overwrite to start over")

    data_keys = ("images", "labels", "axes", "labels_axes", "val_slices", "dims", "labels_kind", "normalize", "tile_size")
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
    """
    s = settings
    job = plan_training(s)  # every check before anything is written
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device(job.device)
    model = job.model.to(device)
    fmt = torch.contiguous_format
    if s.channels_last:
        fmt = torch.channels_last if model.dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    if s.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=job.lr, weight_decay=s.weight_decay)
    amp = AMP[s.amp] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)

    # resume: model, optimiser, scaler and generators exactly as they were after step `start`
    start, elapsed, best = 0, 0.0, {}
    if job.resume_payload:
        restore(job.resume_payload, job.out / "last.pt", model, optimizer, scaler)
        start = job.start
        elapsed = float(job.resume_payload["training"].get("seconds", 0.0))
        best = dict(job.resume_payload["training"].get("best", {}))
    job.out.mkdir(parents=True, exist_ok=True)
    if s.overwrite and not job.resume_payload:  # starting over: an old run's checkpoints must not outlive it
        for name in ("last.pt", "best.pt"):
            (job.out / name).unlink(missing_ok=True)
    log = TrainingLog(job.out / "log.csv", start)
    if on_start is not None:
        on_start(job)

    def training_state(step: int, seconds: float) -> dict[str, Any]:
        return {"step": step, "seconds": seconds, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state(), "settings": s.model_dump(mode="json"),
                "best": best, "stats": job.spec.stats.as_dict()}

    # data: the samples of steps start+1 .. steps, in order; each a function of (seed, index)
    loader = DataLoader(
        PatchDataset(job.spec), batch_size=s.batch_size, sampler=range(start * s.batch_size, s.steps * s.batch_size),
        num_workers=s.num_workers, worker_init_fn=_worker_init, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(s.seed),  # the loader never draws from the global generator
        persistent_workers=False,
    )
    clock = time.perf_counter()
    step, loss_value = start, None
    model.train()
    try:
        for step, (image, target, weight) in enumerate(loader, start=start + 1):
            # forward
            image = image.to(device, non_blocking=True).contiguous(memory_format=fmt)
            target, weight = target.to(device, non_blocking=True), weight.to(device, non_blocking=True)
            lr = learning_rate(job.lr, s.lr_schedule, step, s.steps)
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
            loss_value = float(loss.item())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"step {step}: the loss is {loss_value}; lower --lr (now {lr:g})")
            seconds = elapsed + time.perf_counter() - clock
            final = step == s.steps or (s.time_limit is not None and time.perf_counter() - clock >= s.time_limit)
            row: dict[str, Any] = {"step": step, "loss": loss_value, "lr": lr, "seconds": round(seconds, 3)}
            # eval
            if job.val_regions and (step % s.val_every == 0 or final):
                scores = validate(model, job.images, job.labels, job.val_regions, job.val_tile_size, s.mirror)
                row.update(scores)
                if not best or scores["rand_error"] < best["rand_error"]:
                    best = {"step": step, **scores}
                    save_checkpoint(job.out / "best.pt", model, {"step": step, "scores": scores})
            # checkpoint
            if step % s.checkpoint_every == 0 or final:
                if not job.val_regions:  # nothing to choose by: the best model is the latest
                    best = {"step": step}
                    save_checkpoint(job.out / "best.pt", model, {"step": step, "scores": {}})
                save_checkpoint(job.out / "last.pt", model, training_state(step, seconds))
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


__all__ = [
    "TrainSettings",
    "TrainJob",
    "TrainSummary",
    "PatchDataset",
    "PatchSpec",
    "Region",
    "split_regions",
    "data_stats",
    "elastic_field",
    "deform",
    "flip_rotate",
    "gray_values",
    "weighted_cross_entropy",
    "plan_training",
    "train",
]
