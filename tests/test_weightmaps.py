"""Weight maps blockwise over Zarr on a real LocalCluster equal the in-memory map."""

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from pipeline.jobs.weights import WeightSettings, weight_maps
from pipeline.numerics.weightmap import touching_borders, weight_map, weight_map_naive, with_gaps

from conftest import write_zarr


def touching_cells(shape, seed=0, n=40):
    """Discs that touch and cross block borders, each its own id."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    grid = np.indices(shape)
    for i in range(1, n + 1):
        centre = rng.uniform(0, shape)
        r = rng.uniform(5, 12)
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
        labels[inside & (labels == 0)] = i
    return labels


@pytest.mark.parametrize("block", [32, 50, 200])
@pytest.mark.slow
def test_blockwise_equals_in_memory(client, tmp_path, block):
    labels = touching_cells((150, 130))
    url = write_zarr(tmp_path / "labels.zarr", labels, chunks=(32, 32))
    job, summary = weight_maps(WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), block_size=block), client=client)
    out = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"][...]
    np.testing.assert_allclose(out, weight_map(with_gaps(labels)), atol=1e-4)
    assert out.dtype == np.float32 and summary.done == summary.total
    gap = touching_borders(labels)
    assert gap.sum() > 50  # the discs touch: the gap is drawn, and counted as background
    assert job.counts == (int((labels == 0).sum() + gap.sum()), int((labels > 0).sum() - gap.sum()))


@pytest.mark.slow
def test_touching_instances_get_the_gap_and_its_border_term(client, tmp_path):
    """Two cells drawn touching (no background between them) get the paper's one-pixel gap
    where they meet, as training draws it, and the border term there: the map of the labels
    with the gap, by the definition; without the gap the term would be absent there."""
    labels = np.zeros((60, 70), np.uint16)
    labels[10:50, 5:35], labels[10:50, 35:65] = 3, 9
    url = write_zarr(tmp_path / "labels.zarr", labels, chunks=(16, 16))
    weight_maps(WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), block_size=16, sigma=3), client=client)
    out = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"][...]
    gapped = labels.copy()
    gapped[10:50, 35] = 0  # the higher id's side
    np.testing.assert_allclose(out, weight_map_naive(gapped, sigma=3), atol=1e-4)
    assert out[30, 35] > 8 > 2 > out[30, 20]  # w_c + w0·exp(-(1 + 1)² / 2σ²) on the gap, w_c inside a cell


@pytest.mark.slow
def test_blocks_inside_a_cell_equal_in_memory(client, tmp_path):
    """Four large cells with thin gaps: most blocks (with their halo) see no background, and
    their smallest id must stay a cell, not become background."""
    labels = np.zeros((160, 160), np.uint16)
    for i, (ys, xs) in enumerate(((slice(0, 78), slice(0, 78)), (slice(0, 78), slice(81, 160)),
                                  (slice(81, 160), slice(0, 78)), (slice(81, 160), slice(81, 160))), start=7):
        labels[ys, xs] = i
    url = write_zarr(tmp_path / "labels.zarr", labels, chunks=(32, 32))
    weight_maps(WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), block_size=16, sigma=2), client=client)
    out = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"][...]
    np.testing.assert_allclose(out, weight_map(labels, sigma=2), atol=1e-4)


@pytest.mark.slow
def test_3d_blockwise_equals_in_memory(client, tmp_path):
    labels = touching_cells((20, 40, 36), n=15)
    url = write_zarr(tmp_path / "labels.zarr", labels, chunks=(8, 16, 16))
    weight_maps(WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), axes="zyx", block_size=16, sigma=3), client=client)
    out = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"][...]
    np.testing.assert_allclose(out, weight_map(with_gaps(labels), sigma=3), atol=1e-4)


@pytest.mark.slow
def test_binary_mask_gets_global_instances(client, tmp_path):
    labels = touching_cells((120, 140), seed=3)
    mask = (labels > 0).astype(np.uint8)
    url = write_zarr(tmp_path / "mask.zarr", mask, chunks=(32, 32))
    weight_maps(WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), binary=True, block_size=40), client=client)
    out = zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"][...]
    np.testing.assert_allclose(out, weight_map(mask, binary=True), atol=1e-4)


@pytest.mark.slow
def test_rerun_resumes_and_says_so(client, tmp_path):
    url = write_zarr(tmp_path / "labels.zarr", touching_cells((100, 100)))
    settings = WeightSettings(labels=url, output=str(tmp_path / "w.zarr"), block_size=50)
    first = weight_maps(settings, client=client)[1]
    ledger = zarr.open_array(str(tmp_path / "w.zarr" / "ledger"), mode="r+")
    ledger[1, 1] = 0
    second = weight_maps(settings, client=client)[1]
    assert first.done == 4 and second.done == 1 and second.skipped == 3


def test_cli_bad_labels(tmp_path, capsys):
    for name, data, message in [
        ("float.zarr", np.zeros((20, 20), np.float32), "float32 labels; expected integers"),
        ("negative.zarr", -np.ones((20, 20), np.int32), "negative label -1"),
    ]:
        url = write_zarr(tmp_path / name, data)
        assert main(["weights", url, str(tmp_path / "w.zarr"), "--workers", "1", "--quiet"]) == 2
        assert message in capsys.readouterr().err
    url = write_zarr(tmp_path / "ok.zarr", np.zeros((20, 20), np.uint8))
    assert main(["weights", url, str(tmp_path / "w.zarr"), "--sigma", "0", "--quiet"]) == 2
    assert "--sigma" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_all_background_and_preview(tmp_path, capsys):
    url = write_zarr(tmp_path / "empty.zarr", np.zeros((40, 30), np.uint8))
    png = tmp_path / "w.png"
    assert main(["weights", url, str(tmp_path / "w.zarr"), "--workers", "1", "--quiet", "--preview", str(png)]) == 0
    assert (zarr.open_group(str(tmp_path / "w.zarr"), mode="r")["0"][...] == 1).all()
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_mask_labelling_across_blocks_matches_whole_image_labelling(client, tmp_path):
    from scipy import ndimage

    from pipeline.storage import create_image, open_image
    from pipeline.jobs.weights import label_mask

    mask = np.zeros((90, 100), np.uint8)
    mask[5:85, 5:9] = mask[5:85, 90:94] = mask[80:85, 5:94] = 1  # a U crossing many blocks, joined late
    mask[20:30, 30:60] = 1
    mask[40, :] = 1  # touches the U's arms: all one cell with it
    mask[60:62, 40:42] = 1
    url = write_zarr(tmp_path / "mask.zarr", mask, chunks=(16, 16))
    create_image(str(tmp_path / "out.zarr"), mask.shape, (16, 16), "float32", "yx")
    instances = zarr.open_array(label_mask(client, open_image(url), str(tmp_path / "out.zarr"), (16, 16)), mode="r")[...]
    whole, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, 1))
    assert len(np.unique(instances[instances > 0])) == n == 3
    for cell in range(1, n + 1):  # the same partition of the foreground
        assert len(np.unique(instances[whole == cell])) == 1
