"""The U-Net weight map (eq. 2): the fast map equals its naive whole-image definition, follows
the paper's formula on hand-made cases, and rejects bad input with one clear message."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.numerics.weightmap import balanced_class_weights, class_frequencies, weight_map, weight_map_naive

NUCLEI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuclei"
EXACT = 1e-4  # the promise: fast within this of naive


def nuclei(name: str) -> np.ndarray:
    path = NUCLEI / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    import tifffile

    return tifffile.imread(path)


def touching_cells(shape: tuple[int, ...], pitch: float, seed: int = 0) -> np.ndarray:
    """Cells around random seeds: discs cut by the Voronoi boundaries of their neighbours, so
    that neighbours whose discs overlap touch; some reach the image border."""
    rng = np.random.default_rng(seed)
    count = max(2, round(np.prod(shape) / pitch ** len(shape)))
    marker = np.zeros(shape, np.int32)
    marker[tuple(rng.integers(0, n, count) for n in shape)] = np.arange(1, count + 1)
    distance, index = ndimage.distance_transform_edt(marker == 0, return_indices=True)
    nearest = marker[tuple(index)]
    radius = np.concatenate([[0.0], rng.uniform(0.4, 0.8, count) * pitch])
    return np.where(distance <= radius[nearest], nearest, 0).astype(np.uint16)


def two_cells_with_gap(gap: int = 1) -> np.ndarray:
    labels = np.zeros((9, 10 + gap), np.uint8)
    labels[2:7, 1:5] = 1
    labels[2:7, 5 + gap : 9 + gap] = 2
    return labels


def assert_equals_naive(labels, **kwargs):
    fast, naive = weight_map(labels, **kwargs), weight_map_naive(labels, **kwargs)
    assert fast.dtype == np.float32 and fast.shape == np.shape(labels)
    np.testing.assert_allclose(fast, naive, rtol=0, atol=EXACT)
    return fast


# --- exact: fast equals the naive definition ----------------------------------------------


def test_equals_naive_on_nuclei_mask2d():
    labels = nuclei("mask2d.tif")
    weights = assert_equals_naive(labels)
    assert weights.max() > 5  # touching nuclei light up


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5, 0.5)])
def test_equals_naive_on_nuclei_mask3d(spacing):
    assert_equals_naive(nuclei("mask3d.tif"), spacing=spacing)


@pytest.mark.parametrize("shape, pitch, sigma", [((200, 180), 15, 3.0), ((97, 131), 12, 5.0), ((40, 48, 44), 12, 2.0)])
def test_equals_naive_on_touching_cells(shape, pitch, sigma):
    labels = touching_cells(shape, pitch)
    left, right = labels[:, :-1], labels[:, 1:]
    assert np.any((left > 0) & (right > 0) & (left != right))  # some cells touch
    assert_equals_naive(labels, sigma=sigma)


def test_equals_naive_for_cells_cut_by_the_image_border():
    labels = touching_cells((150, 150), 20, seed=3)[37:137, 41:141]  # a window: cells cut on all sides
    assert all(np.any(edge) for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]))
    assert_equals_naive(labels, sigma=3.0)


@pytest.mark.parametrize("spacing, sigma", [((1.0, 3.0), 8.0), ((0.4, 0.25), 1.5)])
def test_equals_naive_with_anisotropic_spacing(spacing, sigma):
    assert_equals_naive(touching_cells((120, 90), 14, seed=1), spacing=spacing, sigma=sigma)


def test_equals_naive_on_a_strided_view_with_sparse_large_ids():
    labels = touching_cells((160, 160), 16, seed=2).astype(np.int64) * 1_000_003  # ids far beyond the size
    assert_equals_naive(labels[::2, 1::2], sigma=2.0)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    pitch=st.floats(3, 12),
    w0=st.floats(0, 50),
    sigma=st.floats(0.5, 8),
    spacing=st.tuples(st.floats(0.3, 3), st.floats(0.3, 3)),
)
def test_equals_naive_on_random_masks(seed, shape, pitch, w0, sigma, spacing):
    assert_equals_naive(touching_cells(shape, pitch, seed), w0=w0, sigma=sigma, spacing=spacing)


# --- the paper's formula on cases worked by hand -----------------------------------------


def test_one_pixel_gap_gets_the_paper_border_term():
    labels = two_cells_with_gap(1)
    weights = weight_map(labels, w0=10, sigma=5, class_weights=(1.0, 1.0))
    # In the gap both cells are one pixel away: w = 1 + 10 exp(-(1 + 1)² / (2 · 5²)).
    np.testing.assert_allclose(weights[2:7, 5], 1 + 10 * np.exp(-4 / 50), rtol=1e-6)
    # Left of cell 1: d1 = 1, d2 = 6 (across cell 1's four pixels and the gap).
    np.testing.assert_allclose(weights[4, 0], 1 + 10 * np.exp(-(1 + 6) ** 2 / 50), rtol=1e-6)


def test_border_term_is_on_background_only():
    labels = touching_cells((80, 80), 12)
    class_weights = (0.5, 2.0)
    weights = weight_map(labels, class_weights=class_weights)
    assert np.all(weights[labels > 0] == np.float32(2.0))
    assert np.all(weights[labels == 0] >= np.float32(0.5)) and weights[labels == 0].max() > 5


def test_thinner_gap_weighs_more():
    assert weight_map(two_cells_with_gap(1))[4, 5] > weight_map(two_cells_with_gap(3))[4, 6]


def test_one_cell_has_no_border_term():
    labels = np.zeros((30, 40), np.uint16)
    labels[5:15, 10:30] = 7
    n = labels.size
    expected = np.where(labels == 0, n / (2 * (n - 200)), n / (2 * 200)).astype(np.float32)
    np.testing.assert_array_equal(weight_map(labels), expected)


@pytest.mark.parametrize("value", [0, 3])
def test_one_class_only_gets_weight_one(value):
    labels = np.full((16, 9, 5), value, np.uint8)
    np.testing.assert_array_equal(weight_map(labels), np.ones(labels.shape, np.float32))


def test_no_cells_with_given_class_weights_is_the_background_weight():
    assert np.all(weight_map(np.zeros((10, 10), np.int32), class_weights=(0.25, 4.0)) == np.float32(0.25))


def test_zero_w0_leaves_only_the_class_weights():
    labels = two_cells_with_gap(1)
    weights = weight_map(labels, w0=0, class_weights={"background": 1.5, "foreground": 3.0})
    np.testing.assert_array_equal(weights, np.where(labels == 0, 1.5, 3.0).astype(np.float32))


def test_sigma_is_in_the_units_of_spacing():
    labels = touching_cells((90, 90), 15)
    np.testing.assert_allclose(weight_map(labels, sigma=10.0, spacing=2.0), weight_map(labels, sigma=5.0), atol=1e-5)


def test_non_consecutive_ids_do_not_matter():
    labels = touching_cells((70, 70), 12)
    relabelled = np.where(labels > 0, labels.astype(np.int64) * 7 + 100, 0)
    np.testing.assert_allclose(weight_map(relabelled), weight_map(labels), atol=1e-6)


# --- binary masks -------------------------------------------------------------------------


def test_binary_mask_equals_its_connected_components():
    labels = touching_cells((100, 100), 14)
    mask = labels > 0
    components, _ = ndimage.label(mask)
    expected = weight_map(components)
    np.testing.assert_array_equal(weight_map(mask, binary=True), expected)
    np.testing.assert_array_equal(weight_map(mask.astype(np.uint8), binary=True), expected)
    np.testing.assert_allclose(weight_map_naive(mask, binary=True), expected, atol=EXACT)


def test_binary_cells_touching_at_a_corner_stay_two_cells():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:4] = 1
    mask[4:7, 4:7] = 1  # meets the first square only at a corner
    weights = weight_map(mask, binary=True, class_weights=(1.0, 1.0))
    assert weights[3, 4] > 9  # the diagonal gap: d1 = d2 = 1
    np.testing.assert_array_equal(weights, weight_map(ndimage.label(mask)[0], class_weights=(1.0, 1.0)))


# --- class balance for blockwise callers ---------------------------------------------------


def test_default_class_weights_balance_the_classes():
    labels = touching_cells((64, 64), 10)
    n_background, n_foreground = class_frequencies(labels)
    assert n_background + n_foreground == labels.size
    assert n_foreground == np.count_nonzero(labels)
    w_background, w_foreground = balanced_class_weights((n_background, n_foreground))
    assert w_background * n_background == pytest.approx(w_foreground * n_foreground)  # equal share
    assert w_background * n_background + w_foreground * n_foreground == pytest.approx(labels.size)
    weights = weight_map(labels, w0=0)
    np.testing.assert_allclose(weights[labels == 0], w_background, rtol=1e-6)
    np.testing.assert_allclose(weights[labels > 0], w_foreground, rtol=1e-6)


def test_block_frequencies_sum_to_the_whole_and_give_global_weights():
    labels = touching_cells((96, 80), 12)
    blocks = [labels[y : y + 32, x : x + 40] for y in range(0, 96, 32) for x in range(0, 80, 40)]
    total = tuple(int(n) for n in np.sum([class_frequencies(b) for b in blocks], axis=0))
    assert total == class_frequencies(labels)
    global_weights = balanced_class_weights(total)
    block = blocks[4]
    np.testing.assert_array_equal(
        weight_map(block, class_weights=global_weights),
        weight_map(block, class_weights={0: global_weights[0], 1: global_weights[1]}),
    )
    np.testing.assert_allclose(weight_map(block, class_weights=global_weights, w0=0)[block == 0], global_weights[0])


def test_an_absent_class_gets_weight_zero():
    assert balanced_class_weights((10, 0)) == (1.0, 0.0)
    assert balanced_class_weights((0, 4)) == (0.0, 1.0)


# --- bad input: one clear message -----------------------------------------------------------


GOOD = two_cells_with_gap(1)


@pytest.mark.parametrize(
    "labels, kwargs, message",
    [
        (GOOD.astype(np.float32), {}, "float32 labels; expected integers"),
        (GOOD.astype(np.int16) - 1, {}, "negative label -1"),
        (np.zeros((0, 5), np.uint8), {}, "empty array"),
        (np.uint8(3), {}, "a scalar"),
        (GOOD > 0, {}, "pass binary=True"),
        (GOOD, {"binary": True}, "binary=True but the array holds 2"),
        (GOOD, {"sigma": 0}, "sigma: 0.0; expected a finite number > 0"),
        (GOOD, {"sigma": -1.0}, "sigma"),
        (GOOD, {"sigma": float("nan")}, "sigma"),
        (GOOD, {"w0": -0.5}, "w0: -0.5; expected a finite number >= 0"),
        (GOOD, {"spacing": (1.0, 0.0)}, "spacing"),
        (GOOD, {"spacing": (1.0, 1.0, 1.0)}, "expected one value or 2"),
        (GOOD, {"class_weights": (1.0,)}, "expected (background, foreground)"),
        (GOOD, {"class_weights": {0: 1.0, 2: 1.0}}, "expected 0 and 1"),
        (GOOD, {"class_weights": (1.0, -2.0)}, "class_weights"),
    ],
)
def test_bad_input_raises_input_error(labels, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        weight_map(labels, **kwargs)
    with pytest.raises(InputError):
        weight_map_naive(labels, **kwargs)


@pytest.mark.parametrize("counts", [(0, 0), (-1, 3), (1.5, 2), (1, 2, 3)])
def test_bad_counts_raise_input_error(counts):
    with pytest.raises(InputError, match="counts"):
        balanced_class_weights(counts)
