"""Objects (cells, nuclei) from a class probability map, by a rule that is local by design,
so a blockwise run can reproduce the whole-image result exactly.

The rule (:func:`label_objects`), after the paper's way of separating touching cells:

1. **seeds**: pixels whose probability of the object class is above ``threshold``;
2. **objects**: the face-connected components of the seeds (4-connected in 2-D,
   6-connected in 3-D), those smaller than ``min_size`` pixels dropped;
3. **growth**: each object grows over its class's foreground (probability above
   ``grow_threshold``, or everywhere when it is None) by at most ``grow_distance`` steps of
   one pixel across a face. All objects grow at once, one step at a time; a pixel reached by
   two objects in the same step takes the one of its neighbour first in a fixed order of
   directions (:data:`DIRECTIONS`), never one chosen by label value.

Steps 1 and 3 depend only on pixels within ``grow_distance`` of a pixel and never on label
values, so a block read with that halo labels its pixels as the whole image would, once its
seed components carry their global ids; step 2 is global, made blockwise by merging the
components that touch across block faces (:func:`face_pairs`, :func:`merge_table`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def directions(ndim: int) -> list[tuple[int, int]]:
    """The neighbours a growing pixel looks at, in priority order: ``(axis, step)``, the
    lower neighbour before the upper along each axis, axes in order."""
    return [(axis, step) for axis in range(ndim) for step in (-1, 1)]


def seed_components(seeds: np.ndarray) -> tuple[np.ndarray, int]:
    """Face-connected components of a boolean mask: ``(labels as uint32, count)``, ids
    1..count in raster order of each component's first pixel."""
    structure = ndimage.generate_binary_structure(seeds.ndim, 1)
    labels, count = ndimage.label(seeds, structure=structure, output=np.uint32)
    return labels, int(count)


def foreground(probability: np.ndarray, grow_threshold: float | None) -> np.ndarray | None:
    """Where objects may grow: above ``grow_threshold`` (None: everywhere)."""
    return None if grow_threshold is None else probability > grow_threshold


def grow(labels: np.ndarray, allowed: np.ndarray | None, steps: int) -> np.ndarray:
    """Grow every nonzero label by ``steps`` face steps into zero pixels where ``allowed``
    (everywhere when None); synchronous, ties by :func:`directions`, so the result at a
    pixel depends only on the pixels within ``steps`` of it."""
    out = labels.copy()
    for _ in range(steps):
        free = out == 0
        if allowed is not None:
            free &= allowed
        if not free.any():
            break
        taken = np.zeros_like(out)
        for axis, step in directions(out.ndim):
            neighbour = np.zeros_like(out)  # the label of the pixel at ``step`` along ``axis``
            src = [slice(None)] * out.ndim
            dst = [slice(None)] * out.ndim
            if step < 0:
                src[axis], dst[axis] = slice(None, -1), slice(1, None)
            else:
                src[axis], dst[axis] = slice(1, None), slice(None, -1)
            neighbour[tuple(dst)] = out[tuple(src)]
            take = free & (taken == 0) & (neighbour > 0)
            taken[take] = neighbour[take]
        if not taken.any():
            break
        out = np.where(taken > 0, taken, out)
    return out


def label_objects(probability: np.ndarray, threshold: float = 0.5, grow_threshold: float | None = None,
                  grow_distance: int = 0, min_size: int = 0) -> np.ndarray:
    """The rule of this module on a whole image in memory (the reference the blockwise job
    equals up to renumbering). ``probability``: the object class's probability, any shape."""
    probability = np.asarray(probability)
    labels, count = seed_components(probability > threshold)
    if min_size > 1 and count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = sizes < min_size
        small[0] = True
        labels[small[labels]] = 0
    return grow(labels, foreground(probability, grow_threshold), grow_distance)


