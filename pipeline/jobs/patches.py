"""Training patches sampled lazily from Zarr: where they come from (regions, held-out slices),
one pass of statistics over the training labels, and the dataset a loader iterates.

A patch is the model's valid *input* (``tile_size``); its labels and weights are cropped to
the model's *output*. Where a patch's context runs outside the image (or into held-out
slices) it is mirrored, as overlap-tile prediction does. Sample ``i`` is a pure function of
``(seed, i)``, so any number of loader workers, and a resumed run, see exactly the same patches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from pipeline import storage
from pipeline.numerics.augment import deform, elastic_field, flip_rotate, gray_values
from pipeline.numerics.geometry import Box, iter_blocks
from pipeline.numerics.tiling import read_mirrored
from pipeline.numerics.unet import Normalization
from pipeline.numerics.weightmap import touching_borders, weight_map

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
    sigma: float = 5.0  # in the labels' physical units, as ``spacing``
    spacing: tuple[float, ...] | None = None  # the labels' pixel size per model axis (None: 1 px)
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
        if not s.stats.mask:  # instances drawn touching: a gap of background between them, as the paper's
            cells &= ~touching_borders(label)
        if weight is None:  # eq. 2 on the whole input patch, so distances see the context
            instances = ndimage.label(cells)[0] if s.stats.mask else np.where(cells, label, 0)
            weight = weight_map(instances, s.w0, s.sigma, class_weights=s.class_weights, spacing=s.spacing)
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


def seed_loader_worker(worker_id: int) -> None:
    """Loader workers: one torch thread each, and their own seeded global generators."""
    torch.set_num_threads(1)
    seed = torch.utils.data.get_worker_info().seed
    np.random.seed(seed % 2**32)
    random.seed(seed)
