"""Whole-slide images and pictures at the edge: read them in place by region, or ingest them.

Slides (Aperio SVS, Hamamatsu NDPI, OME-TIFF, Leica SCN, Ventana BIF and other tiled or
pyramidal TIFFs) are opened with tifffile: ``TiffFile(...).series[0].aszarr()`` exposes every
pyramid level as a Zarr array whose chunks are the file's own tiles (or strips), so a read
decodes only the tiles that a region touches. PNG and JPEG pictures cannot be read by
region; they are read whole (with imageio) and are meant for small images.

:func:`open_slide` gives a :class:`Slide` (levels, axes, physical pixel size);
:func:`open_source` is what :func:`pipeline.storage.open_image` calls for a TIFF, so that
``overtile predict`` reads a slide without converting it. :func:`ingest` converts a slide to
an OME-Zarr 0.5 image with every pyramid level as a multiscales dataset, block by block:
memory is bounded by the block size, not by the slide, and a ledger makes reruns resume.

A truncated or damaged file gives one :class:`InputError` naming the file and what is wrong,
when it is opened where the file's structure shows it (tifffile reports a broken IFD chain,
tag values or tiles past the end of the file), else when the damaged tile is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import execute, storage
from pipeline.errors import InputError
from pipeline.geometry import Box, block_grid, iter_blocks

TIFF_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".scn", ".bif", ".qptiff", ".btf", ".tf2", ".tf8")  # .ome.tif(f) too
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# tifffile's axis letters: S = samples of a pixel (RGB), C = channels, I/Q = unnamed page stacks
TIFF_AXES = {"S": "c", "C": "c", "T": "t", "Z": "z", "Y": "y", "X": "x"}
# NGFF units are UDUNITS-2 names; OME-XML and ImageJ write symbols
UNITS = {"µm": "micrometer", "μm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
         "micrometer": "micrometer", "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter",
         "millimeter": "millimeter", "cm": "centimeter", "centimeter": "centimeter", "m": "meter", "meter": "meter",
         "Å": "angstrom", "angstrom": "angstrom", "pm": "picometer"}
MICROMETER = "micrometer"
# TIFF ResolutionUnit (2 inch, 3 cm; 4 mm and 5 µm are tifffile's extensions) in micrometers
RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
# Image writers stamp 72, 96, 150 or 300 dpi on everything; those are not a measurement. A
# resolution counts as a pixel size only when it is finer than 600 dpi (pixels < 42 µm).
MAX_PIXEL_UM = 25400.0 / 600


# --- reading ---------------------------------------------------------------------------


def is_tiff(url: str) -> bool:
    """Whether ``url`` names a TIFF-based file: by its suffix, or, for a local file with
    another name, by the TIFF magic bytes at its start. Zarr stores (folders) are not."""
    url = str(url)
    if not storage.is_url(url) and os.path.isdir(url):
        return False  # a Zarr store, whatever its name
    if url.lower().rstrip("/").endswith(TIFF_SUFFIXES):
        return True
    if storage.is_url(url) or not os.path.isfile(url):
        return False
    with open(url, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def is_picture(url: str) -> bool:
    return str(url).lower().endswith(PICTURE_SUFFIXES)


@dataclass
class Slide:
    """An opened slide or picture: its pyramid levels as arrays readable by region.

    ``levels[0]`` is full resolution; every level has the stored axes ``axes`` (``"yxc"``
    for an RGB slide, ``"yx"`` for grey, ``"cyx"`` for a multi-channel OME-TIFF).
    ``pixel_size`` is level 0's physical pixel size per spatial axis in ``units`` (empty
    where the file does not say). Levels are Zarr arrays over the file's tiles (TIFF) or
    numpy arrays (PNG, JPEG). Use as a context manager, or call :meth:`close`.
    """

    url: str
    kind: str
    levels: list[Any]
    axes: str
    pixel_size: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    _files: tuple[Any, ...] = field(default=(), repr=False)  # closed by close()
    _sources: dict[int, storage.ImageSource] = field(default_factory=dict, repr=False)

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in "zyx")

    @property
    def channels(self) -> int:
        return self.levels[0].shape[self.axes.index("c")] if "c" in self.axes else 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.levels[0].dtype)

    def spatial_shape(self, level: int = 0) -> tuple[int, ...]:
        return tuple(self.levels[level].shape[self.axes.index(a)] for a in self.spatial_axes)

    def downsample(self, level: int) -> tuple[float, ...]:
        """Level ``level``'s pixel size in level-0 pixels, per spatial axis.

        Pyramids halve with rounding (250 → 125 → 62 → 31), so the ratio of shapes is not
        the factor: an integer factor ``k`` is taken whenever the level's size is
        ``floor`` or ``ceil`` of level 0's divided by ``k``; otherwise the plain ratio.
        """
        factors = []
        for n0, n in zip(self.spatial_shape(0), self.spatial_shape(level)):
            k = max(1, round(n0 / n))
            factors.append(float(k) if n in (n0 // k, -(-n0 // k)) else n0 / n)
        return tuple(factors)

    def scale(self, level: int = 0) -> dict[str, float]:
        """Physical pixel size of a level per spatial axis (level-0 pixels where unknown)."""
        return {a: self.pixel_size.get(a, 1.0) * f for a, f in zip(self.spatial_axes, self.downsample(level))}

    def source(self, level: int = 0) -> storage.ImageSource:
        """One level as an :class:`~pipeline.storage.ImageSource` (reads come back ``(C, *box)``)."""
        if level not in self._sources:
            self._sources[level] = storage.ImageSource(self.url, self.levels[level], self.axes, self.scale(level),
                                                       dict(self.units))
        return self._sources[level]

    def read(self, box: Box, level: int = 0) -> np.ndarray:
        """The pixels of ``box`` (spatial, inside the level), channel first ``(C, *box.shape)``;
        only the tiles that ``box`` touches are read and decoded."""
        try:
            return self.source(level).read(box)
        except InputError:
            raise
        except Exception as exc:  # a damaged tile: name the file and where
            raise InputError(f"{self.url}: level {level}, {box}: cannot be decoded ({_describe(exc)})") from None

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = ()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_slide(url: str, axes: str | None = None) -> Slide:
    """Open a slide (TIFF-based, local path or fsspec URL) or a PNG / JPEG picture.

    Parameters
    ----------
    url : str
        The file.
    axes : str, optional
        Its axes in overtile's letters, for files whose axes tifffile cannot name (a stack of
        unnamed pages, e.g. ``"zyx"``); where the file names them, this must agree.

    Raises
    ------
    InputError
        Missing file, not a TIFF / picture, truncated or damaged, axes that do not fit.
    """
    url = str(url)
    if not storage.is_url(url) and not os.path.exists(url):
        raise InputError(f"{url}: no such file or directory")
    if not storage.is_url(url) and os.path.isdir(url):
        raise InputError(f"{url}: a folder, not a slide file")
    if is_picture(url):
        return _open_picture(url, axes)
    return _open_tiff(url, axes)


def open_source(url: str, axes: str | None = None) -> storage.ImageSource:
    """Level 0 of a slide as a checked :class:`~pipeline.storage.ImageSource` (what
    :func:`pipeline.storage.open_image` returns for a TIFF): ``read(box)`` reads only the
    tiles the box touches; the file stays open as long as the source lives."""
    slide = open_slide(url, axes)
    try:
        source = storage.checked_source(url, slide.levels[0], slide.axes, slide.pixel_size, slide.units)
        source.levels = list(slide.levels[1:])
    except BaseException:
        slide.close()
        raise
    weakref.finalize(source, slide.close)  # the file closes with the source (the slide holds the array)
    return source


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Problems(logging.Handler):
    """Collects what tifffile logs at ERROR while a file is parsed: it logs a broken IFD
    chain or tag (and carries on with what it could read) rather than raising."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_OPENING = threading.Lock()  # one file parsed at a time per process: the logger is global


