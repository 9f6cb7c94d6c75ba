"""The geometry of a model from elsewhere, measured by running it: no trust in what it claims.

A TorchScript or ONNX file says nothing about the input sizes it takes, how much context it
crops, or whether it may be tiled exactly. :func:`probe` finds out on random input:

1. the valid input sizes: the first sizes it runs at (or the sizes a package declares, each
   checked), evenly spaced by the *period*;
2. the output size for an input size: ``n - 2 * margin``, the same margin for every size
   (anything else, such as a down-sampled output, is refused);
3. translation equivariance: two tiles of one image, the second shifted by ``d`` pixels,
   must agree on the part of the image both outputs cover. The smallest ``d`` at which they
   do (within ``tolerance``) is the step; tiles whose outputs start on that grid then compute
   exactly what one pass over the whole image computes. A same-padding net (zero padding at
   its tile border) or a model with a position-dependent term never agrees: it is blended.

A model that runs at one size only (declared step 0, or the one size the scan finds: an ONNX
export with static axes, a package with a fixed shape) is measured at that size: its margin
and classes there, and equivariance with shifted tiles of that same size. It is then tiled
with tiles of that size (:attr:`TileGeometry.fixed`), exactly on its step grid where shifted
tiles agree, blended where not.

The probe also says whether the outputs on random input already are probabilities (in
[0, 1], summing to 1 over several channels): a graph that ends in its own sigmoid or softmax,
which must not be activated again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.errors import InputError
from pipeline.numerics.tiling import TileGeometry

Forward = Callable[[np.ndarray], np.ndarray]  # (N, C, *spatial) float32 -> (N, K, *spatial)

# Largest input edge the size scan tries: a depth-6 valid U-Net needs 380 px in 2D.
SCAN_LIMIT = {2: 640, 3: 256}
# Output edge of the equivariance test: room for shifts up to half of it.
TEST_OUTPUT = {2: 96, 3: 48}


@dataclass(frozen=True)
class Declared:
    """Valid input sizes a package declares: ``min + k * step`` (step 0: ``min`` only)."""

    min: int
    step: int

    def __str__(self) -> str:
        return f"input sizes {self.min} + k·{self.step} px" if self.step else f"a fixed input size {self.min} px"


@dataclass(frozen=True)
class Probe:
    """What :func:`probe` measured. ``step`` is the equivariance step (``None``: not
    equivariant at any step tried); ``disagreement`` the largest difference of two shifted
    tiles on their overlap, at ``step`` or, without one, the smallest over the shifts tried."""

    geometry: TileGeometry
    num_classes: int
    period: int
    step: int | None
    disagreement: float
    shift: int  # the shift whose disagreement is reported
    probabilities: bool = False  # its outputs on random input already are probabilities (:func:`_are_probabilities`)

    @property
    def exact(self) -> bool:
        return self.step is not None

    def reason(self) -> str:
        """Why the model is tiled exactly or blended, in one line."""
        g = self.geometry
        crop = f"output = input − {2 * g.margin} px" if g.margin else "output as large as its input"
        if g.fixed:
            crop = f"fixed input size {g.input_size} px (every tile that size, whatever --tile-size says), {crop}"
        if self.exact:
            return (f"exact: {crop}, and tiles shifted by {self.step} px agree on their overlap "
                    f"(max difference {self.disagreement:.1e}); tiles on the {g.factor}-px grid")
        if not self.shift:
            return f"blended: {crop}; its {g.smallest} px output is too small to test shifted tiles"
        why = "zero padding at tile borders" if not g.margin else "not translation equivariant"
        return (f"blended: {crop}; tiles shifted by {self.shift} px disagree by up to {self.disagreement:.2g} "
                f"on their overlap ({why})")


@dataclass(frozen=True)
class Failure:
    """How a model failed at a size, in a few words: its exception's type and message line.
    Kept for the error, so that a model failing for another reason than its input size says so."""

    why: str

    @classmethod
    def of(cls, exc: Exception) -> Failure:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
            return cls(lines[-1][:200])  # the interpreter's traceback ends in the model's own "Type: message"
        return cls(f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__)


def _run(forward: Forward, x: np.ndarray) -> np.ndarray | Failure:
    try:
        y = np.asarray(forward(x))
    except InputError:  # ours, not the model's: a model overtile cannot run at any size
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign model at a size: not a valid size
        return Failure.of(exc)
    return y


def _loss(n: int, y: np.ndarray, dims: int, source: str) -> tuple[int, int]:
    """What the model crops from an ``n`` px input (both sides together), and its classes."""
    if y.ndim != dims + 2 or y.shape[0] != 1:
        raise InputError(f"{source}: output of shape {y.shape} for an input of {n} px per axis; "
                         f"expected (batch, classes, {', '.join('zyx'[-dims:])})")
    spatial = set(y.shape[2:])
    if len(spatial) > 1 or max(spatial) > n:
        raise InputError(f"{source}: output {'×'.join(map(str, y.shape[2:]))} px for {n} px input: not a crop of "
                         f"the input, so overtile cannot tile it")
    return n - spatial.pop(), y.shape[1]


def _sizes(forward: Forward, dims: int, channels: int, source: str, declared: Declared | None) -> tuple[list[int], int, int]:
    """Three valid input sizes, evenly spaced (a fixed-size model: its one size); the margin
    per side; the classes.

    A valid size is one the model runs at with the smallest crop it makes: a U-Net that
    crops its skip connections also runs at sizes its poolings do not divide, but loses
    more than its margin there (and its tiles no longer line up).
    """
    def run(n: int) -> np.ndarray | Failure:
        return _run(forward, np.zeros((1, channels) + (n,) * dims, np.float32))

    found: dict[int, tuple[int, int]] = {}  # size -> (crop, classes)
    if declared is not None:
        for n in (declared.min + k * declared.step for k in range(3 if declared.step else 1)):
            y = run(n)
            if isinstance(y, Failure):
                raise InputError(f"{source}: declares {declared}, but the model fails at {n} px ({y.why})")
            found[n] = _loss(n, y, dims, source)
        sizes = sorted(found)
    else:
        sizes = []
        last = Failure("")
        for n in range(1, SCAN_LIMIT[dims] + 1):
            y = run(n)
            if isinstance(y, Failure):
                last = y
                continue
            found[n] = _loss(n, y, dims, source)
            least = min(c for c, _ in found.values())
            sizes = [k for k, (c, _) in found.items() if c == least]
            if len(sizes) >= 3 and n >= sizes[2] + (sizes[1] - sizes[0]):  # one period past: no smaller crop
                break
        if not found:
            raise InputError(f"{source}: the model runs at no {dims}-D input size from 1 to {SCAN_LIMIT[dims]} px "
                             f"with {channels} channel(s) (at {SCAN_LIMIT[dims]} px: {last.why})")
        sizes = sizes[:3]
        fixed = len(found) == 1  # it runs at one size and no other
        if not fixed and (len(sizes) < 3 or sizes[2] - sizes[1] != sizes[1] - sizes[0]):
            raise InputError(f"{source}: the model's input sizes with the least crop are {', '.join(map(str, sizes))} px: "
                             f"not evenly spaced, so overtile cannot tile it")
    crops = {found[n][0] for n in sizes}
    classes = {found[n][1] for n in sizes}
    if len(crops) > 1 and declared is not None:
        seen = ", ".join(f"{found[n][0]} px at {n} px" for n in sizes)
        raise InputError(f"{source}: declares {declared}, but the model crops {seen}")
    if len(crops) > 1:
        raise InputError(f"{source}: the output is smaller than the input by {sorted(crops)} px at input sizes "
                         f"{sizes}: not a fixed margin, so overtile cannot tile it")
    if len(classes) > 1:
        raise InputError(f"{source}: the number of output channels changes with the input size ({sorted(classes)})")
    crop = crops.pop()
    if crop % 2:
        raise InputError(f"{source}: the output is {crop} px smaller than the input: not the same crop on each side")
    return sizes, crop // 2, classes.pop()


def _disagreement(a: np.ndarray, b: np.ndarray, shift: int, dims: int) -> float:
    """Largest difference of two tile outputs on what both cover, the second shifted by ``shift``
    along every axis; relative to the outputs' scale where that is above 1."""
    o = a.shape[-1]
    first = a[(Ellipsis, *(slice(shift, o),) * dims)]
    second = b[(Ellipsis, *(slice(0, o - shift),) * dims)]
    scale = max(1.0, float(np.abs(first).max()))
    return float(np.abs(first - second).max()) / scale


