"""bench/isbi2012.py's honest protocol: every choice, the checkpoint among them, is made on
slices 15-19 and slices 20-24 are scored once with what was chosen. Two checkpoints that
differ only in sign of the last layer (one predicts the cells, the other their inverse) must
be told apart on 15-19 whichever file, best.pt or last.pt, holds the right one."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.jobs.train import train
from pipeline.numerics.unet import atomic_save, read_checkpoint

from conftest import write_zarr
from test_train import NO_AUGMENTATION, disks, settings

BENCH = Path(__file__).resolve().parents[1] / "bench" / "isbi2012.py"


@pytest.fixture(scope="module")
def isbi2012():
    spec = importlib.util.spec_from_file_location("bench_isbi2012", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory, isbi2012):
    """A 25-slice stack of disk cells, a tiny U-Net trained on 0-14, and two run folders:
    the trained model as best.pt with its inverse as a later last.pt, and the other way round."""
    root = tmp_path_factory.mktemp("protocol")
    images, masks = zip(*(disks((64, 64), 6, seed=z) for z in range(25)))
    images = write_zarr(root / "img.zarr", np.stack(images))
    labels = write_zarr(root / "lab.zarr", (np.stack(masks) > 0).astype(np.uint8) * 255)
    trained = root / "trained"
    train(settings(images, labels, trained, axes="zyx", dims=2, steps=40, lr=0.01, val_every=20,
                   val_slices=tuple(isbi2012.PROTOCOL["choose"]), test_slices=tuple(isbi2012.PROTOCOL["score"]),
                   **NO_AUGMENTATION))
    good = read_checkpoint(trained / "last.pt")
    last_layer = [k for k in good["state_dict"] if k.endswith(".weight")][-1].removesuffix(".weight")
    inverse = {**good, "state_dict": {k: -v if k.startswith(last_layer + ".") else v for k, v in good["state_dict"].items()}}
    folders = {}
    for name, (best, last) in {"trained-best": (good, inverse), "trained-last": (inverse, good)}.items():
        folders[name] = root / name
        folders[name].mkdir()
        (folders[name] / "log.csv").write_text((trained / "log.csv").read_text())
        atomic_save({**best, "training": {**good["training"], "step": 20}}, folders[name] / "best.pt")
        atomic_save({**last, "training": {**good["training"], "step": 40}}, folders[name] / "last.pt")
    return images, labels, folders


def protocol_args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"protocol_tta": "none", "protocol_checkpoint": "choose", "val_tile_size": 92, **kwargs})


@pytest.mark.parametrize("folder, right", [("trained-best", "best.pt"), ("trained-last", "last.pt")])
def test_the_protocol_chooses_the_checkpoint_on_held_out_slices(isbi2012, runs, folder, right):
    images, labels, folders = runs
    chosen = isbi2012.protocol_scores(folders[folder], 0, images, labels, protocol_args())
    assert [c["checkpoint"] for c in chosen["on_choice"]] == ["best.pt", "last.pt"]
    wrong = next(c for c in chosen["on_choice"] if c["checkpoint"] != right)
    kept = next(c for c in chosen["on_choice"] if c["checkpoint"] == right)
    assert kept["pixel_error"] < 0.5 < wrong["pixel_error"] and kept["rand_error"] < wrong["rand_error"]
    assert chosen["checkpoint"] == chosen["joint"]["checkpoint"] == chosen["pixel"]["checkpoint"] == right
    assert chosen["step"] == (20 if right == "best.pt" else 40) and chosen["best_step"] == 20
    # the score of 20-24 is the one the right checkpoint alone gets: the choice saw only 15-19
    fixed = isbi2012.protocol_scores(folders[folder], 0, images, labels,
                                     protocol_args(protocol_checkpoint=right.removesuffix(".pt")))
    assert [c["checkpoint"] for c in fixed["on_choice"]] == [right]
    for key in ("at_0.5", "at_chosen", "joint", "pixel", "threshold", "merge_threshold"):
        assert chosen[key] == fixed[key], key


def test_last_pt_at_best_pts_step_is_not_a_second_candidate(isbi2012, runs, tmp_path):
    images, labels, folders = runs
    folder = folders["trained-best"]
    for name in ("best.pt", "last.pt", "log.csv"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    atomic_save({**payload, "training": {**payload["training"], "step": 20}}, tmp_path / "last.pt")
    chosen = isbi2012.protocol_scores(tmp_path, 0, images, labels, protocol_args())
    assert [c["checkpoint"] for c in chosen["on_choice"]] == ["best.pt"]
