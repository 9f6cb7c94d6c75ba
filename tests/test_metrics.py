import numpy as np
import pytest

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
