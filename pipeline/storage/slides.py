"""Whole-slide images and pictures: read them in place, by region.

Slides (Aperio SVS, Hamamatsu NDPI, OME-TIFF, Leica SCN, Ventana BIF and other tiled or
pyramidal TIFFs) are opened with tifffile: ``TiffFile(...).series[0].aszarr()`` exposes every
pyramid level as a Zarr array whose chunks are the file's own tiles (or strips), so a read
decodes only the tiles that a region touches. PNG and JPEG pictures cannot be read by
region; they are read whole (with imageio) and are meant for small images.

:func:`open_slide` gives a :class:`Slide` (levels, axes, physical pixel size);
:func:`open_source` is what :func:`pipeline.storage.open_image` calls for a TIFF, so that
``overtile predict`` reads a slide without converting it; :mod:`pipeline.jobs.ingest`
converts one to OME-Zarr.

A slide on an object store (``s3://...``) is read in place too, by byte range
(:class:`RemoteFile`): a region costs the bytes of the tiles it touches, not the file's, and
:func:`bytes_read` says how many bytes this process has fetched from a slide.

A truncated or damaged file gives one :class:`InputError` naming the file and what is wrong,
when it is opened where the file's structure shows it (tifffile reports a broken IFD chain,
tag values or tiles past the end of the file), else when the damaged tile is decoded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from pipeline.errors import InputError
from pipeline.numerics.geometry import Box
from pipeline.storage import images

TIFF_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".scn", ".bif", ".qptiff", ".btf", ".tf2", ".tf8")  # .ome.tif(f) too
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
# tifffile's axis letters: S = samples of a pixel (RGB), C = channels, I/Q = unnamed page stacks
TIFF_AXES = {"S": "c", "C": "c", "T": "t", "Z": "z", "Y": "y", "X": "x"}
# NGFF units are UDUNITS-2 names; OME-XML and ImageJ write symbols
UNITS = {"µm": "micrometer", "μm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
         "micrometer": "micrometer", "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter",
         "millimeter": "millimeter", "cm": "centimeter", "centimeter": "centimeter", "m": "meter", "meter": "meter",
         "Å": "angstrom", "angstrom": "angstrom", "pm": "picometer",
         "\\u00B5m": "micrometer", "\\u03BCm": "micrometer"}  # ImageJ writes the micro sign escaped
MICROMETER = "micrometer"
# TIFF ResolutionUnit (2 inch, 3 cm; 4 mm and 5 µm are tifffile's extensions) in micrometers
RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}
# Image writers stamp 72, 96, 150 or 300 dpi on everything; those are not a measurement. A
# resolution counts as a pixel size only when it is finer than 600 dpi (pixels < 42 µm).
MAX_PIXEL_UM = 25400.0 / 600


# --- reading ---------------------------------------------------------------------------


_FETCHED: dict[str, int] = {}  # bytes fetched per slide URL by this process (bytes_read)
_FETCHED_LOCK = threading.Lock()


def bytes_read(url: str) -> int:
    """Bytes this process has fetched from the slide at ``url`` (on an object store; local
    files are read through the operating system and not counted)."""
    return _FETCHED.get(str(url), 0)


class RemoteFile(io.RawIOBase):
    """A slide file on an object store, read by byte range; ``bytes_read`` counts what it
    fetched, ``requests`` the range requests.

    tifffile reads a slide in two phases: while it parses the IFDs, many reads of a tag's few
    bytes; then one read per tile a region touches. While ``window`` is set (the parse), a
    read smaller than it is served from a window of that many bytes fetched at its position,
    so parsing costs a few requests; other reads, and every read once ``window`` is 0, are
    one request for exactly their bytes. What a region costs is thus the bytes of its tiles.
    fsspec's default file reads ahead 50 MiB from every miss (s3fs): it fetched a 53 MB
    slide four times over while tifffile parsed it (``bench/RESULTS.md``, issue 13).
    """

    def __init__(self, url: str, window: int = 1 << 12) -> None:
        import fsspec

        super().__init__()
        self.url = url
        self.name = url  # what tifffile names the file by
        self._fs, self._path = fsspec.core.url_to_fs(url)
        self.size = int(self._fs.size(self._path))
        self.window = window
        self.bytes_read = self.requests = 0
        self._pos = 0
        self._held = (0, b"")  # the last window: its offset and bytes

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        start, held = self._held
        if not start <= self._pos <= self._pos + n <= start + len(held):
            if n >= self.window:
                view[:n] = self._fetch(self._pos, self._pos + n)
                self._pos += n
                return n
            start, held = self._pos, self._fetch(self._pos, min(self.size, self._pos + self.window))
            self._held = (start, held)
        view[:n] = held[self._pos - start:self._pos - start + n]
        self._pos += n
        return n

    def _fetch(self, start: int, stop: int) -> bytes:
        if start >= stop:
            return b""
        data = self._fs.cat_file(self._path, start=start, end=stop)
        self.bytes_read += len(data)
        self.requests += 1
        with _FETCHED_LOCK:
            _FETCHED[self.url] = _FETCHED.get(self.url, 0) + len(data)
        return data


def is_tiff(url: str) -> bool:
    """Whether ``url`` names a TIFF-based file: by its suffix, or, for a local file with
    another name, by the TIFF magic bytes at its start. Zarr stores (folders) are not."""
    url = str(url)
    if not images.is_url(url) and os.path.isdir(url):
        return False  # a Zarr store, whatever its name
    if url.lower().rstrip("/").endswith(TIFF_SUFFIXES):
        return True
    if images.is_url(url) or not os.path.isfile(url):
        return False
    with open(url, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def is_picture(url: str) -> bool:
    return str(url).lower().endswith(PICTURE_SUFFIXES)


@dataclass
class SlideSource(images.ImageSource):
    """One level of a slide as an image source whose reads name what cannot be decoded: a
    damaged tile is the input's fault (an :class:`InputError` naming the file and the
    region), not a worker's to retry. A file that cannot be reached (``OSError``) still is."""

    level: int = 0

    def read(self, box: Box) -> np.ndarray:
        try:
            return self.read_stored(box)
        except Exception as exc:
            _settle_zarr_reads()
            if isinstance(exc, (InputError, OSError, MemoryError)):
                raise
            raise InputError(f"{self.url}: level {self.level}, {box}: cannot be decoded ({_describe(exc)})") from None