def face_pairs(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Pairs ``(a, b)`` of labels that touch across a face: ``low`` is the last slice of one
    block, ``high`` the first slice of its neighbour (same shape). Unique rows, uint64."""
    touching = (low > 0) & (high > 0)
    pairs = np.stack([low[touching], high[touching]], axis=1).astype(np.uint64)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), np.uint64)


def merge_table(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From id pairs that touch across faces: the ids to change (sorted) and their new ids,
    the smallest id of each connected component of the pair graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    ids, index = np.unique(pairs, return_inverse=True)
    index = index.reshape(pairs.shape)
    graph = coo_matrix((np.ones(len(pairs)), (index[:, 0], index[:, 1])), shape=(len(ids), len(ids)))
    _, component = connected_components(graph, directed=False)
    smallest = np.full(component.max() + 1, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(smallest, component, ids)
    new = smallest[component]
    changed = new != ids
    return ids[changed], new[changed]


def representatives(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids in ``pairs`` (sorted) and the representative of each: the smallest id of its
    connected component in the pair graph."""
    members = np.unique(pairs) if len(pairs) else np.zeros(0, np.uint64)
    old, new = merge_table(pairs)
    rep = members.copy()
    rep[np.searchsorted(members, old)] = new
    return members, rep


def kept_ids(count: int, sizes: np.ndarray | None, min_size: int, spanning: np.ndarray,
             spanning_kept: np.ndarray) -> np.ndarray:
    """Which of a block's local ids 0..count get an id of their own (index 0 never): those
    of at least ``min_size`` pixels (``sizes`` of ids 1..count), except the ``spanning`` ones
    (local ids merged across faces), which count only where ``spanning_kept`` (the kept
    representative of their object)."""
    kept = np.ones(count + 1, bool)
    if min_size > 1 and sizes is not None:
        kept[1:] = sizes >= min_size
    kept[0] = False
    kept[spanning.astype(np.int64)] = spanning_kept
    return kept


def block_ids(base: int, kept: np.ndarray, spanning: np.ndarray, spanning_final: np.ndarray) -> np.ndarray:
    """A block's local id -> global id table: kept ids numbered ``base + 1, base + 2, ...`` in
    local order, the rest 0, and the spanning ones their object's id (found by the merge)."""
    ids = np.where(kept, np.uint64(base) + np.cumsum(kept, dtype=np.uint64), np.uint64(0)).astype(np.uint64)
    ids[spanning.astype(np.int64)] = spanning_final
    return ids


def boundary_ids(labels: np.ndarray, faces: list[tuple[int, int]]) -> np.ndarray:
    """The nonzero ids on the given faces ``(axis, 0 | -1)`` of ``labels`` (sorted, unique)."""
    found = [np.unique(np.take(labels, side, axis=axis)) for axis, side in faces]
    ids = np.unique(np.concatenate(found)) if found else np.zeros(0, labels.dtype)
    return ids[ids > 0]


MEASURES = ("area", "sum", "low", "high", "probability", "intensity")


def measure(labels: np.ndarray, offset: tuple[int, ...], probability: np.ndarray,
            intensity: np.ndarray | None) -> dict[str, np.ndarray]:
    """Sums over each object's pixels in ``labels`` (placed at ``offset`` in the image), the
    partial measurements that add up across blocks: ``id``, ``area`` (pixels), ``sum`` of
    coordinates per axis, bounding box ``low`` (inclusive) and ``high`` (exclusive),
    ``probability`` summed, and ``intensity`` summed per channel (``intensity``: (C, ...))."""
    flat = labels.ravel()
    ids, inverse = np.unique(flat, return_inverse=True)
    nonzero = ids > 0
    n = len(ids)
    area = np.bincount(inverse, minlength=n).astype(np.int64)
    coords = np.indices(labels.shape, sparse=True)
    sums = np.stack([np.bincount(inverse, weights=np.broadcast_to(c + o, labels.shape).ravel(), minlength=n)
                     for c, o in zip(coords, offset)], axis=1)
    boxes = ndimage.find_objects(inverse.reshape(labels.shape).astype(np.int64) + 1)
    low = np.array([[s.start + o for s, o in zip(box, offset)] for box in boxes], np.int64).reshape(n, labels.ndim)
    high = np.array([[s.stop + o for s, o in zip(box, offset)] for box in boxes], np.int64).reshape(n, labels.ndim)
    prob = np.bincount(inverse, weights=probability.ravel().astype(np.float64), minlength=n)
    channels = 0 if intensity is None else intensity.shape[0]
    inten = np.stack([np.bincount(inverse, weights=intensity[c].ravel().astype(np.float64), minlength=n)
                      for c in range(channels)], axis=1) if channels else np.zeros((n, 0))
    return {"id": ids[nonzero].astype(np.uint64), "area": area[nonzero], "sum": sums[nonzero], "low": low[nonzero],
            "high": high[nonzero], "probability": prob[nonzero], "intensity": inten[nonzero]}


def combine(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Partial measurements of the same objects from several blocks, added up: one row per
    id (sorted). Parts are added in the order given, so the sums are reproducible."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("id", *MEASURES)}
    order = np.argsort(cat["id"], kind="stable")
    cat = {k: v[order] for k, v in cat.items()}
    ids, starts = np.unique(cat["id"], return_index=True)
    out = {"id": ids}
    for k in ("area", "sum", "probability", "intensity"):
        out[k] = np.add.reduceat(cat[k], starts, axis=0) if len(ids) else cat[k]
    out["low"] = np.minimum.reduceat(cat["low"], starts, axis=0) if len(ids) else cat["low"]
    out["high"] = np.maximum.reduceat(cat["high"], starts, axis=0) if len(ids) else cat["high"]
    return out