@contextlib.contextmanager
def _tifffile_problems() -> Iterator[_Problems]:
    """Capture tifffile's log while a file is parsed, and keep it off stderr (the CLI's
    contract is one line); the problems are raised as an :class:`InputError` instead."""
    logger = logging.getLogger("tifffile")
    with _OPENING:
        handler, propagate = _Problems(), logger.propagate
        logger.addHandler(handler)
        logger.propagate = False
        try:
            yield handler
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


def _open_tiff(url: str, axes: str | None) -> Slide:
    import tifffile

    if storage.is_url(url):
        import fsspec

        try:
            handle = fsspec.open(url, "rb").open()
        except FileNotFoundError:
            raise InputError(f"{url}: no such file") from None
    else:
        handle = None
    tif = None
    try:
        with _tifffile_problems() as problems:
            try:
                tif = tifffile.TiffFile(handle if handle is not None else url)
                len(tif.pages)  # walks the whole IFD chain, where truncation shows first
                if not tif.series:
                    raise InputError(f"{url}: a TIFF without an image in it")
                series = tif.series[0]
                size = tif.filehandle.size
                for level in series.levels:
                    for page in level.pages:
                        if page is not None:
                            _check_segments(url, page, size)
                group = zarr.open_group(series.aszarr(multiscales=True, read_only=True), mode="r")
                levels = [group[str(i)] for i in range(len(series.levels))]
            except InputError:
                raise
            except Exception as exc:
                if not problems.messages:
                    raise InputError(f"{url}: not a readable TIFF ({_describe(exc)})") from None
        if problems.messages:
            raise InputError(f"{url}: damaged or truncated TIFF (tifffile: {problems.messages[0]})")
        tiff_axes = series.axes
        stored = _slide_axes(url, tiff_axes, axes)
        if len(stored) != levels[0].ndim:
            raise InputError(f"{url}: axes {stored!r} do not match its {levels[0].ndim} dimensions (tifffile: {tiff_axes})")
        pixel_size, units = physical_pixel_size(tif, series)
        pixel_size = {a: v for a, v in pixel_size.items() if a in stored}  # e.g. no PhysicalSizeZ for a 2-D slide
        units = {a: u for a, u in units.items() if a in pixel_size}
    except BaseException:
        for f in (tif, handle):
            if f is not None:
                f.close()
        raise
    kind = next((k for k in ("svs", "ndpi", "ome", "scn", "bif", "philips", "qpi", "imagej") if getattr(tif, f"is_{k}", False)), "tiff")
    return Slide(url, kind, levels, stored, pixel_size, units, _files=tuple(f for f in (tif, handle) if f is not None))


