"""Segmentation scores as the ISBI 2012 challenge and the U-Net paper report them.

- pixel error: the fraction of pixels whose binary class (cell / membrane) is wrong;
- Rand error, foreground-restricted: ``1 − F-score`` of the adapted Rand index
  (``skimage.metrics.adapted_rand_error``) between the true cells and predicted cells,
  ignoring pixels that are membrane in the ground truth;
- IoU of the cell class.

Predicted cells come from a cell probability map as the challenge made them: threshold (the
best of a sweep), connected components, then grown over the predicted membrane until they
meet (the challenge thinned borders to one pixel). The raw figure, without growing, is
reported beside it. A second rule, :func:`agglomerated_cells`, keeps two cells apart across a
gap of a few pixels in their membrane, where components of ``p > threshold`` merge them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage


def pixel_error(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of pixels whose binary class differs (inputs: boolean or 0/1 cell masks)."""
    return float(np.mean(np.asarray(predicted, bool) != np.asarray(truth, bool)))


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(predicted, bool), np.asarray(truth, bool)
    union = np.logical_or(p, t).sum()
    return float(np.logical_and(p, t).sum() / union) if union else 1.0


def cells_from_probability(cell_probability: np.ndarray, threshold: float, grow: bool = True) -> np.ndarray:
    """Cell instances: connected components of ``p > threshold``, optionally grown over the
    membrane (every pixel joins its nearest component) as the challenge's thin borders do."""
    labels, _ = ndimage.label(cell_probability > threshold)
    if grow and labels.any():
        _, index = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        labels = labels[tuple(index)]
    return labels


MERGE_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def agglomerated_cells(cell_probability: np.ndarray, merge_threshold: float, seed_threshold: float = 0.95,
                       sigma: float = 1.0) -> np.ndarray:
    """Cell instances that survive gaps in the membrane: fragments, then merged by their border.

    1. **fragments**: the components of ``p > seed_threshold`` (``p`` smoothed by a Gaussian of
       ``sigma`` px), grown over the rest by a watershed of the membrane probability ``1 - p``,
       so that borders run along the membrane's ridge;
    2. **merging**: neighbouring fragments merge, the pair with the weakest border first, while
       the mean membrane probability along their shared border is below ``merge_threshold``
       (a merged border's mean is the pixel-weighted mean of the borders it joins).

    A gap of a few pixels in a membrane barely lowers the mean along a whole border, so the
    two cells stay apart where a threshold merges them; a faint line inside one cell is merged
    away. Labels are 1..n; every pixel belongs to a cell, as with growing."""
    from skimage import graph
    from skimage.segmentation import watershed

    p = np.asarray(cell_probability, np.float32)
    if sigma:
        p = ndimage.gaussian_filter(p, sigma)
    membrane = 1.0 - p
    seeds, count = ndimage.label(p > seed_threshold)
    if count < 2:
        return seeds if count == 0 else np.ones_like(seeds)
    fragments = watershed(membrane, seeds)
    borders = graph.rag_boundary(fragments, membrane)

    def joined(g, src: int, dst: int, n: int) -> dict:
        a, b = g[src].get(n, {"weight": 0.0, "count": 0}), g[dst].get(n, {"weight": 0.0, "count": 0})
        count = a["count"] + b["count"]
        return {"count": count, "weight": (a["count"] * a["weight"] + b["count"] * b["weight"]) / count}

    merged = graph.merge_hierarchical(fragments, borders, thresh=merge_threshold, rag_copy=False,
                                      in_place_merge=True, merge_func=lambda g, src, dst: None,
                                      weight_func=joined)
    return merged + 1  # merge_hierarchical numbers cells from 0


def agglomerated_rand_error(cell_probability: np.ndarray, truth_cell_mask: np.ndarray, merge_threshold: float) -> float:
    """Rand error of :func:`agglomerated_cells`, each slice of a stack scored and averaged."""
    prob, true_cells = _stack_cells(cell_probability, truth_cell_mask)
    return _mean_rand_error(true_cells, prob, lambda p: agglomerated_cells(p, merge_threshold))


def choose_merge_threshold(cell_probability: np.ndarray, truth_cell_mask: np.ndarray,
                           thresholds: Sequence[float] = MERGE_THRESHOLDS) -> tuple[float, float]:
    """``(Rand error, merge threshold)`` of the merge threshold with the lowest Rand error."""
    prob, true_cells = _stack_cells(cell_probability, truth_cell_mask)
    return min((_mean_rand_error(true_cells, prob, lambda p, m=m: agglomerated_cells(p, m)), m) for m in thresholds)


PIXEL_THRESHOLDS = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.1, 0.15, ..., 0.9


def choose_pixel_threshold(cell_probability: np.ndarray, truth_cell_mask: np.ndarray,
                           thresholds: Sequence[float] = PIXEL_THRESHOLDS) -> tuple[float, float]:
    """``(pixel error, threshold)`` of the threshold with the lowest pixel error: the one that
    draws membranes as thick as they are, usually not the one that keeps cells apart best."""
    prob, truth = _stack(cell_probability, truth_cell_mask)
    return min((pixel_error(prob > t, truth), t) for t in thresholds)


def rand_error(truth_cells: np.ndarray, predicted_cells: np.ndarray) -> float:
    """Foreground-restricted adapted Rand error: pixels with true label 0 are ignored."""
    from skimage.metrics import adapted_rand_error

    error, _, _ = adapted_rand_error(truth_cells, predicted_cells, ignore_labels=(0,))
    return float(error)


