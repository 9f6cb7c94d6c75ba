"""Quick-look PNGs of an input image beside an overtile prediction.

A preview never holds a full-resolution image: :func:`read_preview` reads every ``step``-th
pixel along y and x straight from Zarr (and only the middle z slice of a volume), so memory
is bounded by ``max_size``, not by the image. Zarr still decompresses every chunk the strided
selection touches, so on a terabyte slide a preview costs one pass over the data; an image
pyramid is the cheap way there once outputs carry one.

matplotlib is imported inside the functions (Agg, through :class:`matplotlib.figure.Figure`,
never pyplot's global state), so importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import storage
from pipeline.errors import InputError

PANEL_DPI = 100


@dataclass(frozen=True)
class PreviewSlice:
    """A downsampled 2-D view of an image, channel first.

    Attributes
    ----------
    data : numpy.ndarray
        ``(C, y, x)`` pixels in the stored dtype: every ``step``-th pixel of the full image.
    step : int
        Stride along y and x (1 means full resolution).
    z : int or None
        Index of the z slice shown for a volume; None for a 2-D image.
    shape : tuple of int
        Full-resolution spatial shape of the image (``(Y, X)`` or ``(Z, Y, X)``).
    """

    data: np.ndarray
    step: int
    z: int | None
    shape: tuple[int, ...]


def preview_step(spatial_shape: tuple[int, ...], max_size: int) -> int:
    """The smallest stride that brings the larger of y and x down to ``max_size`` or less.

    Examples
    --------
    >>> preview_step((8192, 8192), 1024)
    8
    >>> preview_step((200, 300), 1024)
    1
    """
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    return max(1, math.ceil(max(spatial_shape[-2:]) / max_size))


def read_preview(
    source: storage.ImageSource, max_size: int = 1024, z: int | None = None, channel: int | None = None
) -> PreviewSlice:
    """Read a strided 2-D view of an image: the pixels a preview shows, and nothing more.

    Parameters
    ----------
    source : ImageSource
        An opened image (see :func:`pipeline.storage.open_image`); any stored axes.
    max_size : int
        Largest edge of the view in pixels; the stride is ``ceil(max(Y, X) / max_size)``.
    z : int, optional
        Slice of a volume to show; default the middle one. Ignored for 2-D images.
    channel : int, optional
        Read only this channel (e.g. one class of a prediction); default all of them.

    Returns
    -------
    PreviewSlice
        ``data`` is ``(C, y, x)`` in the stored dtype (``C`` is 1 without a channel axis).

    Examples
    --------
    >>> import zarr
    >>> a = zarr.create_array(store={}, shape=(200, 300), chunks=(64, 64), dtype="uint8")
    >>> view = read_preview(storage.ImageSource("memory", a, "yx"), max_size=100)
    >>> view.data.shape, view.step
    ((1, 67, 100), 3)
    """
    shape = source.spatial_shape
    source, factor = source.overview(max_size)  # a pyramid level near the size shown, if any
    step = preview_step(source.spatial_shape, max_size)
    if "z" in source.axes:
        z = shape[0] // 2 if z is None else int(z)
        if not 0 <= z < shape[0]:
            raise ValueError(f"z slice {z} outside the volume's {shape[0]} slices")
    else:
        z = None
    if channel is not None and not 0 <= channel < source.channels:
        raise ValueError(f"channel {channel} outside the image's {source.channels} channels")
    c = slice(None) if channel is None else slice(channel, channel + 1)
    picks: dict[str, int | slice] = {"t": 0, "c": c, "y": slice(None, None, step), "x": slice(None, None, step)}
    if z is not None:
        picks["z"] = z
    # strided basic indexing: zarr decodes chunk by chunk and keeps only the selected pixels
    data = np.asarray(source.array[tuple(picks[a] for a in source.axes)])
    kept = [a for a in source.axes if a in "cyx"]
    data = data.transpose([kept.index(a) for a in ("c", "y", "x") if a in kept])
    if "c" not in kept:
        data = data[None]
    return PreviewSlice(data, max(1, round(step * factor)), z, shape)


def _contrast(plane: np.ndarray) -> tuple[float, float]:
    """Display range of an intensity image: 0.5 and 99.5 percentiles, as microscopists do."""
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _input_image(view: PreviewSlice) -> tuple[np.ndarray, dict[str, Any], str]:
    """What imshow gets for the input: grey for one channel, RGB for three, else channel 0."""
    data = view.data.astype(np.float32)
    if data.shape[0] == 3:
        planes = []
        for plane in data:
            lo, hi = _contrast(plane)
            planes.append(np.clip((plane - lo) / (hi - lo), 0.0, 1.0))
        return np.stack(planes, axis=-1), {}, "RGB"
    lo, hi = _contrast(data[0])
    note = "" if data.shape[0] == 1 else f"channel 0 of {data.shape[0]}"
    return data[0], {"cmap": "gray", "vmin": lo, "vmax": hi}, note


def _shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _where(view: PreviewSlice) -> str:
    parts = [] if view.z is None else [f"z = {view.z}"]
    if view.step > 1:
        parts.append(f"stride {view.step}")
    return ", ".join(parts)


def output_kind(prediction_url: str) -> str:
    """``"probabilities"`` or ``"labels"``, from the ``overtile`` attributes of a prediction."""
    try:
        attrs = dict(zarr.open_group(store=str(prediction_url), mode="r").attrs)
    except Exception:
        raise InputError(f"{prediction_url}: not an overtile prediction (no Zarr group)") from None
    kind = attrs.get("overtile", {}).get("output_kind")
    if kind not in ("probabilities", "labels"):
        raise InputError(f"{prediction_url}: no overtile output_kind in its attributes; not an overtile prediction")
    return kind


def preview_png(
    image_url: str,
    prediction_url: str,
    out_png: str | os.PathLike,
    axes: str | None = None,
    max_size: int = 1024,
) -> Path:
    """Write a PNG of the input image (grey) beside its overtile prediction.

    Probabilities show the foreground, class 1 (class 0 when there is one class), on a
    0–1 colour scale with a colour bar; blocks not yet written (NaN) show white. Labels show
    in a categorical colour map. A volume shows its middle z slice. Both are read strided
    (see :func:`read_preview`), never at full resolution.

    Parameters
    ----------
    image_url : str
        The input image: a Zarr array or an OME-Zarr image.
    prediction_url : str
        An overtile output: an OME-Zarr group whose array ``0`` is ``(classes, [Z,] Y, X)``
        probabilities (float32, float16, or uint8 holding ``round(255·p)``) or
        ``(1, [Z,] Y, X)`` uint8 labels, with ``{"overtile": {"output_kind": ...}}`` in its
        attributes.
    out_png : str or path-like
        The PNG to write; its folder is created.
    axes : str, optional
        Axes of a plain input array, as for ``overtile predict --axes``.
    max_size : int
        Largest edge, in pixels, of each panel's data.

    Returns
    -------
    pathlib.Path
        The PNG written.

    Raises
    ------
    InputError
        Either input cannot be read, or their spatial shapes differ.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    source = storage.open_image(image_url, axes)
    prediction = storage.open_image(prediction_url)
    kind = output_kind(prediction_url)
    if prediction.spatial_shape != source.spatial_shape:
        raise InputError(
            f"{prediction_url}: prediction is {_shape_text(prediction.spatial_shape)} px, "
            f"the image {image_url} is {_shape_text(source.spatial_shape)} px"
        )
    image_view = read_preview(source, max_size)
    # the foreground class only: a many-class prediction costs one channel's read, not all
    k = 0 if kind == "labels" or prediction.channels == 1 else 1
    pred_view = read_preview(prediction, max_size, image_view.z, channel=k)

    image, image_kw, image_note = _input_image(image_view)
    image_title = f"{Path(str(image_url).rstrip('/')).name}\n{_shape_text(source.array.shape)} {source.dtype}"
    pred_title = f"{Path(str(prediction_url).rstrip('/')).name}\n{_shape_text(prediction.array.shape)} {prediction.dtype}"

    if kind == "labels":
        labels = pred_view.data[0]
        n = max(2, int(labels.max()) + 1)
        cmap = ListedColormap(["#000000", *_categorical(n - 1)], name="labels")  # background black
        pred_kw: dict[str, Any] = {"cmap": cmap, "norm": BoundaryNorm(np.arange(n + 1) - 0.5, n), "interpolation": "nearest"}
        shown, bar_label, ticks = labels, "label (argmax class)", list(range(n)) if n <= 20 else None
        pred_note = "labels"
    else:
        p = pred_view.data[0].astype(np.float32)
        if prediction.dtype == np.uint8:
            p /= 255.0
        cmap = _colormap("magma").with_extremes(bad="white")
        shown = np.ma.masked_invalid(p)
        pred_kw = {"cmap": cmap, "vmin": 0.0, "vmax": 1.0}
        bar_label, ticks = f"P(class {k})", None
        pred_note = f"P(class {k})"

    h, w = image.shape[:2]
    # about one screen pixel per preview pixel, but never a postage stamp; the longer edge
    # sets the size (a tall, narrow image sized by its width would be metres high)
    longest = max(max(h, w) / PANEL_DPI, 4.0)
    panel_w, panel_h = max(longest * w / max(h, w), 2.0), max(longest * h / max(h, w), 2.0)  # room for titles, axes
    fig = Figure(figsize=(2 * panel_w + 1.2, panel_h + 1.1), dpi=PANEL_DPI, layout="constrained")
    font = 10 if panel_w < 6 else 13
    ax_image, ax_pred = fig.subplots(1, 2, sharex=True, sharey=True)
    extent = (0, w * image_view.step, h * image_view.step, 0)  # axes in full-resolution px
    ax_image.imshow(image, extent=extent, interpolation="nearest", **image_kw)
    ax_image.set_title(", ".join(s for s in (image_title, image_note, _where(image_view)) if s), fontsize=font)
    im = ax_pred.imshow(shown, extent=extent, **{"interpolation": "nearest", **pred_kw})
    ax_pred.set_title(", ".join(s for s in (pred_title, pred_note, _where(pred_view)) if s), fontsize=font)
    bar = fig.colorbar(im, ax=ax_pred, shrink=0.8, label=bar_label)
    if ticks is not None:
        bar.set_ticks(ticks)
    for ax in (ax_image, ax_pred):
        ax.set_xlabel("x (px)")
    ax_image.set_ylabel("y (px)")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].copy()