def _check_segments(url: str, page: Any, size: int) -> None:
    """Every tile or strip of ``page`` must lie inside the file (a cut-off download does not)."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    ends = offsets + counts
    beyond = (counts > 0) & (ends > size)
    if beyond.any():
        raise InputError(f"{url}: truncated: {int(beyond.sum())} of {len(counts)} tiles of a "
                         f"{'×'.join(map(str, page.shape))} image lie past the end of the file "
                         f"({int(ends.max())} bytes needed, {size} there)")


def _slide_axes(url: str, tiff_axes: str, given: str | None) -> str:
    mapped = "".join(TIFF_AXES.get(a, "?") for a in tiff_axes.upper())
    nameable = "?" not in mapped and len(set(mapped)) == len(mapped)
    if given is not None:
        given = given.lower()
        if nameable and given != mapped:
            raise InputError(f"{url}: axes {given!r} given, but the file's are {mapped!r} (tifffile: {tiff_axes})")
        return given
    if not nameable:
        raise InputError(f"{url}: tifffile reads its axes as {tiff_axes!r}, which do not say which is which; "
                         f"give them with --axes (e.g. zyx for a stack of pages)")
    return mapped


def physical_pixel_size(tif: Any, series: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Level 0's pixel size per spatial axis and its unit, where the file says it.

    In order: OME-XML ``PhysicalSizeX/Y/Z``; Aperio's ``MPP`` (µm per pixel) in the SVS
    ImageDescription; ImageJ's unit with the resolution tags; the TIFF ``XResolution`` /
    ``YResolution`` with an inch, cm, mm or µm ``ResolutionUnit``, when finer than 600 dpi.
    """
    page = series.keyframe
    if getattr(tif, "is_ome", False) and tif.ome_metadata:
        return _ome_pixel_size(tif.ome_metadata)
    if getattr(tif, "is_svs", False):  # "Aperio Image Library ...|AppMag = 20|MPP = 0.4990|..."
        mpp = re.search(r"\|\s*MPP\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)", page.description or "")
        if mpp and float(mpp.group(1)) > 0:
            return {"y": float(mpp.group(1)), "x": float(mpp.group(1))}, {"y": MICROMETER, "x": MICROMETER}
        return {}, {}
    x, y = page.resolution
    if getattr(tif, "is_imagej", False) and tif.imagej_metadata:
        unit = UNITS.get(str(tif.imagej_metadata.get("unit", "")).strip())
        if unit and x > 0 and y > 0:
            size = {"y": 1.0 / y, "x": 1.0 / x}
            spacing = tif.imagej_metadata.get("spacing")
            if isinstance(spacing, (int, float)) and spacing > 0:
                size["z"] = float(spacing)
            return size, {a: unit for a in size}
    per_unit = RESOLUTION_UNIT_UM.get(int(page.resolutionunit))
    if per_unit and x > 0 and y > 0 and max(per_unit / x, per_unit / y) < MAX_PIXEL_UM:
        return {"y": per_unit / y, "x": per_unit / x}, {"y": MICROMETER, "x": MICROMETER}
    return {}, {}


