"""Test-time augmentation that stays exact under tiling.

The prediction is the mean, in probability space, of the network's prediction of each
transformed image mapped back: the 8 flips and 90° rotations of the plane in 2-D (the
dihedral group of the square), the 8 flips of the axes in 3-D, or a chosen subset.

Exactness: a valid U-Net's output depends on where its pooling grid sits, so a tile must
start on that grid counted from the origin of the image it is cut from. Each transformed
image is therefore tiled from its *own* origin: a block of the output is mapped into the
transformed image (:meth:`Transform.box`), planned there with the ordinary overlap-tile
plan, read through the transform (:meth:`Transform.apply` of what the inverse box reads;
mirroring at the border commutes with flips and transposes), predicted, and mapped back
(:meth:`Transform.invert`). The tiled result then equals the same augmentation applied to
whole-image inference (:func:`predict_whole_tta`), for any block and tile size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import Array, mirror_hull, plan_tiles, predict_region, predict_whole, read_mirrored, softmax

Reader = Callable[[Box], np.ndarray]


@dataclass(frozen=True)
class Transform:
    """A transpose of the last two spatial axes (2-D: y and x), then flips of some spatial axes.

    Arrays are channel-first ``(C, *spatial)``; boxes are spatial.
    """

    name: str
    transpose: bool
    flips: tuple[bool, ...]

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The transformed image's spatial shape."""
        shape = tuple(int(n) for n in shape)
        return shape[:-2] + (shape[-1], shape[-2]) if self.transpose else shape

    def box(self, box: Box, shape: Sequence[int]) -> Box:
        """Where ``box`` of the image (of spatial ``shape``) lies in the transformed image."""
        start, stop = list(box.offset), list(box.stop)
        if self.transpose:
            start[-2:], stop[-2:] = start[-1:-3:-1], stop[-1:-3:-1]
        size = self.shape(shape)
        for d, flip in enumerate(self.flips):
            if flip:
                start[d], stop[d] = size[d] - stop[d], size[d] - start[d]
        return Box.from_bounds(start, stop)

    def inverse_box(self, box: Box, shape: Sequence[int]) -> Box:
        """Where ``box`` of the transformed image lies in the image (of spatial ``shape``)."""
        size = self.shape(shape)
        start, stop = list(box.offset), list(box.stop)
        for d, flip in enumerate(self.flips):
            if flip:
                start[d], stop[d] = size[d] - stop[d], size[d] - start[d]
        if self.transpose:
            start[-2:], stop[-2:] = start[-1:-3:-1], stop[-1:-3:-1]
        return Box.from_bounds(start, stop)

    def apply(self, array: Array) -> Array:
        """The image's ``(C, *spatial)`` array (or tensor) as the transformed image's."""
        if self.transpose:
            array = array.swapaxes(-1, -2)
        return self._flip(array)

    def invert(self, array: Array) -> Array:
        """The transformed image's ``(C, *spatial)`` array (or tensor) mapped back onto the image."""
        array = self._flip(array)
        return array.swapaxes(-1, -2) if self.transpose else array

    def _flip(self, array: Array) -> Array:
        axes = tuple(1 + d for d, flip in enumerate(self.flips) if flip)
        if not axes:
            return array
        return torch.flip(array, axes) if isinstance(array, torch.Tensor) else np.flip(array, axes)


def _dihedral() -> dict[str, Transform]:
    names = {(False, False, False): "identity", (False, True, False): "flip_y", (False, False, True): "flip_x",
             (False, True, True): "rot180", (True, False, False): "transpose", (True, True, False): "rot90",
             (True, False, True): "rot270", (True, True, True): "antitranspose"}
    return {name: Transform(name, t, (fy, fx)) for (t, fy, fx), name in names.items()}


def _flips_3d() -> dict[str, Transform]:
    found = {}
    for flips in np.ndindex(2, 2, 2):
        letters = "".join(a for a, f in zip("zyx", flips) if f)
        name = f"flip_{letters}" if letters else "identity"
        found[name] = Transform(name, False, tuple(bool(f) for f in flips))
    return found


