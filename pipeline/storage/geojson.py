"""Objects as GeoJSON for QuPath: a FeatureCollection of detections, written one feature at a
time so that memory does not grow with the number of objects.

Each feature is what QuPath (0.4 and later) imports as a detection: ``id`` a UUID string,
``properties.objectType`` ``"detection"``, ``properties.classification`` ``{name, color}``,
``properties.measurements`` a dict of name -> number. The UUID is derived from the object id
(uuid5), so a rerun writes the same bytes; the integer id is kept as ``properties.object_id``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import posixpath
import re
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import shapely

# The namespace of the features' UUIDs: fixed, so that an object id always gets the same UUID.
OBJECT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "overtile:objects")
_NAMESPACE_BYTES = OBJECT_NAMESPACE.bytes
_WHOLE = re.compile(r"\.0(?=[,\]])")  # GEOS writes 12.0; pixel edges are whole numbers


class FeatureWriter:
    """A GeoJSON FeatureCollection streamed to a local path or an fsspec URL, gzip-compressed
    when the name ends with ``.gz``.

    It is written to a temporary name beside the target and moved into place when the
    ``with`` block ends without error; on error the temporary is removed, so no half-written
    file is ever left under the target's name.

    Examples
    --------
    >>> with FeatureWriter("cells.geojson.gz") as out:  # doctest: +SKIP
    ...     out.write(7, polygon, ("Tumor", (200, 0, 0)), {"Area px": 412.0})
    """

    def __init__(self, url: str) -> None:
        self.url = str(url)

    def __enter__(self) -> FeatureWriter:
        self._fs, self._path = fsspec.core.url_to_fs(self.url)
        parent, name = posixpath.split(self._path)
        self._fs.makedirs(parent, exist_ok=True)
        self._temporary = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
        self._raw = self._fs.open(self._temporary, "wb")
        # No name and no time in the gzip header: a rerun writes the same bytes.
        # level 1: several times faster than the default for a few percent more bytes; millions
        # of outlines pass through here in one thread
        self._out = (gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=1, mtime=0)
                     if name.endswith(".gz") else self._raw)
        self._out.write(b'{"type":"FeatureCollection","features":[\n')
        self._separator = b""
        return self

    def write(self, object_id: int, polygon: shapely.Polygon,
              classification: tuple[str, tuple[int, int, int]] | None = None,
              measurements: Mapping[str, float] | None = None) -> None:
        """One detection (see :func:`feature_text`)."""
        self.write_text(feature_text(object_id, polygon, classification, measurements))

    def write_text(self, text: str) -> None:
        """Features already serialised by :func:`features_text`, one per line (e.g. a block's,
        written by a worker): copied in, so the collection never holds them all. ``text`` holds
        whole lines (:func:`pipeline.storage.files.iter_lines` reads a file so)."""
        lines = [line for line in text.splitlines() if line]
        if lines:
            self._out.write(self._separator + ",\n".join(lines).encode())
            self._separator = b",\n"

    def __exit__(self, exc_type, exc, traceback) -> None:
        moved = False
        try:
            if exc_type is None:
                self._out.write(b"\n]}\n")
            self._out.close()
            self._raw.close()
            if exc_type is None:
                self._fs.mv(self._temporary, self._path)
                moved = True
        finally:
            if not moved and self._fs.exists(self._temporary):
                self._fs.rm(self._temporary)


def feature_text(object_id: int, polygon: shapely.Polygon,
                 classification: tuple[str, tuple[int, int, int]] | None = None,
                 measurements: Mapping[str, float] | None = None) -> str:
    """One detection as one line of JSON. ``polygon`` in pixel coordinates of full resolution
    (x = column, y = row); its exterior is written counter-clockwise and its holes clockwise
    (RFC 7946). Measurements that are NaN or infinite are left out (JSON has no such numbers,
    and QuPath shows a missing measurement as NaN)."""
    columns = {k: np.array([v], np.float64) for k, v in (measurements or {}).items()}
    return features_text(np.array([int(object_id)]), [polygon], classification, columns).rstrip("\n")


def features_text(ids: np.ndarray, polygons: list[shapely.Polygon],
                  classification: tuple[str, tuple[int, int, int]] | None,
                  measurements: Mapping[str, np.ndarray]) -> str:
    """Many detections at once, one line each, as :func:`feature_text` writes them (the
    geometries serialised by GEOS in one call: millions of cells pass through here)."""
    if not len(ids):
        return ""
    polygons = np.asarray(polygons, dtype=object)
    kinds = shapely.get_type_id(polygons)
    if (kinds != 3).any():
        bad = int(np.flatnonzero(kinds != 3)[0])
        raise ValueError(f"object {int(ids[bad])} is a {polygons[bad].geom_type}; expected a Polygon")
    geometries = _WHOLE.sub("", "\n".join(shapely.to_geojson(shapely.orient_polygons(polygons)).tolist())).split("\n")
    label = ""
    if classification is not None:
        name, color = classification
        label = f',"classification":{json.dumps({"name": name, "color": [int(c) for c in color]}, separators=(",", ":"))}'
    names = [json.dumps(str(k)) for k in measurements]
    values = np.column_stack([np.asarray(v, np.float64) for v in measurements.values()]).tolist() if names else \
        [[] for _ in ids]
    lines = []
    for i, geometry, row in zip(np.asarray(ids).tolist(), geometries, values):
        m = ",".join(f"{n}:{v!r}" for n, v in zip(names, row) if math.isfinite(v))
        lines.append(f'{{"type":"Feature","id":"{_uuid(i)}","geometry":{geometry},"properties":'
                     f'{{"objectType":"detection"{label},"measurements":{{{m}}},"object_id":{i}}}}}')
    return "\n".join(lines) + "\n"


def _uuid(object_id: int) -> str:
    """uuid5(OBJECT_NAMESPACE, str(object_id)), without the UUID object's overhead."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + str(object_id).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def read_features(url: str) -> list[dict[str, Any]]:
    """All features of a GeoJSON FeatureCollection (gzip-compressed or not), in memory: for
    tests and small files."""
    with fsspec.open(str(url), "rb", compression="infer") as f:
        return json.load(f)["features"]


def _ring(ring: shapely.LinearRing) -> list[list[float]]:
    """A ring's coordinates, as integers when they are (pixel edges are): shorter files."""
    xy = shapely.get_coordinates(ring)
    whole = np.rint(xy)
    return (whole.astype(np.int64) if np.array_equal(whole, xy) else xy).tolist()
