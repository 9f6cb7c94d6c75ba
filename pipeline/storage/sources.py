"""Opening an input image, whatever it is stored as, and identifying what it holds.

:func:`open_image` is the one door: Zarr arrays and OME-Zarr images through
:mod:`pipeline.storage.images`, TIFF-based slides (SVS, NDPI, OME-TIFF, ...) read in place
through :mod:`pipeline.storage.slides`. :func:`stamp` says cheaply whether an input changed
(what a run's fingerprint and the workers' source cache are keyed by), so a rerun against a
rewritten input never resumes into the old output and a long-lived worker never reads a
stale handle.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.storage import images, slides
from pipeline.storage.images import ImageSource, is_url

# The files whose change means the array changed: Zarr 3 and Zarr 2 metadata.
_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def open_image(url: str, axes: str | None = None, allow_bool: bool = False) -> ImageSource:
    """Open an input image for reading, checking everything that can be checked up front.

    Parameters
    ----------
    url : str
        A Zarr array, an OME-Zarr image group (its full-resolution level is used), or a
        TIFF-based slide (SVS, NDPI, OME-TIFF, ...), read in place tile by tile.
    axes : str, optional
        The stored axes of a plain array (``"yx"``, ``"cyx"``, ``"zyx"``, ``"czyx"``,
        ``"yxc"``); 2-D arrays default to ``"yx"``. Ignored when it agrees with the file's
        metadata; an error when it does not.
    allow_bool : bool
        Accept boolean arrays (masks); images must be integers or floats.

    Raises
    ------
    InputError
        Missing path, not Zarr or TIFF, axes that do not fit, unsupported dtype, empty array.
    """
    url = str(url)
    if slides.is_tiff(url):
        return slides.open_source(url, axes, allow_bool)
    return images.open_zarr_image(url, axes, allow_bool)


def file_stamp(url: str) -> list[Any]:
    """Size and modification time of a file or object (None where the store keeps none); on
    an object store also its ETag, which changes with the content even within the second
    that S3's LastModified counts in."""
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(path)  # a listing cached in this process may predate a rewrite
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return [None, None]
        modified = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        return [info.get("size"), " ".join(str(v) for v in (modified, info.get("ETag")) if v)]
    try:
        st = os.stat(url)
    except FileNotFoundError:
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def stamp(source: ImageSource) -> dict[str, Any]:
    """What identifies an opened input's contents without reading its pixels: shape, dtype,
    chunks, axes, and the size and modification time of its metadata files (a slide file's
    own for a TIFF). A rewritten array gets new metadata files, so a new stamp."""
    array = source.array
    found: dict[str, Any] = {
        "shape": list(map(int, array.shape)),
        "dtype": str(array.dtype),
        "chunks": list(map(int, getattr(array, "chunks", ()) or ())),
        "axes": source.axes,
    }
    url = source.url.rstrip("/")
    if slides.is_tiff(url):
        found["file"] = file_stamp(url)
        return found
    path = getattr(array, "path", "") or ""
    base = url if not path or url.endswith(path) else f"{url}/{path}"
    found["metadata"] = [m for name in _METADATA if (m := file_stamp(f"{base}/{name}"))[0] is not None]
    return found


_CACHE: dict[tuple[str, str | None], tuple[str, ImageSource]] = {}


def cached_image(url: str, axes: str | None, key: str) -> ImageSource:
    """An input opened once per process (workers reuse it across blocks) for one run.

    ``key`` names what the caller expects to read (its run's fingerprint, which holds the
    input's :func:`stamp`): a source opened for another run is opened afresh, so a worker
    that outlives a run never reads a stale handle of an input rewritten since.
    """
    held = _CACHE.get((url, axes))
    if held is None or held[0] != key:
        _CACHE[(url, axes)] = (key, open_image(url, axes))
    return _CACHE[(url, axes)][1]