def probe(forward: Forward, dims: int, channels: int, source: str, declared: Declared | None = None,
          tolerance: float = 1e-4, seed: int = 0) -> Probe:
    """Measure the valid input sizes, the margin and the equivariance step of ``forward``.

    Parameters
    ----------
    forward : callable
        ``(N, C, *spatial)`` float32 in, ``(N, K, *spatial)`` out, as tiles are run.
    dims, channels : int
        Spatial axes and input channels of the model.
    source : str
        The model's name in error messages.
    declared : Declared, optional
        The input sizes a package declares: checked (each must run), not searched.
    tolerance : float
        Shifted tiles agree when they differ by at most this (relative to outputs above 1).
    """
    sizes, margin, classes = _sizes(forward, dims, channels, source, declared)
    period = sizes[1] - sizes[0] if len(sizes) > 1 else 0  # 0: one size only (fixed)
    first = sizes[0]
    r0 = first - 2 * margin
    if period == 0 and r0 < 1:
        raise InputError(f"{source}: takes only {first} px tiles, and crops them to nothing ({r0} px output); "
                         f"overtile needs an output of at least 1 px")
    if period:
        size = first + -(-max(0, TEST_OUTPUT[dims] - r0) // period) * period
    else:  # the one size it takes: shifts up to half its own output
        size = first
    out = size - 2 * margin
    shifts = sorted(({1, 2, 4, 8, 16, 32, 64, period, 2 * period} - {0}) & set(range(1, out // 2 + 1)))
    rng = np.random.default_rng(seed)
    if not shifts:  # an output of 1 px: nothing to compare, so blended
        y = _run(forward, rng.standard_normal((1, channels) + (size,) * dims).astype(np.float32))
        probabilities = not isinstance(y, Failure) and _are_probabilities([y])
        return Probe(TileGeometry(margin, 1, 0, r0, blend=True, fixed=True), classes, 0, None, float("nan"), 0,
                     probabilities)
    image = rng.standard_normal((1, channels) + (size + shifts[-1],) * dims).astype(np.float32)
    reference = _run(forward, image[(Ellipsis, *(slice(0, size),) * dims)])
    if isinstance(reference, Failure):
        raise InputError(f"{source}: the model fails at {size} px, between sizes it runs at ({reference.why})")
    found: dict[int, float] = {}
    outputs = [reference]
    for shift in shifts:
        moved = _run(forward, image[(Ellipsis, *(slice(shift, shift + size),) * dims)])
        if isinstance(moved, Failure):
            raise InputError(f"{source}: the model fails at {size} px, between sizes it runs at ({moved.why})")
        found[shift] = _disagreement(reference, moved, shift, dims)
        outputs.append(moved)
    probabilities = _are_probabilities(outputs)
    agree = [s for s in shifts if found[s] <= tolerance]
    # the step: the smallest shift that agrees and whose double, where tried, agrees too
    step = next((s for s in agree if 2 * s not in found or found[2 * s] <= tolerance), None)
    fixed = period == 0
    if step is None:
        shift = min(found, key=found.__getitem__)
        geometry = TileGeometry(margin, period or 1, r0 % (period or 1), r0, blend=True, fixed=fixed)
        return Probe(geometry, classes, period, None, found[shift], shift, probabilities)
    factor = step if fixed else math.lcm(period, step)
    geometry = TileGeometry(margin, factor, r0 % factor, r0, blend=False, fixed=fixed)
    return Probe(geometry, classes, period, step, found[step], step, probabilities)


def _are_probabilities(outputs: list[np.ndarray]) -> bool:
    """Whether every output lies in [0, 1] and, with several channels, sums to 1 over them
    (within 1e-4): a model whose graph ends in its own sigmoid or softmax. Activating such
    outputs again would be silently wrong (a sigmoid's labels, ``logit > 0``, all foreground)."""
    for y in outputs:
        if not (np.all(y >= 0) and np.all(y <= 1)):  # NaN fails too
            return False
        if y.shape[1] > 1 and np.abs(y.sum(axis=1) - 1).max() > 1e-4:
            return False
    return True