def _ome_pixel_size(xml: str) -> tuple[dict[str, float], dict[str, str]]:
    """``PhysicalSize{X,Y,Z}`` and their units from the first image's ``Pixels`` element."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}, {}
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}, {}
    size, units = {}, {}
    for axis in "zyx":
        value = pixels.get(f"PhysicalSize{axis.upper()}")
        unit = UNITS.get(pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm"))
        try:
            value = float(value) if value is not None else None
        except ValueError:
            value = None
        if value and value > 0 and unit:
            size[axis], units[axis] = value, unit
    return size, units


def _open_picture(url: str, axes: str | None) -> Slide:
    import imageio.v3 as iio

    try:
        if storage.is_url(url):
            import fsspec

            with fsspec.open(url, "rb") as f:
                data = iio.imread(f.read(), extension=Path(url).suffix.lower())
        else:
            data = iio.imread(url)
    except Exception as exc:
        raise InputError(f"{url}: not a readable {Path(url).suffix.lower().lstrip('.').upper()} picture "
                         f"({_describe(exc)})") from None
    stored = {2: "yx", 3: "yxc"}.get(data.ndim)
    if stored is None:
        raise InputError(f"{url}: a picture of shape {data.shape}; expected (Y, X) or (Y, X, channels)")
    if axes is not None and axes.lower() != stored:
        raise InputError(f"{url}: axes {axes!r} given, but a picture's are {stored!r}")
    return Slide(url, Path(url).suffix.lower().lstrip(".").replace("jpg", "jpeg"), [data], stored)


# --- ingest ----------------------------------------------------------------------------


class IngestSettings(BaseModel):
    """What a conversion of a slide to OME-Zarr needs; shared by the CLI, the API and the flow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slide: str = Field(description="Slide or picture to convert: SVS, NDPI, OME-TIFF or another (pyramidal) TIFF, PNG or JPEG")
    output: str = Field(description="OME-Zarr image to write (path or URL)")
    block_size: int | None = Field(None, ge=16, description="Block edge in pixels: the unit of work and the output chunk (default 2048 in 2D, 256 in 3D)")
    levels: Literal["all"] | Annotated[int, Field(ge=1)] = Field("all", description="Pyramid levels to write: all the file has, or the first N")
    axes: str | None = Field(None, description="Axes of a TIFF stack whose axes tifffile cannot name, e.g. zyx")
    workers: int | None = Field(None, ge=1, description="Copy blocks on a local Dask cluster of this many processes (default: in this process, one block at a time)")
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler to copy blocks on, e.g. tcp://10.0.0.5:8786")
    overwrite: bool = Field(False, description="Replace an existing output instead of resuming it")

    @field_validator("axes")
    @classmethod
    def _lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @field_validator("levels", mode="before")
    @classmethod
    def _all_or_count(cls, v: Any) -> Any:
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        if isinstance(v, str) and v.isdigit() and int(v) >= 1:
            return int(v)
        raise ValueError(f"{v!r}: expected 'all' or a number of levels from 1 up")


