import numpy as np
import pytest
from scipy import ndimage

from pipeline.numerics.metrics import cells_from_probability, iou, pixel_error, rand_error, score_segmentation


def two_cells():
    truth = np.zeros((20, 30), bool)
    truth[2:18, 2:14] = True
    truth[2:18, 16:28] = True  # a 2-px membrane between two cells
    return truth


def test_pixel_error_and_iou_by_hand():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 0, 1]], bool)
    assert pixel_error(a, b) == 0.5
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_perfect_prediction_scores_zero():
    truth = two_cells()
    s = score_segmentation(truth.astype(np.float32), truth)
    assert s.pixel_error == 0 and s.rand_error == pytest.approx(0, abs=1e-9) and s.iou == 1


def test_merged_cells_are_a_rand_error_not_much_of_a_pixel_error():
    truth = two_cells()
    merged = truth.copy()
    merged[8:10, 14:16] = True  # a 2×2 bridge merges the two cells
    s = score_segmentation(merged.astype(np.float32), truth)
    assert s.pixel_error < 0.01
    assert s.rand_error > 0.3  # one predicted cell for two true ones


def test_growing_fills_the_membrane_but_keeps_cells_apart():
    truth = two_cells()
    grown = cells_from_probability(truth.astype(np.float32), 0.5)
    assert (grown > 0).all() and len(np.unique(grown)) == 2
    assert rand_error(cells_from_probability(truth.astype(np.float32), 0.5, grow=False), grown) == pytest.approx(0, abs=1e-9)


def membrane_with_a_gap():
    """Two true cells side by side, 4-px membranes around them; P(cell) that draws the
    membrane between them with a 3-px gap, and a faint line across the right-hand cell."""
    truth = np.zeros((40, 50), bool)
    truth[4:36, 4:23] = True
    truth[4:36, 27:46] = True
    p = np.where(truth, 0.98, 0.02).astype(np.float32)
    p[18:21, 23:27] = 0.98  # the gap: one component of p > t for any t spans both cells
    p[24, 27:46] = 0.7  # a faint line inside the right-hand cell, not a border
    return p, truth


def test_agglomeration_keeps_cells_apart_across_a_gap_that_thresholding_merges():
    from pipeline.numerics.metrics import (MERGE_THRESHOLDS, agglomerated_cells, agglomerated_rand_error,
                                           choose_merge_threshold)

    p, truth = membrane_with_a_gap()
    true_cells = ndimage.label(truth)[0]
    for t in (0.3, 0.5, 0.7, 0.9, 0.95):
        assert rand_error(true_cells, cells_from_probability(p, t)) > 0.3  # merged, or the faint line splits
    cells = agglomerated_cells(p, 0.6)
    assert rand_error(true_cells, cells) == pytest.approx(0, abs=1e-9)
    assert cells.min() == 1 and len(np.unique(cells[truth])) == 2  # every pixel in a cell; the faint line merged
    assert rand_error(true_cells, agglomerated_cells(p, 0.99)) > 0.2  # merge nothing: the faint line splits a cell
    assert agglomerated_rand_error(np.stack([p, p]), np.stack([truth, truth]), 0.6) == pytest.approx(0, abs=1e-9)
    error, chosen = choose_merge_threshold(p, truth)
    assert error == pytest.approx(0, abs=1e-9) and chosen in MERGE_THRESHOLDS


def test_the_pixel_threshold_is_the_one_that_draws_membranes_as_thick_as_they_are():
    from pipeline.numerics.metrics import PIXEL_THRESHOLDS, choose_pixel_threshold

    truth = np.ones((2, 40, 40), bool)
    truth[:, :, 18:22] = False  # a membrane 4 px wide
    p = np.where(truth, 0.9, 0.05)
    p[:, :, 16:18] = p[:, :, 22:24] = 0.4  # the net draws it 8 px wide at 0.5
    assert pixel_error(p > 0.5, truth) == pytest.approx(4 / 40)
    error, chosen = choose_pixel_threshold(p, truth)
    assert error == 0 and chosen in PIXEL_THRESHOLDS and 0.05 <= chosen < 0.4
    assert choose_pixel_threshold(p, truth, thresholds=(0.5, 0.95)) == (pytest.approx(4 / 40), 0.5)


def test_the_choices_on_held_out_slices_take_the_rule_that_keeps_cells_apart():
    from pipeline.numerics.metrics import choose, choose_merge_threshold, choose_pixel_threshold

    p, truth = membrane_with_a_gap()
    p, truth = np.stack([p, p]), np.stack([truth, truth])
    c = choose(p, truth)
    grown = score_segmentation(p, truth)
    assert (c.threshold, c.rand_error) == (grown.threshold, pytest.approx(grown.rand_error))
    assert (c.rand_error_agglomerated, c.merge_threshold) == choose_merge_threshold(p, truth)
    assert (c.pixel_error, c.pixel_threshold) == choose_pixel_threshold(p, truth)
    assert c.rand_error > 0.3 and c.rule == "agglomerated" and c.rule_error == pytest.approx(0, abs=1e-9)


def test_touching_instances_stay_two_cells_in_the_truth():
    """Instance labels with no gap between two cells: separating them is right and merging
    them is wrong (connected components of labels > 0 would say the opposite)."""
    from pipeline.numerics.metrics import score_segmentation, scores_at, truth_of

    labels = np.zeros((20, 40), np.uint16)
    labels[2:18, 2:20], labels[2:18, 20:38] = 5, 9  # touching along x = 20
    apart = np.ones(labels.shape, np.float32)
    apart[:, 19:21] = 0.0  # a membrane drawn between them
    merged = np.ones(labels.shape, np.float32)
    truth = truth_of(labels)
    assert truth.dtype == np.uint16  # instances kept
    assert scores_at(apart, truth, 0.5)["rand_error"] < 0.05 < scores_at(merged, truth, 0.5)["rand_error"]
    assert score_segmentation(apart, truth).rand_error < score_segmentation(merged, truth).rand_error
    mask = truth_of(np.where(labels > 0, 255, 0).astype(np.uint8))  # a mask: cells are its components
    assert mask.dtype == bool and scores_at(merged, mask, 0.5)["rand_error"] < 0.05
    as_stored = np.where(labels > 0, 255, 0).astype(np.uint8)  # a 0/255 mask given as it is: still a mask
    assert scores_at(merged, as_stored, 0.5)["rand_error"] == scores_at(merged, mask, 0.5)["rand_error"]
