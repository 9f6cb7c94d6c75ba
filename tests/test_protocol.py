"""bench/isbi2012.py's honest protocol: every choice, the checkpoint among them, is made on
slices 15-19 and slices 20-24 are scored once with what was chosen. Two checkpoints that
differ only in the sign of the last layer (one predicts the cells, the other their inverse)
must be told apart on 15-19 whichever file, best.pt or last.pt, holds the right one."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

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
    """A 25-slice stack of disk cells (and its labels with 20-24 inverted), a tiny U-Net
    trained on 0-14, and two run folders: the trained model as best.pt with its inverse as a
    later last.pt, and the other way round."""
    root = tmp_path_factory.mktemp("protocol")
    images, masks = zip(*(disks((64, 64), 6, seed=z) for z in range(25)))
    cells = (np.stack(masks) > 0).astype(np.uint8) * 255
    images = write_zarr(root / "img.zarr", np.stack(images))
    labels = write_zarr(root / "lab.zarr", cells)
    scored = isbi2012.PROTOCOL["score"]
    cells[scored.start:scored.stop] = 255 - cells[scored.start:scored.stop]
    inverted_scored_labels = write_zarr(root / "inverted.zarr", cells)
    trained = root / "trained"
    train(settings(images, labels, trained, axes="zyx", dims=2, steps=40, lr=0.01, val_every=20,
                   val_slices=tuple(isbi2012.PROTOCOL["choose"]), test_slices=tuple(scored), **NO_AUGMENTATION))
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
    return images, labels, inverted_scored_labels, folders


def protocol_args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"protocol_tta": "none", "protocol_checkpoint": "choose", "val_tile_size": 92,
                                 "protocol_rescore": Path("earlier"), "budget": 0, **kwargs})


@pytest.mark.parametrize("folder, right, tta", [("trained-best", "best.pt", "none"), ("trained-last", "last.pt", "none"),
                                                ("trained-last", "last.pt", "choose")])
def test_the_protocol_chooses_the_checkpoint_on_held_out_slices(isbi2012, runs, tmp_path, folder, right, tta):
    images, labels, _, folders = runs
    chosen = isbi2012.protocol_scores(folders[folder], 0, images, labels, protocol_args(protocol_tta=tta))
    ttas = ["none", "all"] if tta == "choose" else ["none"]
    assert [(c["checkpoint"], c["tta"]) for c in chosen["on_choice"]] == [(k, t) for k in ("best.pt", "last.pt")
                                                                           for t in ttas]
    for wrong in (c for c in chosen["on_choice"] if c["checkpoint"] != right):
        for kept in (c for c in chosen["on_choice"] if c["checkpoint"] == right):
            assert kept["pixel_error"] < wrong["pixel_error"] and kept["rand_error"] < wrong["rand_error"]
    assert chosen["checkpoint"] == chosen["joint"]["checkpoint"] == chosen["pixel"]["checkpoint"] == right
    assert chosen["step"] == (20 if right == "best.pt" else 40) and chosen["best_step"] == 20
    # the score of 20-24 is the one the right checkpoint alone gets
    fixed = isbi2012.protocol_scores(folders[folder], 0, images, labels,
                                     protocol_args(protocol_tta=tta, protocol_checkpoint=right.removesuffix(".pt")))
    assert [c["checkpoint"] for c in fixed["on_choice"]] == [right] * len(ttas)
    for key in ("at_0.5", "at_chosen", "joint", "pixel", "threshold", "merge_threshold", "tta"):
        assert chosen[key] == fixed[key], key
    isbi2012.print_protocol([chosen, fixed], protocol_args(), "cmd", tmp_path, "p")
    row = (tmp_path / "p.md").read_text().splitlines()[4]
    assert row.startswith(f"| 0 | 40 | 20 | {right} ({chosen['step']}), {chosen['tta']} | {chosen['threshold']:.1f} |")


def test_the_choices_never_look_at_the_scored_slices(isbi2012, runs):
    """With the labels of 20-24 inverted, a choice that peeked there would take the inverse
    net; the protocol's choices stay what 15-19 say and only the scores get worse."""
    images, labels, inverted_scored_labels, folders = runs
    honest = isbi2012.protocol_scores(folders["trained-best"], 0, images, labels, protocol_args())
    blind = isbi2012.protocol_scores(folders["trained-best"], 0, images, inverted_scored_labels, protocol_args())
    for key in ("on_choice", "checkpoint", "tta", "threshold", "merge_threshold"):
        assert blind[key] == honest[key], key
    for key in ("joint", "pixel"):
        assert {k: v for k, v in blind[key].items() if k not in ("rand_error", "pixel_error")} == \
               {k: v for k, v in honest[key].items() if k not in ("rand_error", "pixel_error")}
    assert blind["at_chosen"]["pixel_error"] > 0.5 > honest["at_chosen"]["pixel_error"]


def test_last_pt_at_best_pts_step_is_not_a_second_candidate(isbi2012, runs, tmp_path):
    images, labels, _, folders = runs
    folder = folders["trained-best"]
    for name in ("best.pt", "last.pt", "log.csv"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    payload = read_checkpoint(tmp_path / "last.pt")
    atomic_save({**payload, "training": {**payload["training"], "step": 20}}, tmp_path / "last.pt")
    chosen = isbi2012.protocol_scores(tmp_path, 0, images, labels, protocol_args())
    assert [c["checkpoint"] for c in chosen["on_choice"]] == ["best.pt"]