@dataclass(frozen=True)
class Scores:
    pixel_error: float
    rand_error: float  # best threshold, cells grown over the membrane
    rand_error_raw: float  # best threshold, components as they are
    iou: float
    threshold: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def scores_at(cell_probability: np.ndarray, truth_cell_mask: np.ndarray, threshold: float,
              merge_threshold: float | None = None) -> dict[str, float]:
    """Every score at one ``threshold``: pixel error, Rand error grown and not grown, IoU, and
    with ``merge_threshold`` the Rand error of :func:`agglomerated_cells` too. Slices of a
    stack ``(Z, Y, X)`` are scored separately and averaged, as the challenge did."""
    prob, truth = _stack(cell_probability, truth_cell_mask)
    true_cells = [_true_cells(t) for t in truth]
    scores = {
        "pixel_error": pixel_error(prob > threshold, truth),
        "rand_error": _mean_rand_error(true_cells, prob, lambda p: cells_from_probability(p, threshold)),
        "rand_error_raw": _mean_rand_error(true_cells, prob, lambda p: cells_from_probability(p, threshold, grow=False)),
        "iou": iou(prob > threshold, truth),
    }
    if merge_threshold is not None:
        scores["rand_error_agglomerated"] = _mean_rand_error(true_cells, prob,
                                                             lambda p: agglomerated_cells(p, merge_threshold))
    return scores


def _mean_rand_error(true_cells: list[np.ndarray], prob: np.ndarray, cells: Callable[[np.ndarray], np.ndarray]) -> float:
    """The Rand error of the cells a rule draws from each slice, averaged over the slices."""
    return float(np.mean([rand_error(tc, cells(p)) for tc, p in zip(true_cells, prob)]))


def _stack_cells(cell_probability: np.ndarray, truth_cell_mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The probabilities as a stack, and the true cells of each slice (labelled once)."""
    prob, truth = _stack(cell_probability, truth_cell_mask)
    return prob, [_true_cells(t) for t in truth]


def truth_of(labels: np.ndarray) -> np.ndarray:
    """What the scores take as truth from a label image: a mask (at most two values: cells are
    its connected components, as in ISBI 2012's membranes) as bool, instance labels (more
    values) as they are, so touching instances stay two cells."""
    labels = np.asarray(labels)
    return labels > 0 if len(np.unique(labels)) <= 2 else labels


def _true_cells(truth: np.ndarray) -> np.ndarray:
    """One slice's true cells: the components of a mask, or the instance ids themselves."""
    return ndimage.label(truth)[0] if truth.dtype == bool else truth


def _stack(cell_probability: np.ndarray, truth_cell_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities and the truth as stacks; a truth that is no mask stays instance ids."""
    prob = np.asarray(cell_probability, np.float32)
    truth = np.asarray(truth_cell_mask)
    truth = truth_of(truth) if truth.dtype.kind in "ui" else truth > 0  # e.g. 0/1 or 0/255: a mask
    if prob.shape != truth.shape:
        raise ValueError(f"probabilities {prob.shape} and truth {truth.shape} differ in shape")
    return (prob[None], truth[None]) if prob.ndim == 2 else (prob, truth)


def score_segmentation(
    cell_probability: np.ndarray,
    truth_cell_mask: np.ndarray,
    thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
) -> Scores:
    """All scores for a stack or image of cell probabilities against a true cell mask.

    Slices of a stack ``(Z, Y, X)`` are scored separately (as the challenge did) and their
    errors averaged; pixel error and IoU use the threshold 0.5.
    """
    prob, truth = _stack(cell_probability, truth_cell_mask)
    true_cells = [_true_cells(t) for t in truth]
    best = (np.inf, np.inf, 0.5)
    for t in thresholds:
        grown = _mean_rand_error(true_cells, prob, lambda p: cells_from_probability(p, t))
        raw = _mean_rand_error(true_cells, prob, lambda p: cells_from_probability(p, t, grow=False))
        if grown < best[0]:
            best = (grown, raw, t)
    return Scores(pixel_error(prob > 0.5, truth), float(best[0]), float(best[1]), iou(prob > 0.5, truth), best[2])


@dataclass(frozen=True)
class Choices:
    """What a set of choice slices chooses, with each choice's error there: the threshold of
    grown cells, the merge threshold of agglomerated cells, the threshold with the lowest
    pixel error, and the rule (grown or agglomerated) whose Rand error is lower."""

    threshold: float
    rand_error: float
    merge_threshold: float
    rand_error_agglomerated: float
    pixel_threshold: float
    pixel_error: float

    @property
    def rule(self) -> str:
        return "agglomerated" if self.rand_error_agglomerated < self.rand_error else "grown"

    @property
    def rule_error(self) -> float:
        return min(self.rand_error, self.rand_error_agglomerated)


def choose(cell_probability: np.ndarray, truth_cell_mask: np.ndarray) -> Choices:
    """Every choice ``overtile score --choose-on`` and the bench's protocol make on the choice
    slices (never the scored ones)."""
    grown = score_segmentation(cell_probability, truth_cell_mask)
    merge_error, merge = choose_merge_threshold(cell_probability, truth_cell_mask)
    pixel_error_, pixel_threshold = choose_pixel_threshold(cell_probability, truth_cell_mask)
    return Choices(grown.threshold, grown.rand_error, merge, merge_error, pixel_threshold, pixel_error_)
