"""Overlap-tile inference on in-memory arrays: plan tiles, mirror, run in batches, stitch.

This is the exact reference path that the blockwise Zarr path (:mod:`pipeline.jobs.predict`) calls
for each block. Arrays are channel first: images ``(C, *spatial)``, logits ``(K, *spatial)``.

Exactness (valid nets). A valid U-Net with ``depth`` levels pools ``depth - 1`` times, so it
is translation equivariant only for shifts that are multiples of ``f = 2**(depth-1)``. Every
tile therefore has its output origin on the global ``f`` grid (image coordinates, not block
coordinates), tile outputs are ``≡ r (mod f)`` long (``r = 4`` for the paper's net) and
consecutive tiles step by a multiple of ``f``, overlapping by ``r`` pixels. Each output pixel
is then computed by exactly the arithmetic of one forward pass over the whole mirror-padded
image, whatever the block or tile size; :func:`predict_whole` is that pass.

Same-padding nets are not equivariant at their tile borders (zero padding), so their tiles
lie on a fixed global grid with overlap and are blended with a Gaussian window (as nnU-Net
and MONAI do); the blend is independent of the block partition too.

Any model is tiled through its :class:`TileGeometry` (``model.geometry``): overtile's U-Net
computes its own, models from elsewhere get theirs from a probe (:mod:`pipeline.models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from pipeline.numerics.geometry import Box, mirror_indices

Reader = Callable[[Box], np.ndarray]
Array = np.ndarray | torch.Tensor  # host arrays, or tensors that stay on the model's device
Runner = Callable[[torch.nn.Module, Sequence[Array], 'torch.dtype | None'], list[Array]]


@dataclass(frozen=True)
class TileGeometry:
    """How a model's output relates to its input along each spatial axis, and how it is tiled.

    A model that crops reads ``margin`` pixels of context per side: its output for an input of
    ``n`` pixels is ``n - 2 * margin``. Valid outputs are the sizes ``≡ remainder (mod factor)``
    from ``smallest`` up; ``factor`` is also the shift under which the model is translation
    equivariant, so tiles whose outputs start on the global ``factor`` grid are exact. With
    ``blend``, tiles overlap and are blended instead (same padding, or a model whose shifted
    tiles disagree).

    With ``fixed``, the model takes one input size only, ``smallest + 2 * margin`` (an ONNX
    export with static axes, a package that declares one shape): every tile has that size,
    whatever tile size is asked for, and tiles step by a multiple of ``factor`` smaller than
    their output (so exact tiles overlap; their overlaps agree).

    Examples
    --------
    >>> paper = TileGeometry(margin=92, factor=16, remainder=4, smallest=4)
    >>> paper.output_size(572), paper.min_input_size(388), paper.max_input_size(580)
    (388, 572, 572)
    >>> static = TileGeometry(margin=92, factor=16, remainder=4, smallest=388, fixed=True)
    >>> static.input_size, static.min_input_size(1000), static.max_input_size(300)
    (572, 572, 572)
    """

    margin: int
    factor: int
    remainder: int
    smallest: int
    blend: bool = False
    fixed: bool = False

    @property
    def input_size(self) -> int | None:
        """The one input size of a fixed-size model (``None``: a range of sizes)."""
        return self.smallest + 2 * self.margin if self.fixed else None

    def is_valid_input(self, size: int) -> bool:
        out = size - 2 * self.margin
        if self.fixed:
            return out == self.smallest
        return out >= self.smallest and (out - self.remainder) % self.factor == 0

    def output_size(self, size: int) -> int:
        """Output size along one axis for an input of ``size``; raises if not valid."""
        if not self.is_valid_input(size):
            raise ValueError(
                f"{size} is not a valid input size for this model "
                f"(next valid: {self.min_input_size(max(1, size - 2 * self.margin))})"
            )
        return size - 2 * self.margin

    def min_input_size(self, output: int) -> int:
        """Smallest valid input whose output is at least ``output`` pixels (a fixed-size
        model: its one size, whose output may be smaller; tiles then cover ``output``)."""
        if self.fixed:
            return self.smallest + 2 * self.margin
        r, f = self.remainder, self.factor
        out = max(output, self.smallest)
        return r + -(-(out - r) // f) * f + 2 * self.margin

    def max_input_size(self, limit: int) -> int:
        """Largest valid input size not above ``limit``; raises if there is none. A fixed-size
        model: its one size, whatever ``limit`` is (it runs at no other)."""
        if self.fixed:
            return self.smallest + 2 * self.margin
        r, f = self.remainder, self.factor
        out = limit - 2 * self.margin
        if out < self.smallest:
            raise ValueError(
                f"tile size {limit} is too small for this model; "
                f"the smallest valid tile is {self.min_input_size(1)}"
            )
        return r + ((out - r) // f) * f + 2 * self.margin


class TiledModel(Protocol):
    """What tiling needs of a model: its geometry. Forward passes go through a runner."""

    @property
    def geometry(self) -> TileGeometry: ...


@dataclass(frozen=True)
class Tile:
    """One forward pass: the ``input`` box it reads and the ``output`` box it predicts."""

    input: Box
    output: Box


@dataclass(frozen=True)
class TilePlan:
    """The tiles that cover ``region``; ``read`` is the input box they need (the block + halo)."""

    region: Box
    tiles: tuple[Tile, ...]
    read: Box
    blend: bool


def _axis_tiles_valid(a: int, b: int, max_out: int, f: int, r: int) -> list[tuple[int, int]]:
    """Output intervals (origin, length) on the f-grid covering [a, b), all of one length."""
    start = (a // f) * f  # snap down to the global grid
    span = b - start
    max_step = ((max_out - r) // f) * f
    count = max(1, -(-(span - r) // max_step))
    step = max(1, -(-(span - r) // (count * f))) * f
    return [(start + i * step, step + r) for i in range(count)]


def _axis_tiles_fixed(a: int, b: int, out: int, f: int) -> list[tuple[int, int]]:
    """Output intervals (origin, ``out``) on the f grid covering [a, b), evenly spaced: a
    fixed-size model's tiles, which overlap where the region is not a multiple of their step
    and reach past a region smaller than one of them."""
    max_step = (out // f) * f
    if max_step == 0:
        raise ValueError(f"a fixed tile output of {out} px cannot step on the {f}-px grid")
    start = (a // f) * f  # snap down to the global grid
    span = b - start
    if span <= out:
        return [(start, out)]
    steps = -(-(span - out) // max_step)
    step = -(-(span - out) // (steps * f)) * f
    return [(start + i * step, out) for i in range(steps + 1)]


def _axis_tiles_same(a: int, b: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Tile intervals on a global grid (step ``size - overlap``, first centred on 0) meeting [a, b)."""
    step = size - overlap
    origin0 = -(overlap // 2)
    first = (a - origin0 - size) // step + 1
    last = (b - 1 - origin0) // step
    return [(origin0 + k * step, size) for k in range(first, last + 1)]


def plan_tiles(
    model: TiledModel, region: Box, tile_size: int | Sequence[int], overlap: float = 0.5
) -> TilePlan:
    """Plan the tiles that predict ``region`` (spatial coordinates of the image).

    Parameters
    ----------
    model : UNet, or any model with a :class:`TileGeometry`
    region : Box
        The output region to predict, e.g. a block's write box.
    tile_size : int or sequence of int
        Largest tile *input* size per axis (GPU memory is the limit); snapped down to a
        valid size. For valid nets, tiles are then shrunk to cover ``region`` with the
        least waste, so all tiles of a plan have one shape (one batch). A fixed-size model
        (``geometry.fixed``) ignores it: its tiles have its one input size, also where the
        region is smaller than their output (they read more context and are cropped).
    overlap : float
        Blended models only: the fraction of a tile's output shared with its neighbour.

    Examples
    --------
    >>> net = UNet(base_channels=4)
    >>> plan = plan_tiles(net, Box((0, 0), (2048, 2048)), 1212)
    >>> len(plan.tiles), plan.tiles[0].input.shape, plan.read
    (4, (1212, 1212), Box(offset=(-92, -92), shape=(2236, 2236)))
    """
    nd = region.ndim
    sizes = (tile_size,) * nd if isinstance(tile_size, (int, np.integer)) else tuple(tile_size)
    if len(sizes) != nd:
        raise ValueError(f"tile_size has {len(sizes)} values for {nd} spatial axes")
    g = model.geometry
    m, f = g.margin, g.factor
    if g.fixed:  # the model runs at one size: the tile size asked for does not apply
        sizes = (g.min_input_size(1),) * nd
    else:
        smallest = g.min_input_size(f + g.remainder)  # tiles must step on the f grid
        if min(sizes) < smallest:
            raise ValueError(f"tile size {min(sizes)} is too small for this model; the smallest is {smallest}")
        sizes = tuple(g.max_input_size(int(s)) for s in sizes)
    if not g.blend and g.fixed:
        axes = [_axis_tiles_fixed(a, b, g.smallest, f) for a, b in zip(region.offset, region.stop)]
    elif not g.blend:
        axes = [
            _axis_tiles_valid(a, b, s - 2 * m, f, g.remainder)
            for a, b, s in zip(region.offset, region.stop, sizes)
        ]
    else:
        axes = []
        for a, b, s in zip(region.offset, region.stop, sizes):
            out = s - 2 * m  # blended tiles overlap by a share of their output
            ov = int(round(out * overlap / f)) * f
            if not 0 <= ov < out:
                raise ValueError(f"overlap {overlap} leaves no step for tile size {s}")
            axes.append(_axis_tiles_same(a, b, out, ov))
    tiles = []
    for combo in np.ndindex(*(len(a) for a in axes)):
        out = Box(tuple(axes[d][i][0] for d, i in enumerate(combo)),
                  tuple(axes[d][i][1] for d, i in enumerate(combo)))
        tiles.append(Tile(out.grow(m), out))
    read = tiles[0].input
    for t in tiles[1:]:
        read = read.union(t.input)
    return TilePlan(region, tuple(tiles), read, blend=g.blend)


def read_mirrored(reader: Reader, box: Box, image_shape: Sequence[int], mode: str = "reflect") -> np.ndarray:
    """Read ``box`` of an image, mirroring wherever it runs outside ``[0, image_shape)``.

    ``reader(inner_box)`` returns the array ``(C, *inner_box.shape)`` for a box inside the
    image; it is called once, for the smallest box that holds every mirrored coordinate.
    """
    index = [mirror_indices(o, e, n, mode) for o, e, n in zip(box.offset, box.stop, image_shape)]
    hull = _hull(index)
    data = reader(hull)
    if hull == box:
        return data
    local = np.ix_(*[i - o for i, o in zip(index, hull.offset)])
    if isinstance(data, torch.Tensor):  # a block on the GPU: the same gather there
        return data[(slice(None), *(_on(torch.from_numpy(i), data.device) for i in local))]
    return data[(slice(None), *local)]


def _hull(index: Sequence[np.ndarray]) -> Box:
    return Box.from_bounds([i.min() for i in index], [i.max() + 1 for i in index])


def _on(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small ``host`` tensor (mirror indices, a blend window) on ``device``, asked not to
    block. From pageable memory a GPU copy may still wait for the queued work; pinned staging
    would avoid it, but pinned memory is the jobs' business (tests/test_layering.py), and these
    copies come once per border block and transform."""
    return host.to(device, non_blocking=True)


def mirror_hull(box: Box, image_shape: Sequence[int], mode: str = "reflect") -> Box:
    """The box inside the image that :func:`read_mirrored` reads for ``box``."""
    return _hull([mirror_indices(o, e, n, mode) for o, e, n in zip(box.offset, box.stop, image_shape)])


def gaussian_window(shape: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's importance map: a Gaussian of sigma ``shape * sigma_scale``, peak 1, floor 1e-6 (never 0)."""
    window = np.ones((), dtype=np.float64)
    for n in shape:
        x = np.arange(n) - (n - 1) / 2
        g = np.exp(-0.5 * (x / (n * sigma_scale)) ** 2)
        window = np.multiply.outer(window, g)
    window /= window.max()
    return np.maximum(window, 1e-6).astype(np.float32)


def model_device(model: torch.nn.Module) -> tuple[torch.device, torch.memory_format]:
    """Where ``model`` runs and the memory format of its weights (the CPU for a model without
    torch weights, such as an ONNX model run by onnxruntime)."""
    weight = next(model.parameters(), None)
    if weight is None:
        return torch.device("cpu"), torch.contiguous_format
    fmt = torch.contiguous_format
    if weight.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        fmt = torch.channels_last
    elif weight.ndim == 5 and weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous():
        fmt = torch.channels_last_3d
    return weight.device, fmt


def run_tiles(
    model: torch.nn.Module,
    batches: Sequence[Array],
    autocast: torch.dtype | None = None,
) -> list[Array]:
    """Forward each batch ``(N, C, *tile)`` through ``model``; float32 logits back on the host,
    or, for batches that are tensors already (cut from a block kept on the device), left there.

    The plain path, on whatever device the model is (the reference of :func:`predict_whole`
    too); :func:`pipeline.jobs.inference.run_tiles` adds the GPU's streams and pinned buffers
    for host batches and falls back to this one elsewhere.
    """
    device, fmt = model_device(model)
    out: list[Array] = []
    with torch.inference_mode():
        for batch in batches:
            resident = isinstance(batch, torch.Tensor)
            x = batch if resident else torch.from_numpy(np.ascontiguousarray(batch))
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                y = model(x.to(device).contiguous(memory_format=fmt)).float()
            out.append(y if resident else y.cpu().numpy())
    return out


def predict_region(
    model: torch.nn.Module,
    plan: TilePlan,
    image: Array,
    batch_size: int = 1,
    autocast: torch.dtype | None = None,
    runner: Runner | None = None,
) -> Array:
    """Logits ``(K, *plan.region.shape)`` from a normalised ``image`` that covers ``plan.read``.

    ``runner`` forwards the batches (default :func:`run_tiles`); the device code of the jobs
    passes its own. A torch ``image`` is cut, and its logits stitched, where it lies (the GPU
    path keeps a block on the device: :func:`pipeline.jobs.inference.on_device`),
    with the same arithmetic as on numpy arrays.

    Exact models (valid nets): tile outputs are placed (overlaps agree exactly). Blended ones
    (same padding, or not translation equivariant): tile outputs are blended with
    :func:`gaussian_window`.
    """
    region = plan.region
    crops = [image[(slice(None), *t.input.relative_to(plan.read))] for t in plan.tiles]
    stack = torch.stack if isinstance(image, torch.Tensor) else np.stack
    batches = [stack(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]
    logits = [y for batch in (runner or run_tiles)(model, batches, autocast) for y in batch]
    del batches  # on a GPU, only the logits stay until stitched
    k = logits[0].shape[0]

    def zeros(*shape: int) -> Array:
        if isinstance(logits[0], torch.Tensor):
            return torch.zeros(shape, dtype=torch.float32, device=logits[0].device)
        return np.zeros(shape, dtype=np.float32)

    out = zeros(k, *region.shape)
    if not plan.blend:
        for tile, y in zip(plan.tiles, logits):
            part = tile.output.intersect(region)
            out[(slice(None), *part.relative_to(region))] = y[(slice(None), *part.relative_to(tile.output))]
        return out
    window = gaussian_window(plan.tiles[0].output.shape)
    if isinstance(out, torch.Tensor):
        window = _on(torch.from_numpy(window), out.device)
    total = zeros(*region.shape)
    for tile, y in zip(plan.tiles, logits):
        part = tile.output.intersect(region)
        if part.empty:
            continue
        dst, src = part.relative_to(region), part.relative_to(tile.output)
        out[(slice(None), *dst)] += y[(slice(None), *src)] * window[src]
        total[dst] += window[src]
    out /= total
    return out


def overlap_tile(
    model: torch.nn.Module,
    image: np.ndarray,
    tile_size: int | Sequence[int] = 572,
    batch_size: int = 1,
    mirror: str = "reflect",
    overlap: float = 0.5,
) -> np.ndarray:
    """Overlap-tile prediction of a whole in-memory image; logits ``(K, *spatial)``.

    ``image`` is ``(C, *spatial)`` and already normalised (see :class:`pipeline.numerics.unet.Normalization`).

    Examples
    --------
    >>> net = UNet(base_channels=4).eval()
    >>> overlap_tile(net, np.zeros((1, 300, 200), np.float32), tile_size=284).shape
    (2, 300, 200)
    """
    spatial = image.shape[1:]
    plan = plan_tiles(model, Box.from_shape(spatial), tile_size, overlap)

    def reader(box: Box) -> np.ndarray:
        return image[(slice(None), *box.slices())]

    padded = read_mirrored(reader, plan.read, spatial, mirror)
    return predict_region(model, plan, padded, batch_size)


def predict_whole(model: torch.nn.Module, image: np.ndarray, mirror: str = "reflect", context: int = 0,
                  autocast: torch.dtype | None = None) -> np.ndarray:
    """One forward pass over the whole mirror-padded image: the reference for :func:`overlap_tile`.

    The image is padded by the margin on each side (plus ``context``, for blended models),
    plus what the end of each axis needs for a valid size, and the output cropped to the image.
    """
    spatial = image.shape[1:]
    g = model.geometry
    m, c = g.margin, (context if g.blend else 0)
    box = Box.from_bounds((-m - c,) * len(spatial), [g.min_input_size(n + 2 * c) - m - c for n in spatial])

    def reader(inner: Box) -> np.ndarray:
        return image[(slice(None), *inner.slices())]

    padded = read_mirrored(reader, box, spatial, mirror)
    (y,) = run_tiles(model, [padded[None]], autocast)
    out_box = box.grow(-m)
    return y[0][(slice(None), *Box.from_shape(spatial).relative_to(out_box))]


def class_labels(scores: Array) -> Array:
    """The class of the highest score along axis 0 as ``uint8`` (the first of equal scores, as
    ``np.argmax``; scores are finite). Plane by plane: about 3× faster than
    ``scores.argmax(axis=0)``, which strides across the class planes for every pixel; a
    labels job does this once per block (bench/gpu.py's host side). A tensor is labelled by
    ``torch.argmax`` where it lies, which also keeps the first of equal scores."""
    if len(scores) > 256:
        raise ValueError(f"{len(scores)} classes do not fit uint8 labels")
    if isinstance(scores, torch.Tensor):
        return scores.argmax(0).to(torch.uint8)
    labels = np.zeros(scores.shape[1:], np.uint8)
    best = scores[0]
    for k in range(1, len(scores)):
        np.copyto(labels, k, where=scores[k] > best)
        if k + 1 < len(scores):
            best = np.maximum(best, scores[k])
    return labels


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Class probabilities from logits along the channel axis, float32."""
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z
