"""Outlines of labelled objects: the exact pixel-edge polygon of each id of a 2-D label array,
for GeoJSON export (QuPath), and the merge of an object's pieces from adjacent blocks.

Pixel ``(r, c)`` covers the square ``[c, c+1] × [r, r+1]`` in ``(x, y)`` coordinates, so a
polygon's area is its pixel count, exactly. Exteriors have positive signed area
(counter-clockwise in the coordinates, as RFC 7946 asks), holes negative; pixels of other
ids inside an object are holes of it.

The tracing is vectorised over the whole array, no loop per object: a vertex of the pixel
grid is a corner of an id's outline when the id holds one or three of the four pixels around
it, or two diagonal ones (a pinch: two corners there). Every corner has one horizontal and
one vertical edge; corners pair up along grid lines by one sort, and the rings are the cycles
of "follow the outgoing edge", ordered by pointer doubling. At a pinch the ring turns around
the background pixel (the id is 8-connected there, the background 4-connected), so a hole
touching the exterior or another hole at one vertex is its own ring, touching at that vertex:
a valid polygon for every 4-connected id. Ids that are not 4-connected (no polygon can hold
them) are split into their 4-connected parts; :func:`outlines` keeps the largest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry.polygon import orient

# The four pixels around a grid vertex are NW, NE, SW, SE. A corner turns around one of them,
# its "odd" pixel; per odd pixel: its horizontal and vertical neighbour and its diagonal, the
# side of the vertex its horizontal edge lies on (0 left, 1 right) and its vertical edge
# (0 up, 1 down), and whether the corner's outgoing edge is horizontal when the odd pixel is
# the id's own (a convex corner; a concave corner or a pinch has the other).
_QUAD = (("nw", "ne", "sw", "se", 0, 0, True), ("ne", "nw", "se", "sw", 1, 0, False),
         ("sw", "se", "nw", "ne", 0, 1, False), ("se", "sw", "ne", "nw", 1, 1, True))


def outlines(labels: np.ndarray, offset: tuple[int, int] = (0, 0),
             ids: np.ndarray | None = None) -> dict[int, shapely.Polygon]:
    """The pixel-edge outline of every nonzero id (or of ``ids``) of a 2-D label array.

    Parameters
    ----------
    labels : (Y, X) integer or boolean array, 0 = background.
    offset : (row, column) of ``labels[0, 0]``, added to the coordinates (a block's origin).
    ids : only these ids; those absent from ``labels`` are absent from the result.

    Returns
    -------
    dict
        id -> valid ``Polygon`` in ``(x, y) = (column, row) + offset``, exterior counter-clockwise,
        holes clockwise, area = pixel count, in ascending id order. An id whose pixels are not
        4-connected gets its largest 4-connected part (the first in raster order among equals);
        :func:`outline_parts` gives them all.

    Examples
    --------
    >>> outlines(np.array([[0, 7], [7, 7]]))[7].area
    3.0
    """
    return {i: parts[0] if len(parts) == 1 else max(parts, key=lambda p: p.area)
            for i, parts in outline_parts(labels, offset, ids).items()}


def outline_parts(labels: np.ndarray, offset: tuple[int, int] = (0, 0),
                  ids: np.ndarray | None = None) -> dict[int, list[shapely.Polygon]]:
    """Like :func:`outlines`, but every 4-connected part of each id, in raster order of their
    first pixels: what a block gives for an object whose piece inside the block falls apart
    (a U-shaped cell cut by the block edge), so that :func:`merge_pieces` gets all of it."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"outlines: labels of shape {labels.shape}; expected a 2-D (Y, X) array")
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"outlines: {labels.dtype} labels; expected integers")
    offset = (int(offset[0]), int(offset[1]))
    polygons, split = _trace(labels, offset, ids)
    parts = {i: [p] for i, p in polygons.items()}
    for i, (r0, c0, components) in split.items():
        pieces, _ = _trace(components, (offset[0] + r0, offset[1] + c0), None)
        parts[i] = [pieces[k] for k in range(1, len(pieces) + 1)]
    return dict(sorted(parts.items())) if split else parts


def merge_pieces(pieces: Sequence[shapely.Polygon]) -> shapely.Polygon:
    """One object from its pieces in adjacent blocks (their shared edges coincide exactly):
    the union, a valid ``Polygon`` oriented as :func:`outlines` orients, area = sum of the
    pieces' areas. Pieces that do not form one 4-connected object give their largest part.
    """
    if len(pieces) == 0:
        raise ValueError("merge_pieces: no pieces")
    merged = shapely.union_all(list(pieces)) if len(pieces) > 1 else pieces[0]
    if merged.geom_type == "MultiPolygon":
        merged = max(merged.geoms, key=lambda p: p.area)
    # The union keeps a vertex wherever a piece's outline met the block edge; a tolerance of 0
    # drops exactly those (collinear) vertices and nothing else.
    return orient(shapely.simplify(merged, 0.0), 1.0)


