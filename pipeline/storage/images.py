"""Zarr and OME-Zarr at the edge: open inputs with their axes, create block-aligned outputs.

Inputs are plain Zarr arrays (format 2 or 3) with an explicit axes string, or OME-Zarr
images (NGFF 0.4 with metadata at the top level, 0.5 under the ``ome`` key) whose axes come
from the metadata. Everything inside overtile sees images channel first, ``(C, *spatial)``
with spatial axes ``yx`` or ``zyx``; :meth:`ImageSource.read` does the transposing.

Outputs are OME-Zarr 0.5 images (Zarr format 3): a group with multiscales metadata and the
full-resolution array ``0``, laid out so that no two tasks ever write the same object: chunked
like the processing blocks, or sharded with one shard per block and smaller chunks inside it
(:func:`output_layout`; the default on object stores, where every object costs a request).
URLs may be local paths or anything fsspec understands (``memory://``, ``s3://``, ...).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.errors import InputError
from pipeline.numerics.geometry import Box

AXES_CHOICES = ("yx", "cyx", "zyx", "czyx", "yxc", "zyxc")
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
OME_VERSION = "0.5"
# lz4 with byte shuffle: about 1.6x faster than zarr's default zstd on float probability
# blocks and a little smaller, so writing stays a small fraction of a block's time
OUTPUT_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# Chunk edge inside a sharded output: 512² pixels in 2-D, 64³ voxels in 3-D (256 Ki either
# way), about what a viewer shows in one screen tile, where a 2048² block would be 16 times that.
SHARD_CHUNK = {2: 512, 3: 64}


def is_url(path: str) -> bool:
    return "://" in str(path)


def is_object_store(url: str) -> bool:
    """Whether ``url`` is on an object store (``s3://``, ``gs://``, ``memory://``, ...): any
    scheme but ``file://``. There every chunk is an object, a request and a listing entry of
    its own, so outputs are sharded by default (:func:`output_layout`)."""
    return is_url(url) and not str(url).startswith("file://")


def output_layout(shape: Sequence[int], block: Sequence[int], spatial: int, sharded: bool,
                  chunk_size: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The chunks and shards (None: unsharded) of an output that tasks write block by block.

    ``shape`` and ``block`` are the array's, leading axes (channels) included, which a block
    holds whole; the last ``spatial`` axes are the image's. Unsharded, the chunks are the
    blocks, unless ``chunk_size`` asks for smaller ones (each block then writes several whole
    chunks). Sharded, each block is one shard (one object) holding chunks of ``chunk_size``
    along the spatial axes: a viewer reads a chunk, a task writes a shard, and no two tasks
    ever write the same shard. A chunk must divide the block, except along an axis that one
    block spans; there the shard rounds up to whole chunks (past the array's edge, which
    Zarr allows). The default chunk is :data:`SHARD_CHUNK`, or the largest divisor of the
    block edge below it (down to a quarter of it; else the block edge).

    Examples
    --------
    >>> output_layout((2, 5000, 5000), (2, 2048, 2048), 2, sharded=True)
    ((2, 512, 512), (2, 2048, 2048))
    >>> output_layout((2, 1000, 5000), (2, 1000, 2048), 2, sharded=True)
    ((2, 512, 512), (2, 1024, 2048))
    >>> output_layout((1, 600, 600), (1, 256, 256), 2, sharded=False)
    ((1, 256, 256), None)
    >>> output_layout((1, 600, 600), (1, 256, 256), 2, sharded=False, chunk_size=64)
    ((1, 64, 64), None)
    """
    if not sharded and chunk_size is None:
        return tuple(block), None
    lead = len(shape) - spatial
    chunks, shards = list(block[:lead]), list(block[:lead])
    default = SHARD_CHUNK[spatial]
    for n, b in zip(shape[lead:], block[lead:]):
        spans = b >= n  # one block along this axis: its shard may round up past the edge
        if chunk_size or spans:
            c = min(chunk_size or default, b)
        else:
            c = next((d for d in range(min(default, b), default // 4 - 1, -1) if b % d == 0), b)
        if not spans and b % c:
            raise InputError(f"--chunk-size {chunk_size}: does not divide the block edge {b} (every block must "
                             f"hold whole chunks); choose a divisor of it, e.g. {b // 4 if b % 4 == 0 else b}")
        chunks.append(c)
        shards.append(-(-b // c) * c)
    return tuple(chunks), (tuple(shards) if sharded else None)


def write_unit(array: zarr.Array) -> tuple[int, ...]:
    """What one task writes whole, clipped to the array: its shards when it is sharded (a
    shard may reach past the array's edge), else its chunks."""
    return tuple(min(int(u), int(n)) for u, n in zip(array.shards or array.chunks, array.shape))


def absolute(path: str) -> str:
    """A local path made absolute (worker processes may run elsewhere); a URL without the
    trailing slashes that would make ``s3://b/x.zarr/`` another run than ``s3://b/x.zarr``."""
    if not is_url(path):
        return os.path.abspath(path)
    scheme, sep, rest = str(path).partition("://")
    return f"{scheme}{sep}{rest.rstrip('/')}" if rest.strip("/") else str(path)


def _open_node(url: str) -> zarr.Array | zarr.Group:
    if not is_url(url) and not os.path.exists(url):
        raise InputError(f"{url}: no such file or directory")
    try:
        return zarr.open(store=url, mode="r")
    except (zarr.errors.NodeNotFoundError, FileNotFoundError):
        raise InputError(f"{url}: not a Zarr array or group (no zarr.json or .zarray found)") from None
    except Exception as exc:
        raise InputError(f"{url}: cannot be opened as Zarr ({type(exc).__name__}: {exc})") from None


def ome_metadata(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The first multiscales entry of NGFF 0.5 (``attrs["ome"]``) or 0.4 (top-level) metadata."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        return None
    return multiscales[0]


def _axes_from_ome(ms: dict[str, Any]) -> str:
    names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    return "".join(str(n).lower() for n in names)


def scale_from_ome(ms: dict[str, Any], level: int = 0) -> list[float] | None:
    """The pixel size per axis of a dataset (its ``scale`` transformation), None if unset."""
    return _transform_from_ome(ms, level, "scale")


def translation_from_ome(ms: dict[str, Any], level: int = 0) -> list[float] | None:
    """Where a dataset's first pixel centre lies per axis (its ``translation``), None if unset."""
    return _transform_from_ome(ms, level, "translation")


def _transform_from_ome(ms: dict[str, Any], level: int, kind: str) -> list[float] | None:
    for t in ms["datasets"][level].get("coordinateTransformations", []):
        if t.get("type") == kind and kind in t:
            return [float(s) for s in t[kind]]
    return None


def level_translation(scale0: Sequence[float], translation0: Sequence[float], factors: Sequence[float],
                      kind: str) -> list[float]:
    """The translation of a level made from level 0 (pixel size ``scale0``, first pixel centre at
    ``translation0``) by downsampling each axis by ``factors``. ``kind`` ``"mean"``: each pixel
    averages a window of ``factor`` level-0 pixels, so its centre is that window's, ``(factor -
    1) / 2`` level-0 pixels on; ``"nearest"``: each is the window's first pixel, centred there."""
    if kind == "nearest":
        return [float(t) for t in translation0]
    return [float(t + s * (f - 1) / 2) for s, t, f in zip(scale0, translation0, factors)]


@dataclass
class ImageSource:
    """An input image: a Zarr array plus the meaning of its axes.

    ``axes`` describes the stored array (e.g. ``"yxc"`` for an RGB slide, ``"tczyx"`` from
    OME-Zarr); reads come back channel first, ``(C, *spatial)``.
    """

    url: str
    array: zarr.Array
    axes: str
    scale: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    levels: list[Any] = field(default_factory=list, repr=False)  # lower-resolution arrays, finer first
    origin: dict[str, float] = field(default_factory=dict)  # the first pixel's centre per axis (OME translation)

    def placement(self, channel: bool) -> tuple[list[float], list[float]]:
        """Scale and translation of an output on this image's pixel grid, axes ``c`` (when
        ``channel``) and then the spatial ones: what keeps it over the image in a viewer."""
        lead = [1.0] if channel else []
        zero = [0.0] if channel else []
        return (lead + [self.scale.get(a, 1.0) for a in self.spatial_axes],
                zero + [self.origin.get(a, 0.0) for a in self.spatial_axes])

    def overview(self, min_edge: int) -> tuple["ImageSource", float]:
        """The coarsest stored level of a 2-D image whose larger edge is still at least
        ``min_edge`` (level 0 when there is none), and its downsampling factor: where
        previews and tissue masks read, instead of striding through the full resolution."""
        if len(self.spatial_shape) != 2 and self.spatial_shape[0] != 1:  # (one z slice is an image)
            return self, 1.0
        best, factor = self, 1.0
        full = max(self.spatial_shape)
        for array in self.levels:
            level = ImageSource(self.url, array, self.axes, self.scale, self.units, origin=self.origin)
            if array.ndim == self.array.ndim and max(level.spatial_shape) >= min_edge:
                best, factor = level, full / max(level.spatial_shape)
        return best, factor

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in "zyx")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[self.axes.index(a)] for a in self.spatial_axes)

    @property
    def channels(self) -> int:
        return self.array.shape[self.axes.index("c")] if "c" in self.axes else 1

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def read(self, box: Box) -> np.ndarray:
        """The pixels of ``box`` (inside the image), channel first ``(C, *box.shape)``; chunks
        whose bytes do not decode are the input's fault (an :class:`InputError` naming it)."""
        try:
            return self.read_stored(box)
        except (RuntimeError, ValueError, EOFError, zlib.error) as exc:  # what codecs raise on damaged bytes
            if not _raised_by_a_codec(exc):  # an event loop's or a program's error: not the input's
                raise
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # (network errors are OSErrors)
            raise InputError(f"{self.url}: stored chunks under {box} do not decode ({type(exc).__name__}: "
                             f"{text[:200]}); the array is damaged there") from None

    def read_stored(self, box: Box) -> np.ndarray:
        """:meth:`read` without naming what does not decode (a subclass says it its own way)."""
        spatial = dict(zip(self.spatial_axes, box.slices()))
        index = tuple(spatial.get(a, slice(None) if a == "c" else 0) for a in self.axes)
        data = np.asarray(self.array[index])
        kept = [a for a in self.axes if a != "t"]
        order = ["c"] + list(self.spatial_axes) if "c" in kept else list(self.spatial_axes)
        data = data.transpose([kept.index(a) for a in order])
        return data if "c" in kept else data[None]


    def to_dask(self) -> Any:
        """The image as a lazy dask array, channel first ``(C, *spatial)``, chunked as stored."""
        import dask.array as da

        array = da.from_zarr(self.array)
        array = array[tuple(0 if a == "t" else slice(None) for a in self.axes)]
        kept = [a for a in self.axes if a != "t"]
        order = (["c"] if "c" in kept else []) + list(self.spatial_axes)
        array = array.transpose([kept.index(a) for a in order])
        return array if "c" in kept else array[None]


def _check_axes(url: str, axes: str, ndim: int) -> str:
    axes = axes.lower()
    if len(axes) != ndim:
        raise InputError(f"{url}: axes {axes!r} do not match the array's {ndim} dimensions")
    if len(set(axes)) != len(axes) or set(axes) - set("tczyx") or not {"y", "x"} <= set(axes):
        raise InputError(f"{url}: axes {axes!r} are not valid; use letters from t, c, z, y, x with y and x (e.g. {', '.join(AXES_CHOICES)})")
    return axes


def open_zarr_image(url: str, axes: str | None = None, allow_bool: bool = False) -> ImageSource:
    """A Zarr array, or an OME-Zarr image group (its full-resolution level), opened for reading
    with every up-front check; what :func:`pipeline.storage.open_image` does for Zarr inputs
    (its docstring says what the arguments mean and what is refused)."""
    url = str(url)
    node = _open_node(url)
    scale: dict[str, float] = {}
    origin: dict[str, float] = {}
    units: dict[str, str] = {}
    levels: list[Any] = []
    if isinstance(node, zarr.Group):
        ms = ome_metadata(dict(node.attrs))
        if ms is None:
            raise InputError(
                f"{url}: a Zarr group without OME-Zarr multiscales metadata; "
                f"give the array inside it (members: {', '.join(sorted(node.keys())) or 'none'})"
            )
        ome_axes = _axes_from_ome(ms)
        path = ms["datasets"][0]["path"]
        try:
            array = node[path]
        except KeyError:
            raise InputError(f"{url}: OME-Zarr metadata names dataset {path!r}, which is missing") from None
        # "zyx" for a czyx image of one channel says the same (as ingest writes a stack)
        alone = "".join(a for a, n in zip(ome_axes, array.shape) if not (a in "tc" and n == 1))
        if axes is not None and axes.lower() not in (ome_axes, alone):
            raise InputError(f"{url}: axes {axes!r} given, but its OME-Zarr metadata says {ome_axes!r}")
        axes = ome_axes
        levels = [node[d["path"]] for d in ms["datasets"][1:] if d["path"] in node]
        values = scale_from_ome(ms)
        if values and len(values) == len(ome_axes):
            scale = dict(zip(ome_axes, values))
        values = translation_from_ome(ms)
        if values and len(values) == len(ome_axes):
            origin = dict(zip(ome_axes, values))
        for a in ms.get("axes", []):
            if isinstance(a, dict) and a.get("unit"):
                units[a["name"].lower()] = a["unit"]
    else:
        array = node
        if axes is None:
            if array.ndim != 2:
                raise InputError(
                    f"{url}: a {array.ndim}-D array; say what its axes are with --axes "
                    f"(one of {', '.join(AXES_CHOICES)})"
                )
            axes = "yx"
    source = checked_source(url, array, axes, scale, units, allow_bool)
    source.levels = levels
    source.origin = origin
    return source


def checked_source(url: str, array: Any, axes: str, scale: dict[str, float] | None = None,
                   units: dict[str, str] | None = None, allow_bool: bool = False) -> ImageSource:
    """An :class:`ImageSource` for ``array`` with stored ``axes``, after the checks every
    input gets (axes fit, dtype, not empty, one time point, 2-D or 3-D)."""
    axes = _check_axes(url, axes, array.ndim)
    dtype = np.dtype(array.dtype)
    if dtype.kind not in ("uifb" if allow_bool else "uif"):
        raise InputError(f"{url}: unsupported dtype {dtype}; expected integers or floats")
    if 0 in array.shape:
        raise InputError(f"{url}: the array is empty (shape {tuple(array.shape)})")
    if "t" in axes and array.shape[axes.index("t")] != 1:
        raise InputError(f"{url}: {array.shape[axes.index('t')]} time points; overtile reads one (t must have size 1)")
    spatial = "".join(a for a in axes if a in "zyx")
    if spatial not in ("yx", "zyx"):
        raise InputError(f"{url}: spatial axes {spatial!r}; expected 'yx' or 'zyx'")
    return ImageSource(url, array, axes, dict(scale or {}), dict(units or {}))


def multiscales(axes: str, scales: Sequence[Sequence[float]], name: str, units: dict[str, str] | None = None,
                translations: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """NGFF multiscales metadata for datasets ``"0"``, ``"1"``, ... with the given scales, and
    translations where given and not all zero (after the scale, as NGFF orders them)."""
    units = units or {}
    translations = translations or [[0.0] * len(axes)] * len(scales)
    return {
        "name": name,
        "axes": [
            {"name": a, "type": AXIS_TYPES[a], **({"unit": units[a]} if a in units else {})}
            for a in axes
        ],
        "datasets": [
            {"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": list(map(float, s))},
                *([{"type": "translation", "translation": list(map(float, t))}] if any(t) else []),
            ]}
            for i, (s, t) in enumerate(zip(scales, translations, strict=True))
        ],
    }


def _holds_anything(url: str) -> bool:
    """Whether anything is stored at ``url``: a file, or a folder or prefix that lists entries."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)  # (s3fs answers from listings this process made earlier)
    try:
        return bool(fs.ls(path, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return False


def _exists(url: str) -> bool:
    try:
        zarr.open(store=url, mode="r")
        return True
    except (zarr.errors.NodeNotFoundError, FileNotFoundError):
        return False


CODEC_CODE = ("numcodecs", f"zarr{os.sep}codecs{os.sep}", "imagecodecs", "gzip.py", "zlib")


def _raised_by_a_codec(exc: BaseException) -> bool:
    """Whether ``exc`` came from decoding stored bytes (a codec's frame on its traceback)."""
    tb = exc.__traceback__
    while tb is not None:
        if any(part in tb.tb_frame.f_code.co_filename for part in CODEC_CODE):
            return True
        tb = tb.tb_next
    return False


def _place(url: str) -> str:
    """Where ``url`` is, spelled one way: ``file:///x`` and ``/x`` alike, links resolved."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError):  # an unknown protocol: its spelling is all there is
        return url.rstrip("/")
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return "file://" + os.path.realpath(path)
    return f"{protocol}://{path.rstrip('/')}"


def check_output(url: str, shape: Sequence[int], dtype: np.dtype | str, overwrite: bool,
                 reads: Sequence[str | None] = ()) -> bool:
    """Say whether an output already exists; raise if it does and cannot be reused.

    An existing output must be an overtile OME-Zarr image of the same shape and dtype, unless
    ``overwrite`` is set. It may never be, or hold, what the run ``reads`` (its input): an
    overwrite would delete that first. Nothing is changed here.
    """
    url = str(url)
    out = _place(url)
    for read in filter(None, reads):
        place = _place(str(read))
        if place == out or place.startswith(out + "/"):
            raise InputError(f"{url}: holds {read}, which this run reads; choose another output")
        inside = out.removeprefix(place + "/") if out.startswith(place + "/") else None
        if inside is not None and not (inside.startswith("labels/") and inside.count("/") == 1):
            raise InputError(f"{url}: is inside {read}, which this run reads; choose another output "
                             f"(only IMAGE/labels/NAME goes inside an image)")
    if not _exists(url):
        if _holds_anything(url):  # a folder or prefix of other things: never replaced, with --overwrite neither
            raise InputError(f"{url}: exists and is not a Zarr image; overtile would replace everything in it, so "
                             f"choose another output (or remove it yourself)")
        return False
    if overwrite:
        return True
    try:
        array = zarr.open_group(store=url, mode="r")["0"]
    except Exception:
        raise InputError(f"{url}: exists and is not an overtile output; pass --overwrite to replace it") from None
    if tuple(array.shape) != tuple(shape) or np.dtype(array.dtype) != np.dtype(dtype):
        raise InputError(
            f"{url}: existing output has shape {tuple(array.shape)} {array.dtype}, this run makes "
            f"{tuple(shape)} {np.dtype(dtype)}; pass --overwrite to replace it"
        )
    return True


def create_image(
    url: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype | str,
    axes: str,
    *,
    name: str = "prediction",
    scale: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    units: dict[str, str] | None = None,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
    shards: Sequence[int] | None = None,
) -> zarr.Array:
    """Create (or reopen) an OME-Zarr image with its full-resolution array ``0``.

    ``chunks`` and ``shards`` as :func:`output_layout` makes them (``shards`` None:
    unsharded, each chunk an object of its own). With ``overwrite`` the group is replaced;
    otherwise an existing group of the same shape is reopened with the layout it has (see
    :func:`check_output`), which is how reruns resume.
    """
    url = str(url)
    if not overwrite and _exists(url):
        return zarr.open_group(store=url, mode="r+")["0"]
    group = zarr.open_group(store=url, mode="w", zarr_format=3)
    fill = 0 if np.dtype(dtype).kind in "ui" else np.nan if np.dtype(dtype).kind == "f" else 0
    array = group.create_array(
        "0", shape=tuple(shape), chunks=tuple(chunks), shards=tuple(shards) if shards else None, dtype=dtype,
        fill_value=fill, dimension_names=list(axes), compressors=[OUTPUT_CODEC],
    )
    scale = list(scale) if scale is not None else [1.0] * len(axes)
    translation = list(translation) if translation is not None else [0.0] * len(axes)
    group.attrs.update({"ome": {"version": OME_VERSION, "multiscales": [multiscales(axes, [scale], name, units, [translation])]},
                        **(attrs or {})})
    return array


def label_parent(image_url: str, output_url: str) -> str | None:
    """The OME-Zarr image ``output_url`` is a label image of (``IMAGE/labels/NAME``), else None."""
    image, output = str(image_url).rstrip("/"), str(output_url).rstrip("/")
    prefix = image + "/labels/"
    if not output.startswith(prefix) or "/" in output[len(prefix):]:
        return None
    try:
        node = zarr.open(store=image, mode="r")
    except Exception:
        return None
    if not (isinstance(node, zarr.Group) and ome_metadata(dict(node.attrs))):
        return None
    if node.metadata.zarr_format != 3:
        raise InputError(f"{output_url}: labels go into OME-Zarr 0.5 (Zarr v3) images; {image} is Zarr v2 "
                         f"(NGFF 0.4): convert it, or write the labels to an image of their own")
    return image


def register_label(image_url: str, label_url: str, classes: int) -> None:
    """Make ``label_url`` an NGFF label image of ``image_url``: ``image-label`` metadata with a
    colour per class (0 transparent), listed in ``IMAGE/labels``, so viewers overlay it."""
    import colorsys

    name = str(label_url).rstrip("/").rsplit("/", 1)[1]
    label = zarr.open_group(store=str(label_url), mode="r+")
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    for k in range(1, classes):
        r, g, b = colorsys.hsv_to_rgb((k - 1) / max(1, classes - 1) * 0.8, 0.9, 1.0)
        colors.append({"label-value": k, "rgba": [int(255 * r), int(255 * g), int(255 * b), 160]})
    ome = dict(label.attrs.get("ome", {}))
    ome["image-label"] = {"colors": colors, "source": {"image": "../../"}}
    label.attrs["ome"] = ome
    labels = zarr.open_group(store=f"{str(image_url).rstrip('/')}/labels", mode="a", zarr_format=3)
    listed = dict(labels.attrs.get("ome", {}))
    names = list(listed.get("labels", []))
    if name not in names:
        names.append(name)
    labels.attrs["ome"] = {"version": OME_VERSION, **listed, "labels": names}


def unlist_label(image_url: str, label_url: str) -> None:
    """Take ``label_url`` out of ``IMAGE/labels``'s list (its group was removed)."""
    name = str(label_url).rstrip("/").rsplit("/", 1)[1]
    try:
        labels = zarr.open_group(store=f"{str(image_url).rstrip('/')}/labels", mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return
    listed = dict(labels.attrs.get("ome", {}))
    if name in listed.get("labels", []):
        labels.attrs["ome"] = {**listed, "labels": [n for n in listed["labels"] if n != name]}


def open_output(url: str, path: str = "0") -> zarr.Array:
    return zarr.open_group(store=str(url), mode="r+")[path]
