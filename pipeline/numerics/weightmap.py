"""The training weight map of the U-Net paper (Ronneberger et al. 2015, eq. 2).

.. math::

    w(x) = w_c(x) + w_0 \\exp\\left(-\\frac{(d_1(x) + d_2(x))^2}{2\\sigma^2}\\right)

``w_c`` balances the class frequencies (background against foreground) and ``d1``/``d2`` are
the distances from ``x`` to the nearest and the second-nearest cell. The border term is what
makes a U-Net learn the thin background gaps between touching cells.

:func:`weight_map` is exact and fast: a cell's border term only reaches as far as
``w0 * exp(-R**2 / (2 * sigma**2))`` still matters, so each cell gets a distance transform
inside its bounding box grown by that reach ``R`` and nowhere else; work grows with the
image's area, not with area × cells. :func:`weight_map_naive` is the definition written out
(one distance transform per cell over the whole image), kept as the reference for tests and
benchmarks. The two agree within 1e-4 (in practice within float32 rounding).

For blockwise use, the class weights of a whole image come from a global pass:
:func:`class_frequencies` per block, summed, then :func:`balanced_class_weights`, passed to
:func:`weight_map` as ``class_weights``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.numerics.geometry import Box

# The border term is dropped only where it is below this; far below the 1e-4 that the fast
# map promises against the naive one.
BORDER_TOLERANCE = 1e-6

ClassWeights = Mapping[int | str, float] | Sequence[float] | None


# --- class balance -----------------------------------------------------------------------


def class_frequencies(labels: np.ndarray) -> tuple[int, int]:
    """Pixel counts ``(n_background, n_foreground)`` of a label image or binary mask.

    Background is label 0, foreground any other label. Counts of several blocks add up to
    the counts of the image they tile, which is what a global pass sums.

    Examples
    --------
    >>> class_frequencies(np.array([[0, 0, 3], [0, 5, 5]]))
    (3, 3)
    """
    labels = _check_labels(labels, allow_bool=True)
    foreground = int(np.count_nonzero(labels))
    return labels.size - foreground, foreground


def balanced_class_weights(counts: Sequence[int]) -> tuple[float, float]:
    """Class weights ``w_c(k) = N / (K * n_k)`` from counts ``(n_background, n_foreground)``.

    ``N`` is the total count and ``K`` the number of classes present (count > 0), so the
    classes present contribute equally to the loss, and a single class present has weight 1.
    A class that is absent gets weight 0 (no pixel uses it).

    Examples
    --------
    >>> balanced_class_weights((75, 25))
    (0.6666666666666666, 2.0)
    >>> balanced_class_weights((100, 0))
    (1.0, 0.0)
    """
    counts = tuple(counts)
    if len(counts) != 2 or any(
        isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0 for n in counts
    ):
        raise InputError(f"counts: {counts!r}; expected two non-negative integers (n_background, n_foreground)")
    total = sum(int(n) for n in counts)
    if total == 0:
        raise InputError("counts: (0, 0); no pixels to balance")
    present = sum(1 for n in counts if n > 0)
    return tuple(total / (present * int(n)) if n > 0 else 0.0 for n in counts)  # type: ignore[return-value]


# --- the weight map ----------------------------------------------------------------------


def weight_map(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: ClassWeights = None,
    spacing: Sequence[float] | float | None = None,
    binary: bool = False,
) -> np.ndarray:
    """The U-Net training weight map (eq. 2 of the paper) of an instance label image.

    ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))``, where ``d1`` and
    ``d2`` are the Euclidean distances from pixel ``x`` to the nearest pixel of the nearest
    and of the second-nearest cell (in physical units when ``spacing`` is given).

    Parameters
    ----------
    labels : ndarray of integers, shape (Y, X) or (Z, Y, X)
        Instance labels: 0 is background, each cell has its own positive id (ids need not
        be consecutive). With ``binary=True``, a 0/1 (or boolean) mask instead.
    w0 : float
        Height of the border term (the paper's 10). 0 leaves only the class weights.
    sigma : float
        Width of the border term, in the units of ``spacing`` (pixels by default; the
        paper's about 5 px).
    class_weights : None, (background, foreground) or mapping
        ``None`` balances the classes of *this* array: ``w_c(k) = N / (K * n_k)`` for the
        ``K`` classes present (background and foreground, foreground being any cell), ``N``
        pixels in all; a single class present gets weight 1. A blockwise caller passes the
        weights of a global pass instead (see :func:`balanced_class_weights`), as a 2-tuple
        or a mapping with keys ``0``/``1`` or ``"background"``/``"foreground"``.
    spacing : float or sequence of float, optional
        Physical size of a pixel per axis (e.g. ``(2.0, 0.5, 0.5)`` for a ZYX stack with
        thicker slices); distances and ``sigma`` are in these units. Default: 1 per axis.
    binary : bool
        Accept a 0/1 mask and make the cells by connected components
        (``scipy.ndimage.label``) with *face* connectivity (4 neighbours in 2-D, 6 in 3-D):
        two cells that meet only at a corner stay two cells, and the diagonal gap between
        them gets a border term, which is the thinnest separation a mask can draw.

    Returns
    -------
    ndarray of float32, the shape of ``labels``

    Notes
    -----
    - The border term is applied on background pixels only, as in the paper's Figure 3d,
      where it lights up the gaps between touching cells; inside a cell ``w = w_c``.
    - With fewer than two cells ``d2`` is infinite and the border term is 0: all background
      gives the background's class weight everywhere (1 with the default balancing).
    - Distances are to cell pixels inside the array; a cell cut by the array's edge is
      measured by the part that is inside.
    - A cell's distance transform is computed only within its bounding box grown by the
      reach ``R = sigma * sqrt(2 * ln(w0 / 1e-6))``, beyond which the border term is below
      1e-6, so the result equals :func:`weight_map_naive` within 1e-6 plus float32
      rounding. Work grows with the number of cells times ``(cell size + 2R)**ndim``, that
      is with the area (or volume) at a given cell density.

    Examples
    --------
    Two cells with a one-pixel gap: in the gap ``d1 = d2 = 1``.

    >>> labels = np.zeros((5, 7), np.uint16)
    >>> labels[1:4, 1:3], labels[1:4, 4:6] = 1, 2
    >>> w = weight_map(labels, class_weights=(1.0, 1.0))
    >>> round(float(w[2, 3]), 4), float(w[2, 1])
    (10.2312, 1.0)
    """
    cells, w0, sigma, class_weights, spacing = _normalise(labels, w0, sigma, class_weights, spacing, binary)
    weights = _class_term(cells, class_weights)
    if w0 > 0:
        d1, d2 = _nearest_two_in_reach(cells, spacing, reach(w0, sigma))
        _add_border_term(weights, cells, d1, d2, w0, sigma)
    return weights


def touching_borders(labels: np.ndarray) -> np.ndarray:
    """The pixels where two instances touch (no background between them), one pixel wide on
    the higher id's side. The paper's labels draw a gap of background between touching cells
    (Fig. 3c), which the border term of eq. 2 then weighs; instance labels drawn without one
    get it here."""
    labels = np.asarray(labels)
    touching = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        low = tuple(slice(None, -1) if i == axis else slice(None) for i in range(labels.ndim))
        high = tuple(slice(1, None) if i == axis else slice(None) for i in range(labels.ndim))
        a, b = labels[low], labels[high]
        differ = (a > 0) & (b > 0) & (a != b)
        touching[low] |= differ & (a > b)
        touching[high] |= differ & (b > a)
    return touching


def with_gaps(labels: np.ndarray) -> np.ndarray:
    """Instance labels with :func:`touching_borders` made background: the gap the paper's
    labels draw between touching cells, which eq. 2's border term then weighs."""
    labels = np.asarray(labels)
    return np.where(touching_borders(labels), labels.dtype.type(0), labels)


def weight_map_naive(
    labels: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: ClassWeights = None,
    spacing: Sequence[float] | float | None = None,
    binary: bool = False,
) -> np.ndarray:
    """:func:`weight_map` by its definition: one distance transform per cell over the whole
    image, the two smallest distances kept per pixel. Time grows with area × cells; it is
    the reference that tests and benchmarks compare with, not for real use."""
    cells, w0, sigma, class_weights, spacing = _normalise(labels, w0, sigma, class_weights, spacing, binary)
    weights = _class_term(cells, class_weights)
    if w0 > 0:
        d1 = np.full(cells.shape, np.inf)
        d2 = np.full(cells.shape, np.inf)
        for cell in np.unique(cells):
            if cell != 0:
                _keep_two_smallest(d1, d2, ndimage.distance_transform_edt(cells != cell, sampling=spacing))
        _add_border_term(weights, cells, d1, d2, w0, sigma)
    return weights


# --- internals ---------------------------------------------------------------------------


def reach(w0: float, sigma: float) -> float:
    """The distance ``R`` beyond which ``w0 * exp(-R**2 / (2 sigma**2))`` < the tolerance."""
    return sigma * math.sqrt(2.0 * max(math.log(w0 / BORDER_TOLERANCE), 0.0))


def _nearest_two_in_reach(
    cells: np.ndarray, spacing: tuple[float, ...], reach: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the two smallest distances to cells, exact wherever the second is <= reach.

    Why a crop is enough: the cell's box grown by ``ceil(reach / spacing)`` pixels per axis
    holds every pixel within ``reach`` of the cell (a pixel outside it is more than
    ``reach`` away along one axis alone), and the distance transform of the crop is exact
    there because the crop holds the whole cell. So at each pixel every cell within
    ``reach`` is seen with its exact distance and only cells farther than ``reach`` are
    missed. If the true ``d2 <= reach``, both nearest cells are seen and ``d1``, ``d2``
    are exact. Otherwise the computed ``d2`` is at least the true one (the minimum of
    fewer values), so both exceed ``reach``, ``d1 + d2 > reach`` for both, and both
    border terms, the naive one and ours, are below ``w0 * exp(-reach**2 / (2 sigma**2))``
    = 1e-6: they differ by less than that.
    """
    d1 = np.full(cells.shape, np.inf)
    d2 = np.full(cells.shape, np.inf)
    grow = tuple(math.ceil(reach / s) for s in spacing)
    for index, bounds in enumerate(ndimage.find_objects(cells), start=1):
        if bounds is None:  # an unused id
            continue
        crop = Box.from_bounds([b.start for b in bounds], [b.stop for b in bounds]).grow(grow).clip(cells.shape)
        window = crop.slices()
        distance = ndimage.distance_transform_edt(cells[window] != index, sampling=spacing)
        _keep_two_smallest(d1[window], d2[window], distance)
    return d1, d2


def _keep_two_smallest(d1: np.ndarray, d2: np.ndarray, distance: np.ndarray) -> None:
    """Update the two smallest values so far (``d1 <= d2``, in place) with ``distance``."""
    np.minimum(d2, np.maximum(d1, distance), out=d2)
    np.minimum(d1, distance, out=d1)


def _class_term(cells: np.ndarray, class_weights: tuple[float, float]) -> np.ndarray:
    """``w_c`` per pixel, float32 and C-contiguous (the border term is added through a flat view)."""
    background, foreground = (np.float32(w) for w in class_weights)
    return np.ascontiguousarray(np.where(cells == 0, background, foreground))


def _add_border_term(
    weights: np.ndarray, cells: np.ndarray, d1: np.ndarray, d2: np.ndarray, w0: float, sigma: float
) -> None:
    """Add the border term on background pixels that have two cells (finite ``d2``)."""
    # One flat index list instead of three boolean-mask passes over the whole image.
    where = np.flatnonzero((cells == 0) & np.isfinite(d2))
    gap = d1.reshape(-1)[where] + d2.reshape(-1)[where]
    weights.reshape(-1)[where] += w0 * np.exp(-(gap * gap) / (2.0 * sigma * sigma))


def _normalise(
    labels: np.ndarray,
    w0: float,
    sigma: float,
    class_weights: ClassWeights,
    spacing: Sequence[float] | float | None,
    binary: bool,
) -> tuple[np.ndarray, float, float, tuple[float, float], tuple[float, ...]]:
    """Check every argument once; return cells (non-negative integer instance labels, ids at
    most the array's size, as ``find_objects`` needs) and the parameters as plain floats."""
    labels = _check_labels(labels, allow_bool=binary)
    w0 = _number("w0", w0, minimum=0.0, strict=False)
    sigma = _number("sigma", sigma, minimum=0.0, strict=True)
    spacing = _spacing(spacing, labels.ndim)
    if binary:
        if labels.dtype != bool and labels.max() > 1:
            raise InputError(
                f"labels: binary=True but the array holds {int(labels.max())}; expected a 0/1 mask "
                "(pass instance labels with binary=False)"
            )
        cells, _ = ndimage.label(labels)  # default structure: face connectivity
    else:
        cells = labels
        if cells.max() > cells.size:  # ids so large that find_objects would list them all
            ids, inverse = np.unique(cells, return_inverse=True)
            cells = inverse.reshape(cells.shape) + (0 if ids[0] == 0 else 1)
    if class_weights is None:
        class_weights = balanced_class_weights(class_frequencies(cells))
    else:
        class_weights = _class_weights(class_weights)
    return cells, w0, sigma, class_weights, spacing


def _check_labels(labels: np.ndarray, allow_bool: bool) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise InputError("labels: a scalar; expected a 2-D or 3-D label image")
    if labels.size == 0:
        raise InputError(f"labels: empty array of shape {labels.shape}")
    if labels.dtype == bool:
        if not allow_bool:
            raise InputError("labels: a boolean mask; pass binary=True to make cells by connected components")
        return labels
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels: {labels.dtype} labels; expected integers (0 = background, cells > 0)")
    if np.issubdtype(labels.dtype, np.signedinteger):
        low = int(labels.min())
        if low < 0:
            raise InputError(f"labels: negative label {low}; expected 0 for background and positive cell ids")
    return labels


def _number(name: str, value: float, minimum: float, strict: bool) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {value!r}; expected a number") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise InputError(f"{name}: {value!r}; expected a finite number {bound}")
    return value


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = np.atleast_1d(np.asarray(spacing, dtype=object))
    if values.ndim != 1 or len(values) not in (1, ndim):
        raise InputError(f"spacing: {spacing!r}; expected one value or {ndim} (one per axis)")
    out = tuple(_number("spacing", v, minimum=0.0, strict=True) for v in values)
    return out * ndim if len(out) == 1 else out


def _class_weights(class_weights: Mapping[int | str, float] | Sequence[float]) -> tuple[float, float]:
    if isinstance(class_weights, Mapping):
        keys = {0: 0, 1: 1, "background": 0, "foreground": 1}
        if not set(class_weights) <= set(keys) or {keys[k] for k in class_weights} != {0, 1} or len(class_weights) != 2:
            raise InputError(
                f"class_weights: keys {sorted(map(str, class_weights))}; expected 0 and 1 "
                "(or 'background' and 'foreground')"
            )
        pair = [0.0, 0.0]
        for key, value in class_weights.items():
            pair[keys[key]] = value
    else:
        pair = list(class_weights) if not isinstance(class_weights, str) else [class_weights]
        if len(pair) != 2:
            raise InputError(f"class_weights: {class_weights!r}; expected (background, foreground)")
    background, foreground = (_number("class_weights", v, minimum=0.0, strict=False) for v in pair)
    return background, foreground