def _categorical(n: int) -> list[tuple[float, ...]]:
    """``n`` distinct colours: tab10, then tab20, then a sampled hsv for many classes."""
    for name, size in (("tab10", 10), ("tab20", 20)):
        if n <= size:
            return list(_colormap(name).colors[:n])
    hsv = _colormap("hsv")
    return [hsv(i / n) for i in range(n)]


def weights_png(
    labels_url: str, weights_url: str, out_png: str | os.PathLike, axes: str | None = None, max_size: int = 1024
) -> Path:
    """Write a PNG like the paper's Figure 3: the cells beside their weight map with a colour bar.

    Cells show in random colours on black (background), the weight map in ``jet`` as in the
    paper. Both are read strided (see :func:`read_preview`); a volume shows its middle slice.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    labels_view = read_preview(storage.open_image(labels_url, axes), max_size)
    weights_view = read_preview(storage.open_image(weights_url), max_size, labels_view.z)
    cells = labels_view.data[0].astype(np.int64)
    rng = np.random.default_rng(0)
    colours = ListedColormap(np.vstack([[0, 0, 0, 1], np.c_[rng.uniform(0.25, 1, (255, 3)), np.ones(255)]]))
    shown = np.where(cells > 0, (cells - 1) % 255 + 1, 0)

    h, w = cells.shape
    panel_w = max(w / PANEL_DPI, 4.0)
    fig = Figure(figsize=(2 * panel_w + 1.2, panel_w * h / w + 1.1), dpi=PANEL_DPI, layout="constrained")
    ax_cells, ax_weights = fig.subplots(1, 2, sharex=True, sharey=True)
    extent = (0, w * labels_view.step, h * labels_view.step, 0)
    ax_cells.imshow(shown, cmap=colours, vmin=0, vmax=255, extent=extent, interpolation="nearest")
    ax_cells.set_title(f"{Path(str(labels_url).rstrip('/')).name}: {len(np.unique(cells)) - 1} cells shown {_where(labels_view)}")
    im = ax_weights.imshow(weights_view.data[0], cmap="jet", extent=extent, interpolation="nearest")
    ax_weights.set_title(f"{Path(str(weights_url).rstrip('/')).name}: weight map w(x) {_where(weights_view)}")
    fig.colorbar(im, ax=ax_weights, shrink=0.8, label="w(x)")
    for ax in (ax_cells, ax_weights):
        ax.set_xlabel("x (px)")
    ax_cells.set_ylabel("y (px)")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def objects_png(
    image_url: str | None, labels_url: str, areas: np.ndarray, out_png: str | os.PathLike, axes: str | None = None,
    max_size: int = 1024,
) -> Path:
    """Write a PNG of the objects' outlines over the image (a random colour per object) beside
    a histogram of their sizes. The labels are read strided, so outlines are those of the
    view (a slide's preview shows where the cells are, not each pixel of them)."""
    from matplotlib.figure import Figure
    from skimage.segmentation import find_boundaries

    labels_view = read_preview(storage.open_image(labels_url), max_size)
    cells = labels_view.data[0].astype(np.int64)
    if image_url is not None:
        image, image_kw, _ = _input_image(read_preview(storage.open_image(image_url, axes), max_size, labels_view.z))
    else:
        image, image_kw = np.zeros(cells.shape, np.float32), {"cmap": "gray", "vmin": 0, "vmax": 1}
    rng = np.random.default_rng(0)
    palette = np.vstack([[0, 0, 0, 0], np.c_[rng.uniform(0.3, 1, (255, 3)), np.ones(255)]])
    edges = find_boundaries(cells, mode="inner") & (cells > 0)
    overlay = np.where(edges[..., None], palette[(cells - 1) % 255 + 1], 0.0)
    h, w = cells.shape
    panel_w = max(w / PANEL_DPI, 4.0)
    fig = Figure(figsize=(2 * panel_w + 1.2, panel_w * h / w + 1.1), dpi=PANEL_DPI, layout="constrained")
    ax_image, ax_sizes = fig.subplots(1, 2)
    extent = (0, w * labels_view.step, h * labels_view.step, 0)
    ax_image.imshow(image, extent=extent, interpolation="nearest", **image_kw)
    ax_image.imshow(overlay, extent=extent, interpolation="nearest")
    ax_image.set_title(f"{Path(str(labels_url).rstrip('/')).name}: outlines {_where(labels_view)}")
    ax_image.set_xlabel("x (px)")
    ax_image.set_ylabel("y (px)")
    areas = np.asarray(areas)
    if areas.size:
        bins = np.logspace(0, np.log10(max(2, areas.max())) + 0.05, 40)
        ax_sizes.hist(areas, bins=bins, color="#4c72b0")
        ax_sizes.set_xscale("log")
        ax_sizes.axvline(float(np.median(areas)), color="k", lw=1, ls="--", label=f"median {np.median(areas):.0f} px")
        ax_sizes.legend()
    ax_sizes.set_title(f"{areas.size:,} objects: size")
    ax_sizes.set_xlabel("area (px)")
    ax_sizes.set_ylabel("objects")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