def _settle_zarr_reads(timeout: float = 10.0) -> None:
    """Let the rest of a failed read finish. Zarr reads a region's tiles as concurrent tasks on
    its event-loop thread and raises the first failure while the others still run; a process
    that exits just then (the CLI, after printing the error) has zarr stop that loop with them
    pending, and asyncio prints "Task was destroyed but it is pending!" under the error line."""
    import asyncio

    from zarr.core.sync import loop, sync

    if loop[0] is None:  # no Zarr read has run in this process (a picture, read whole)
        return

    async def settle() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=timeout)

    with contextlib.suppress(Exception):
        sync(settle())


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
    _sources: dict[int, SlideSource] = field(default_factory=dict, repr=False)

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

    def source(self, level: int = 0) -> images.ImageSource:
        """One level as an :class:`~pipeline.storage.ImageSource` (reads come back ``(C, *box)``)."""
        if level not in self._sources:
            self._sources[level] = SlideSource(self.url, self.levels[level], self.axes, self.scale(level),
                                               dict(self.units), level=level)
        return self._sources[level]

    def read(self, box: Box, level: int = 0) -> np.ndarray:
        """The pixels of ``box`` (spatial, inside the level), channel first ``(C, *box.shape)``;
        only the tiles that ``box`` touches are read and decoded."""
        return self.source(level).read(box)

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
    if not images.is_url(url) and not os.path.exists(url):
        raise InputError(f"{url}: no such file or directory")
    if not images.is_url(url) and os.path.isdir(url):
        raise InputError(f"{url}: a folder, not a slide file")
    if is_picture(url):
        return _open_picture(url, axes)
    return _open_tiff(url, axes)


def open_source(url: str, axes: str | None = None, allow_bool: bool = False) -> images.ImageSource:
    """Level 0 of a slide as a checked :class:`~pipeline.storage.ImageSource` (what
    :func:`pipeline.storage.open_image` returns for a TIFF): ``read(box)`` reads only the
    tiles the box touches; the file stays open as long as the source lives."""
    slide = open_slide(url, axes)
    try:
        checked = images.checked_source(url, slide.levels[0], slide.axes, slide.pixel_size, slide.units, allow_bool)
        source = SlideSource(checked.url, checked.array, checked.axes, checked.scale, checked.units,
                             levels=list(slide.levels[1:]))
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

    if images.is_url(url):
        try:
            handle = RemoteFile(url)
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
    if handle is not None:
        handle.window = 0  # parsed: from here on the reads are tiles, each fetched exactly
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
        if images.is_url(url):
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