TRANSFORMS = {2: _dihedral(), 3: _flips_3d()}


def transforms(dims: int, names: str | Sequence[str]) -> list[Transform]:
    """The transforms ``names`` chooses for ``dims`` spatial axes: ``"none"`` (the image as it
    is), ``"all"`` (8 in 2-D and in 3-D), or names such as ``identity,flip_x,rot90``.

    Raises ``ValueError`` naming the choices for an unknown name.
    """
    known = TRANSFORMS[dims]
    if isinstance(names, str):
        if names == "none":
            return [known["identity"]]
        if names == "all":
            return list(known.values())
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{', '.join(unknown) or 'nothing'}: not a {dims}-D test-time transform "
                         f"(none, all, or a comma-separated subset of {', '.join(known)})")
    return [known[n] for n in dict.fromkeys(names)]


def predict_region_tta(
    model: object,
    region: Box,
    shape: Sequence[int],
    reader: Reader,
    chosen: Sequence[Transform],
    tile_size: int | Sequence[int],
    *,
    overlap: float = 0.5,
    mirror: str = "reflect",
    normalize: Callable[[np.ndarray], np.ndarray] = lambda a: a,
    activation: Callable[[np.ndarray], np.ndarray] = softmax,
    **predict: object,
) -> np.ndarray:
    """Probabilities ``(K, *region.shape)`` of ``region`` of an image of spatial ``shape``,
    averaged over ``chosen`` transforms, each transformed image tiled from its own origin.

    ``reader(box)`` reads ``(C, *box.shape)`` of the image inside its bounds (always inside
    :func:`read_box`); ``normalize`` is the model's input normalisation; ``activation`` makes
    the model's outputs probabilities; ``predict`` goes to :func:`predict_region`
    (``batch_size``, ``autocast``, ``runner``). A reader of torch tensors keeps the whole
    augmentation where they lie (a block on the GPU), with the same arithmetic.
    """
    total = None
    for t in chosen:
        plan = plan_tiles(model, t.box(region, shape), tile_size, overlap)
        raw = read_mirrored(lambda box, t=t: t.apply(reader(t.inverse_box(box, shape))), plan.read, t.shape(shape),
                            mirror)
        raw = raw.contiguous() if isinstance(raw, torch.Tensor) else np.ascontiguousarray(raw)
        p = t.invert(activation(predict_region(model, plan, normalize(raw), **predict)))
        total = p if total is None else total + p
        del p, raw  # on a GPU: one transform's arrays at a time
    mean = total / len(chosen)
    return mean.to(torch.float32) if isinstance(mean, torch.Tensor) else mean.astype(np.float32)


def read_box(model: object, region: Box, shape: Sequence[int], chosen: Sequence[Transform],
             tile_size: int | Sequence[int], overlap: float = 0.5, mirror: str = "reflect") -> Box:
    """The box of the image (inside its bounds) that :func:`predict_region_tta` reads for
    ``region`` under all of ``chosen``: read it once, and let the reader cut from it."""
    found = None
    for t in chosen:
        plan = plan_tiles(model, t.box(region, shape), tile_size, overlap)
        box = t.inverse_box(mirror_hull(plan.read, t.shape(shape), mirror), shape)
        found = box if found is None else found.union(box)
    return found


def predict_whole_tta(model: object, image: np.ndarray, chosen: Sequence[Transform], mirror: str = "reflect",
                      context: int = 0) -> np.ndarray:
    """The reference: probabilities of the whole normalised ``image`` ``(C, *spatial)``, one
    forward pass per transformed image, mapped back and averaged."""
    total = None
    for t in chosen:
        p = t.invert(softmax(predict_whole(model, np.ascontiguousarray(t.apply(image)), mirror, context)))
        total = p if total is None else total + p
    return (total / len(chosen)).astype(np.float32)