@dataclass(frozen=True)
class IngestLevel:
    """One output level: array ``str(level)`` of the OME-Zarr group, axes ``c`` + spatial."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    scale: tuple[float, ...]


@dataclass(frozen=True)
class LevelBlock:
    """One chunk-aligned block of one pyramid level; ``index`` is its place in the ledger
    (one flat ledger over the blocks of all levels, level 0's first)."""

    level: int
    write: Box
    index: tuple[int]
    grid_key: str

    @property
    def key(self) -> str:
        return f"{self.level}-{self.grid_key}"


@dataclass(frozen=True)
class IngestJob:
    """A planned conversion: what every block task needs, small enough to send with each."""

    settings: IngestSettings
    kind: str
    axes: str
    dtype: str
    levels: tuple[IngestLevel, ...]
    units: dict[str, str]
    ledger: execute.Ledger
    fingerprint: str

    @property
    def name(self) -> str:
        return f"ingest-{self.fingerprint[:10]}"

    def blocks(self) -> Iterator[LevelBlock]:
        number = 0
        for i, level in enumerate(self.levels):
            for b in iter_blocks(level.shape[1:], level.chunks[1:]):
                yield LevelBlock(i, b.write, (number,), b.key)
                number += 1

    def pending(self) -> tuple[list[LevelBlock], int]:
        """The blocks the ledger does not mark finished, and how many it does."""
        done = self.ledger.done()
        return [b for b in self.blocks() if not done[b.index]], int(done.sum())


def _stamp(url: str) -> list[Any]:
    """What identifies the slide's contents cheaply: size and modification time."""
    if storage.is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        return [info.get("size"), str(info.get("mtime") or info.get("LastModified") or "")]
    st = os.stat(url)
    return [st.st_size, st.st_mtime_ns]


def plan_ingest(settings: IngestSettings) -> tuple[IngestJob, list[LevelBlock], int]:
    """Check the slide and the output, create or reopen the output, read the ledger.

    Returns the job, the blocks still to do and the number already finished. Every check
    that can fail on user input happens before the output is touched.
    """
    settings = settings.model_copy(update={k: storage.absolute(getattr(settings, k)) for k in ("slide", "output")})
    with open_slide(settings.slide, settings.axes) as slide:
        storage.checked_source(settings.slide, slide.levels[0], slide.axes, slide.pixel_size, slide.units)
        n = len(slide.levels) if settings.levels == "all" else settings.levels
        if n > len(slide.levels):
            raise InputError(f"--levels {n}: {settings.slide} has {len(slide.levels)} pyramid level(s)")
        spatial = slide.spatial_axes
        block = settings.block_size or (2048 if len(spatial) == 2 else 256)
        levels = []
        for i in range(n):
            shape = (slide.channels, *slide.spatial_shape(i))
            chunks = (slide.channels, *(min(block, s) for s in shape[1:]))
            scale = slide.scale(i)
            levels.append(IngestLevel(shape, chunks, (1.0, *(scale[a] for a in spatial))))
        kind, units, stored_axes = slide.kind, dict(slide.units), slide.axes
        dtype = slide.dtype.newbyteorder("=").name  # stored native, whatever the TIFF's byte order
    axes = "c" + spatial
    existed = storage.check_output(settings.output, levels[0].shape, dtype, settings.overwrite)
    fingerprint = hashlib.sha256(json.dumps({
        "slide": settings.slide, "stamp": _stamp(settings.slide), "axes": stored_axes,
        "levels": [(lv.shape, lv.chunks) for lv in levels], "dtype": dtype,
    }, sort_keys=True).encode()).hexdigest()
    name = Path(settings.slide.rstrip("/")).name
    storage.create_image(
        settings.output, levels[0].shape, levels[0].chunks, dtype, axes, name=name, scale=levels[0].scale,
        units=units, overwrite=settings.overwrite,
        attrs={"overtile": {"slide": settings.slide, "format": kind, "levels": n}},
    )
    total = sum(math.prod(block_grid(lv.shape[1:], lv.chunks[1:])) for lv in levels)
    ledger = execute.Ledger.prepare(settings.output, (total,), fingerprint, overwrite=settings.overwrite or not existed)
    group = zarr.open_group(store=settings.output, mode="r+")
    fill = group["0"].fill_value  # as create_image chose for level 0
    for i, lv in enumerate(levels[1:], start=1):
        if str(i) not in group:
            group.create_array(str(i), shape=lv.shape, chunks=lv.chunks, dtype=dtype, fill_value=fill,
                               dimension_names=list(axes), compressors=[storage.OUTPUT_CODEC])
    group.attrs["ome"] = {"version": storage.OME_VERSION,
                          "multiscales": [storage.multiscales(axes, [lv.scale for lv in levels], name, units)]}
    job = IngestJob(settings, kind, axes, dtype, tuple(levels), units, ledger, fingerprint)
    blocks, skipped = job.pending()
    return job, blocks, skipped


_OUTPUTS: dict[tuple[str, str], zarr.Array] = {}


def _output(url: str, fingerprint: str) -> zarr.Array:
    """An output array opened once per process and run. Keyed by the run's fingerprint as
    well as the URL: an array object keeps the metadata it was opened with, so after an
    ``overwrite`` with other blocks in the same process it would write the old chunk grid."""
    key = (url, fingerprint)
    if key not in _OUTPUTS:
        _OUTPUTS[key] = zarr.open_array(store=url, mode="r+")
    return _OUTPUTS[key]


def copy_block(slide: Slide, block: LevelBlock, job: IngestJob) -> dict[str, Any]:
    """Read one block of one level from the slide, write it to the output, mark it done."""
    watch = execute.Stopwatch()
    with watch("read"):
        data = slide.read(block.write, block.level)
    with watch("write"):
        _output(f"{job.settings.output.rstrip('/')}/{block.level}", job.fingerprint)[
            (slice(None), *block.write.slices())] = data
        _output(job.ledger.url, job.fingerprint)[block.index] = 1  # Ledger.mark, minus its per-URL cache
    return {"block": block.key, "level": block.level, "pixels": block.write.size, "worker_pid": os.getpid(),
            **{f"{k}_s": v for k, v in watch.seconds.items()}}


_SLIDES: dict[tuple[Any, ...], Slide] = {}
_SLIDES_LOCK = threading.Lock()


def cached_slide(url: str, axes: str | None) -> Slide:
    """The slide, opened once per worker process and kept (one at a time); the task slots of
    a worker share it (tifffile locks its file handle around reads)."""
    key = (url, axes, *_stamp(url))
    with _SLIDES_LOCK:
        slide = _SLIDES.get(key)
        if slide is None:
            slide = open_slide(url, axes)
            for old in _SLIDES.values():
                old.close()
            _SLIDES.clear()
            _SLIDES[key] = slide
        return slide


def ingest_block(block: LevelBlock, job: IngestJob) -> dict[str, Any]:
    """The Dask task: :func:`copy_block` with the slide opened once per worker process."""
    return copy_block(cached_slide(job.settings.slide, job.settings.axes), block, job)


def ingest(
    settings: IngestSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[IngestJob, int, int], None] | None = None,
) -> tuple[IngestJob, execute.RunSummary]:
    """Convert a slide to an OME-Zarr image with all its pyramid levels; the Python entry
    point behind ``overtile ingest``.

    Blocks are copied in this process one at a time (memory: one block plus the tiles it
    touches), or as Dask tasks when a ``client``, ``settings.scheduler`` or
    ``settings.workers`` is given. A rerun resumes from the ledger.

    Examples
    --------
    >>> job, summary = ingest(IngestSettings(slide="CMU-1.svs", output="CMU-1.zarr"))  # doctest: +SKIP
    >>> [lv.shape for lv in job.levels]  # doctest: +SKIP
    [(3, 32914, 46000), (3, 8228, 11500), (3, 2057, 2875)]
    """
    start = time.perf_counter()
    job, blocks, skipped = plan_ingest(settings)
    if on_plan is not None:
        on_plan(job, len(blocks), skipped)
    records: list[dict[str, Any]] = []
    if blocks and client is None and settings.scheduler is None and settings.workers is None:
        with open_slide(job.settings.slide, job.settings.axes) as slide:
            for block in blocks:
                records.append(copy_block(slide, block, job))
                if on_result is not None:
                    on_result(records[-1])
    elif blocks:
        with execute.client_or_cluster(client, settings.scheduler, settings.workers) as client:
            records = execute.run_blocks(client, ingest_block, blocks, job, name=job.name, on_result=on_result)
    summary = execute.RunSummary(total=len(blocks) + skipped, skipped=skipped, records=records,
                                 seconds=time.perf_counter() - start)
    return job, summary