def _trace(labels: np.ndarray, offset: tuple[int, int], ids: np.ndarray | None
           ) -> tuple[dict[int, shapely.Polygon], dict[int, tuple[int, int, np.ndarray]]]:
    """Polygons of the 4-connected ids, and for the others the top-left corner (row, column)
    of their crop and its 4-connected parts labelled 1, 2, … in raster order."""
    height, width = labels.shape
    padded = np.pad(labels, 1)
    flat = padded.ravel()
    row = width + 2
    # Vertex (i, j) is the top-left corner of pixel (i, j); its NW pixel is padded[i, j].
    nw, ne, sw, se = padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    # Vertices inside an id or on a straight edge (two equal halves) are no corners.
    vertices = np.flatnonzero((((nw != ne) | (sw != se)) & ((nw != sw) | (ne != se))).ravel())
    i, j = np.divmod(vertices, width + 1)
    at = i * row + j
    quad = {"nw": flat[at], "ne": flat[at + 1], "sw": flat[at + row], "se": flat[at + row + 1]}

    blocks = []  # per kind of corner: where (into vertices), label, hside, vside, out_h, pinch
    for odd, hn, vn, dg, hside, vside, convex_out_h in _QUAD:
        own, h, v, d = quad[odd], quad[hn], quad[vn], quad[dg]
        convex = np.flatnonzero((own != 0) & (own != h) & (own != v) & (own != d))
        concave = np.flatnonzero((h == v) & (h != 0) & (own != h))  # or one side of a pinch
        for where, label, out_h, pinch in ((convex, own[convex], convex_out_h, np.zeros(convex.size, bool)),
                                           (concave, h[concave], not convex_out_h, d[concave] != h[concave])):
            n = where.size
            blocks.append((where, label, np.full(n, hside), np.full(n, vside), np.full(n, out_h), pinch))
    where, label, hside, vside, out_h, pinch = (np.concatenate(column) for column in zip(*blocks))
    if ids is not None:
        keep = np.isin(label, np.asarray(ids, dtype=labels.dtype))
        where, label, hside, vside, out_h, pinch = (a[keep] for a in (where, label, hside, vside, out_h, pinch))
    if where.size == 0:
        return {}, {}
    ci, cj = i[where], j[where]

    # Edges of one direction along one grid line never overlap (each pixel has one id), so
    # corners pair up in order along the line, no matter their ids: ends before starts where
    # two segments meet at a vertex.
    rightward = out_h == (hside == 1)
    downward = ~out_h == (vside == 1)
    hpartner = _pairs((((rightward * (height + 1) + ci) * (width + 1) + cj) * 2) + hside)
    vpartner = _pairs((((downward * (width + 1) + cj) * (height + 1) + ci) * 2) + vside)

    # A ring alternates horizontal and vertical edges: follow it from corner to corner with a
    # horizontal outgoing edge, two edges a step.
    start = np.flatnonzero(out_h)
    compact = np.empty(where.size, np.int64)
    compact[start] = np.arange(start.size)
    ring, rank, first = _cycles(compact[vpartner[hpartner[start]]])
    order = np.empty(start.size, np.int64)
    order[first[ring] + rank] = np.arange(start.size)
    corners = np.stack([start[order], hpartner[start[order]]], axis=1).ravel()
    ring_of_corner = np.repeat(ring[order], 2)
    xy = np.stack([cj[corners] + offset[1], ci[corners] + offset[0]], axis=1).astype(np.float64)

    # Signed area from the horizontal edges alone (-∮ y dx), integer-exact.
    area = np.bincount(ring, weights=(cj[start] - cj[hpartner[start]]) * ci[start].astype(np.float64))
    ring_label = label[start[order[first]]]
    by_label = np.lexsort((area < 0, ring_label))  # per id, the exterior first
    names, begin, owner = np.unique(ring_label[by_label], return_index=True, return_inverse=True)
    exteriors = np.add.reduceat((area > 0)[by_label].astype(np.int64), begin)
    # 4-connected ids without a pinch have one ring around them and holes touching nothing;
    # the others are checked on their crop.
    doubtful = np.flatnonzero((exteriors > 1) | np.isin(names, label[pinch]))
    split, whole = {}, np.ones(names.size, bool)
    if doubtful.size:
        ys, xs, edge = ci[corners], cj[corners], 2 * first
        boxes = np.stack([f.reduceat(f.reduceat(a, edge)[by_label], begin) for f, a in
                          ((np.minimum, ys), (np.minimum, xs), (np.maximum, ys), (np.maximum, xs))], axis=1)
        for k in doubtful:
            r0, c0, r1, c1 = boxes[k].tolist()
            components, n = ndimage.label(labels[r0:r1, c0:c1] == names[k])
            if n > 1:
                split[names[k].item()] = (r0, c0, components)
                whole[k] = False
    rings = shapely.linearrings(xy, indices=ring_of_corner)[by_label]
    keep = whole[owner]
    polygons = shapely.polygons(rings[keep], indices=np.cumsum(whole)[owner[keep]] - 1)
    return dict(zip(names[whole].tolist(), polygons)), split


def _pairs(key: np.ndarray) -> np.ndarray:
    """Each corner's partner: consecutive corners in ``key`` order, two by two."""
    order = np.argsort(key, kind="stable")
    partner = np.empty_like(order)
    partner[order[0::2]] = order[1::2]
    partner[order[1::2]] = order[0::2]
    return partner


def _cycles(successor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cycles of a permutation by pointer doubling: each element's cycle (numbered by
    their smallest elements, ascending), its place from that smallest element, and where each
    cycle starts in the concatenation of all cycles."""
    n = successor.size
    smallest = np.arange(n)
    ahead = np.zeros(n, np.int64)  # steps from an element to the smallest one seen
    jump, step = successor, 1
    while True:
        further = smallest[jump]
        better = further < smallest
        if not better.any():
            break
        smallest = np.where(better, further, smallest)
        ahead = np.where(better, ahead[jump] + step, ahead)
        jump, step = jump[jump], step * 2
    heads = np.flatnonzero(smallest == np.arange(n))
    number = np.empty(n, np.int64)
    number[heads] = np.arange(heads.size)
    ring = number[smallest]
    length = np.bincount(ring)
    first = np.concatenate([[0], np.cumsum(length)[:-1]])
    return ring, (length[ring] - ahead) % length[ring], first
