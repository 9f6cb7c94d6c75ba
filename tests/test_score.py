"""``overtile score``: the protocol's last step, reproducible from the command line: the
threshold chosen on slices that are never scored, the scored slices scored once, with the
challenge's measures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.numerics.metrics import (choose_merge_threshold, choose_pixel_threshold, pixel_error,
                                       score_segmentation, scores_at)

from conftest import write_zarr
from test_train import disks


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Five slices of disk cells and a uint8 probability image of them (255·p, as predict
    writes it) blurred and noisy, so that the best threshold is not 0.5."""
    from scipy import ndimage

    root = tmp_path_factory.mktemp("score")
    truth = np.stack([disks((64, 64), 8, seed=z)[1] > 0 for z in range(5)])
    rng = np.random.default_rng(0)
    p = np.clip(ndimage.gaussian_filter(truth.astype(np.float32), (0, 3, 3)) * 0.6 + 0.3 + rng.normal(0, 0.05, truth.shape),
                0, 1)
    q = np.rint(p * 255).astype(np.uint8)
    out = str(root / "p.zarr")
    storage.create_image(out, (2, *truth.shape), (2, 5, 64, 64), "uint8", "czyx")[...] = np.stack([255 - q, q])
    return out, write_zarr(root / "labels.zarr", (truth * 255).astype(np.uint8)), q.astype(np.float32) / 255, truth


def test_score_chooses_on_some_slices_and_scores_others_once(stack, tmp_path, capsys):
    probabilities, labels, p, truth = stack
    result_file = tmp_path / "scores.json"
    assert main(["score", probabilities, labels, "--axes", "zyx", "--slices", "3-4", "--choose-on", "0-2",
                 "--json", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    chosen = score_segmentation(p[:3], truth[:3]).threshold
    assert result["threshold"] == chosen and chosen != 0.5
    merge_error, merge = choose_merge_threshold(p[:3], truth[:3])
    assert result["merge_threshold"] == merge
    grown_error = score_segmentation(p[:3], truth[:3]).rand_error
    pixel_error_there, pixel_threshold = choose_pixel_threshold(p[:3], truth[:3])
    assert result["on_choice"] == pytest.approx({"rand_error": grown_error, "rand_error_agglomerated": merge_error,
                                                 "pixel_error": pixel_error_there})
    assert result["rule"] == ("agglomerated" if merge_error < grown_error else "grown")
    assert result["at_chosen"] == pytest.approx(scores_at(p[3:], truth[3:], chosen, merge_threshold=merge))
    assert 0 <= result["at_chosen"]["rand_error_agglomerated"] < 1
    assert result["at_0.5"] == pytest.approx(scores_at(p[3:], truth[3:], 0.5))
    shown = capsys.readouterr().out
    assert f"| {chosen:.1f} (chosen on 0-2) |" in shown and "Rand error (not grown)" in shown
    assert f"below {merge:.2f}, chosen on the same slices): {result['at_chosen']['rand_error_agglomerated']:.4f}" in shown
    assert f"{merge_error:.4f} agglomerated: the rule chosen there is {result['rule']}" in shown
    assert result["pixel_threshold"] == pixel_threshold
    assert result["pixel_error_at_pixel_threshold"] == pytest.approx(pixel_error(p[3:] > pixel_threshold, truth[3:]))
    assert f"Pixel error at {pixel_threshold:.2f} " in shown and f", {pixel_error_there:.4f} there)" in shown


def test_a_threshold_chosen_on_the_scored_slices_is_refused(stack, capsys):
    probabilities, labels, _, _ = stack
    assert main(["score", probabilities, labels, "--axes", "zyx", "--slices", "3-4", "--choose-on", "2-3"]) == 2
    assert "share [3]" in capsys.readouterr().err


def test_a_2d_image_is_named_as_such(tmp_path, capsys):
    probabilities = str(tmp_path / "p.zarr")
    storage.create_image(probabilities, (2, 32, 32), (2, 32, 32), "uint8", "cyx")[...] = 7
    labels = write_zarr(tmp_path / "l.zarr", np.ones((32, 32), np.uint8))
    assert main(["score", probabilities, labels, "--slices", "0"]) == 2
    err = capsys.readouterr().err
    assert "a 2-D image; score takes a z, y, x stack" in err, err
