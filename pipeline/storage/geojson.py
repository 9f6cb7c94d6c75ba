"""Objects as GeoJSON for QuPath: a FeatureCollection of detections, written one feature at a
time so that memory does not grow with the number of objects.

Each feature is what QuPath (0.4 and later) imports as a detection: ``id`` a UUID string,
``properties.objectType`` ``"detection"``, ``properties.classification`` ``{name, color}``,
``properties.measurements`` a dict of name -> number. The UUID is derived from the object id
(uuid5), so a rerun writes the same bytes; the integer id is kept as ``properties.object_id``.
"""

from __future__ import annotations

import gzip
import json
import math
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import shapely
from shapely.geometry.polygon import orient

# The namespace of the features' UUIDs: fixed, so that an object id always gets the same UUID.
OBJECT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "overtile:objects")


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
        self._out = (gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=6, mtime=0)
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
        """Features already serialised by :func:`feature_text`, one per line (e.g. a block's,
        written by a worker): copied in, so the collection never holds them all."""
        for line in text.splitlines():
            if line:
                self._out.write(self._separator + line.encode())
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
    if polygon.geom_type != "Polygon":
        raise ValueError(f"object {object_id} is a {polygon.geom_type}; expected a Polygon")
    polygon = orient(polygon, 1.0)
    properties: dict[str, Any] = {"objectType": "detection"}
    if classification is not None:
        name, color = classification
        properties["classification"] = {"name": name, "color": [int(c) for c in color]}
    properties["measurements"] = {k: float(v) for k, v in (measurements or {}).items() if math.isfinite(v)}
    properties["object_id"] = int(object_id)
    feature = {
        "type": "Feature",
        "id": str(uuid.uuid5(OBJECT_NAMESPACE, str(int(object_id)))),
        "geometry": {"type": "Polygon", "coordinates": [_ring(polygon.exterior)] + [_ring(r) for r in polygon.interiors]},
        "properties": properties,
    }
    return json.dumps(feature, separators=(",", ":"), allow_nan=False)


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
