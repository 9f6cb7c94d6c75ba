"""Training: a few steps on tiny data lower the loss, a resumed run follows the uninterrupted
one step for step, the weighted loss is the paper's formula, the elastic deformation keeps
image and labels aligned, and a bad checkpoint is one clear error."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from scipy import ndimage
from torch.utils.data import DataLoader

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.jobs.patches import PatchDataset, data_stats, split_regions
from pipeline.jobs.train import TrainSettings, make_optimizer, plan_training, train, weighted_cross_entropy
from pipeline.numerics.augment import deform, elastic_field
from pipeline.numerics.unet import load_model

from conftest import write_zarr

TINY = dict(depth=2, base_channels=4, tile_size=44, threads=1, channels_last=False)  # margin 8: 44 in, 28 out
NO_AUGMENTATION = dict(elastic=False, flips=False, rotations=False, gray=False)


def disks(shape: tuple[int, ...], count: int, seed: int = 0, radius: tuple[int, int] = (5, 10)) -> tuple[np.ndarray, np.ndarray]:
    """Bright disks (balls in 3-D) on a noisy dark background: uint8 image, uint16 instance labels."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for i in range(count):
        centre = [rng.integers(0, n) for n in shape]
        r = rng.integers(*radius)
        labels[sum((g - c) ** 2 for g, c in zip(grid, centre)) < r * r] = i + 1
    image = np.clip((labels > 0) * 150 + rng.normal(50, 20, shape), 0, 255).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def data_2d(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("train2d")
    image, labels = disks((64, 64), 8)
    return write_zarr(root / "img.zarr", image), write_zarr(root / "lab.zarr", labels)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[str, str]:
    """An ISBI-like stack: 4 slices of 64×64, labels 255 = cell, 0 = membrane/background."""
    root = tmp_path_factory.mktemp("stack")
    images, masks = zip(*(disks((64, 64), 8, seed=z) for z in range(4)))
    mask = (np.stack(masks) > 0).astype(np.uint8) * 255
    return write_zarr(root / "img.zarr", np.stack(images)), write_zarr(root / "lab.zarr", mask)


def settings(images: str, labels: str, out: Path, **kwargs) -> TrainSettings:
    return TrainSettings(images=images, labels=labels, out=str(out), **{**TINY, **kwargs})


def log_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- the loss ------------------------------------------------------------------------------


def test_weighted_loss_equals_hand_computed_value():
    # two pixels, two classes: p = softmax(logits) per pixel
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (N=1, K=2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    weight = torch.tensor([[[3.0, 0.5]]])
    p0 = math.exp(2) / (math.exp(2) + 1)  # pixel 0, class 0
    p1 = math.exp(1) / (1 + math.exp(1))  # pixel 1, class 1
    expected = -(3.0 * math.log(p0) + 0.5 * math.log(p1)) / 2
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_shrinks_a_weight_without_gradient_by_lr_times_decay(optimizer):
    """Adam's decay shrinks a weight by lr * decay per step, whatever its gradient's scale
    (AdamW); an L2 term inside Adam's gradient would be normalised into a step of about lr."""
    lr, decay = 0.01, 0.1
    weight = torch.nn.Parameter(torch.full((4,), 2.0))
    s = TrainSettings(images="i", labels="l", out="o", optimizer=optimizer, weight_decay=decay, momentum=0.0)
    opt = make_optimizer([weight], s, lr)
    weight.grad = torch.zeros_like(weight)
    opt.step()
    expected = 2.0 * (1 - lr * decay)  # SGD: w - lr * (0 + decay * w), the same number in one step
    torch.testing.assert_close(weight.detach(), torch.full((4,), expected))


def test_training_lowers_the_loss(data_2d, tmp_path):
    """30 steps on 64×64 disks: the loss on 16 fixed patches falls well below the
    He-initialised model's (the same seed builds the same initial model)."""
    s = settings(*data_2d, tmp_path, steps=30, w0=0.0, base_channels=8, optimizer="adam", lr=0.01, **NO_AUGMENTATION)
    job = plan_training(s)
    patches = [PatchDataset(job.spec)[i] for i in range(16)]

    def fixed_loss(model) -> float:
        with torch.no_grad():
            return float(np.mean([weighted_cross_entropy(model.eval()(x[None]), t[None], w[None]).item() for x, t, w in patches]))

    before = fixed_loss(job.model)
    losses = []
    summary = train(s, on_step=lambda row: losses.append(row["loss"]))
    assert summary.step == 30 and len(losses) == 30 and all(np.isfinite(losses))
    assert fixed_loss(load_model(tmp_path / "last.pt")) < 0.6 * before


# --- data ----------------------------------------------------------------------------------


def test_elastic_deformation_keeps_labels_aligned():
    rng = np.random.default_rng(1)
    pattern = ndimage.gaussian_filter(rng.random((96, 96)), 6)
    image = (pattern - pattern.min()) / np.ptp(pattern)
    labels = (image > 0.5).astype(np.uint8)
    field = elastic_field((64, 64), rng, sigma=10.0, limit=16)
    assert field.shape == (2, 64, 64) and 5 < np.abs(field).max() <= 16  # a real, bounded warp
    warped_image = deform(image, field, order=3, offset=16)
    warped_labels = deform(labels, field, order=0, offset=16)
    assert warped_labels.dtype == np.uint8 and set(np.unique(warped_labels)) <= {0, 1}
    assert not np.array_equal(warped_labels, labels[16:80, 16:80])  # it did move
    disagree = warped_labels != (warped_image > 0.5)
    boundary = ndimage.binary_dilation(warped_labels) & ~ndimage.binary_erosion(warped_labels)
    assert disagree.mean() < 0.02 and not (disagree & ~boundary).any()


def test_patches_keep_image_and_labels_aligned(tmp_path):
    """Through the whole sampler (mirroring, elastic, flips, rotations, crop): a binary image
    thresholded gives back the patch's labels, except on a thin boundary."""
    _, labels = disks((80, 80), 10, seed=3)
    image = ((labels > 0) * 200 + 20).astype(np.uint8)
    s = settings(write_zarr(tmp_path / "i.zarr", image), write_zarr(tmp_path / "l.zarr", labels), tmp_path / "out",
                 gray=False, steps=8)
    dataset = PatchDataset(plan_training(s).spec)
    for i in range(8):
        x, classes, weights = dataset[i]
        assert x.shape == (1, 44, 44) and classes.shape == weights.shape == (28, 28)
        inner = x[0, 8:-8, 8:-8].numpy() > 0.5
        truth = classes.numpy().astype(bool)
        boundary = ndimage.binary_dilation(truth) & ~ndimage.binary_erosion(truth)
        assert not ((inner != truth) & ~boundary).any()
        assert (weights > 0).all()


def test_touching_instances_get_a_gap_of_background_as_in_the_paper(tmp_path):
    """Instance labels drawn without background between touching cells: the target gets a
    one-pixel gap where they touch (Fig. 3c's labels), and eq. 2's border term there."""
    from pipeline.numerics.weightmap import touching_borders

    labels = np.zeros((60, 60), np.uint16)
    labels[5:55, 5:30], labels[5:55, 30:55] = 3, 8  # touching along x = 30
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    s = settings(write_zarr(tmp_path / "i.zarr", image), write_zarr(tmp_path / "l.zarr", labels), tmp_path / "out",
                 steps=4, **NO_AUGMENTATION)
    spec = plan_training(s).spec
    assert not spec.stats.mask  # three values: instances
    gap = touching_borders(labels)
    assert gap.sum() == 50 and gap[5:55, 30].all()  # one pixel wide, on the higher id's side
    found = 0
    for i in range(4):
        x, classes, weights = PatchDataset(spec)[i]
        image_cells = x[0, 8:-8, 8:-8].numpy() > 0.5
        target, w = classes.numpy().astype(bool), weights.numpy()
        wrong = image_cells & ~target  # cells in the image, background in the target: only the gap
        found += int(wrong.sum())
        if wrong.any():
            assert w[wrong].min() > 2 * w[target].max()  # the border term of two cells one pixel apart
    assert found > 0, "no sampled patch crossed the gap"


def test_a_sample_depends_only_on_seed_and_index(data_2d, tmp_path):
    dataset = PatchDataset(plan_training(settings(*data_2d, tmp_path, steps=4)).spec)
    again = PatchDataset(plan_training(settings(*data_2d, tmp_path, steps=4)).spec)
    for a, b in zip(dataset[3], again[3]):
        assert torch.equal(a, b)
    assert not torch.equal(dataset[2][0], dataset[3][0])
    # loader workers (processes) give the same patches as reading them here
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert torch.equal(batches[1][0][1], dataset[3][0]) and torch.equal(batches[1][2][1], dataset[3][2])


def test_foreground_bias_finds_sparse_cells(tmp_path):
    labels = np.zeros((256, 256), np.uint16)
    labels[200:210, 30:40] = 1
    image = ((labels > 0) * 200).astype(np.uint8)
    urls = write_zarr(tmp_path / "i.zarr", image), write_zarr(tmp_path / "l.zarr", labels)

    def with_cells(bias: float) -> int:
        dataset = PatchDataset(plan_training(settings(*urls, tmp_path / "o", steps=20, foreground_bias=bias,
                                                      **NO_AUGMENTATION)).spec)
        return sum(bool(dataset[i][1].any()) for i in range(20))

    assert with_cells(1.0) == 20 and with_cells(0.0) < 10


def test_given_weight_maps_are_cropped_like_the_labels(data_2d, tmp_path):
    weights = np.random.default_rng(0).uniform(0.5, 5.0, (64, 64)).astype(np.float32)
    s = settings(*data_2d, tmp_path, weights=write_zarr(tmp_path / "w.zarr", weights), steps=4, **NO_AUGMENTATION)
    dataset = PatchDataset(plan_training(s).spec)
    for i in range(4):
        _, box = dataset.sample_box(np.random.default_rng([s.seed, i]))  # the first draw of sample i
        assert np.array_equal(dataset[i][2].numpy(), weights[box.slices()])
    # options of the per-patch map would be dropped without a word: refused
    for option in ({"w0": 5.0}, {"sigma": 3.0}, {"class_balance": False}):
        with pytest.raises(InputError, match="apply to maps computed per patch"):
            plan_training(s.model_copy(update=option))


def test_a_3d_weight_map_is_refused_for_a_2d_model(tmp_path):
    """overtile weights over a zyx stack measures distances across slices: refused for a 2-D
    model. A stack of maps made elsewhere (e.g. per slice) is taken as it is."""
    from pipeline import storage

    image, labels = disks((4, 40, 40), 5, seed=1)
    urls = write_zarr(tmp_path / "i.zarr", image), write_zarr(tmp_path / "l.zarr", labels)
    made_here = str(tmp_path / "w.zarr")  # what overtile weights writes: its class weights in the attributes
    storage.create_image(made_here, labels.shape, (4, 40, 40), "float32", "zyx",
                         attrs={"overtile": {"class_weights": [0.6, 2.5]}})[...] = 1.0
    with pytest.raises(InputError, match="a 3-D map .* for a 2-D model"):
        plan_training(settings(*urls, tmp_path / "o", axes="zyx", dims=2, weights=made_here))
    elsewhere = write_zarr(tmp_path / "slices.zarr", np.ones(labels.shape, np.float32))
    assert plan_training(settings(*urls, tmp_path / "o", axes="zyx", dims=2, weights=elsewhere)).spec.dims == 2


def test_standardized_normalization_is_stored_with_the_model(data_2d, tmp_path):
    train(settings(*data_2d, tmp_path, steps=1, normalize="standardize"))
    norm = load_model(tmp_path / "best.pt").normalization
    scaled = zarr.open_array(data_2d[0], mode="r")[:] / 255.0
    assert norm.scale_integers and norm.mean == pytest.approx(scaled.mean()) and norm.std == pytest.approx(scaled.std())

def test_label_kinds(tmp_path):
    from pipeline import storage

    _, instances = disks((64, 64), 8)
    image = storage.open_image(write_zarr(tmp_path / "i.zarr", np.zeros((64, 64), np.uint8)))
    isbi = storage.open_image(write_zarr(tmp_path / "m.zarr", ((instances > 0) * 255).astype(np.uint8)))
    inst = storage.open_image(write_zarr(tmp_path / "n.zarr", instances))
    regions, _ = split_regions((64, 64), 2, [])
    mask = data_stats(image, isbi, regions, 8)
    assert mask.mask and mask.counts == (int((instances == 0).sum()), int((instances > 0).sum()))
    assert not data_stats(image, inst, regions, 8).mask
    assert len(mask.foreground) == len(np.unique(np.argwhere(instances > 0) // 8, axis=0))


def test_validation_slices_are_never_trained_on():
    train_regions, val = split_regions((6, 32, 32), 2, [2, 3])
    assert [r.box.offset[0] for r in train_regions] == [0, 1, 4, 5] and [r.box.offset[0] for r in val] == [2, 3]
    train3, val3 = split_regions((6, 32, 32), 3, [2, 3])
    assert [(r.box.offset[0], r.box.shape[0]) for r in train3] == [(0, 2), (4, 2)]
    assert [(r.box.offset[0], r.box.shape[0]) for r in val3] == [(2, 2)]


# --- checkpoints and resume ----------------------------------------------------------------


@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["weights", "averaged-weights"])
def test_resumed_run_follows_the_same_trajectory(data_2d, tmp_path, ema):
    """6 steps straight, or 3, stop, resume to 6: the same losses, step for step (augmentation,
    dropout and batches of 2 included), and the same weights (and average) at the end."""
    common = dict(dropout=0.3, batch_size=2, checkpoint_every=3, seed=7, ema=ema)
    train(settings(*data_2d, tmp_path / "straight", steps=6, **common))
    train(settings(*data_2d, tmp_path / "resumed", steps=3, **common))
    train(settings(*data_2d, tmp_path / "resumed", steps=6, resume=True, **common))
    straight, resumed = log_rows(tmp_path / "straight"), log_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [str(i) for i in range(1, 7)]
    assert [float(r["loss"]) for r in straight] == [float(r["loss"]) for r in resumed]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert a["training"]["step"] == b["training"]["step"] == 6
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    if ema:
        for key in a["training"]["weights"]:
            assert torch.equal(a["training"]["weights"][key], b["training"]["weights"][key]), key
        assert a["training"]["ema_updates"] == b["training"]["ema_updates"] == 6


def test_averaged_weights_are_the_moving_average_of_every_steps_weights(data_2d, tmp_path):
    """--ema D: last.pt's and best.pt's model is avg_1 = w_1, avg_k = avg_(k-1) + (1 - d_k)
    (w_k - avg_(k-1)) with d_k = min(D, k / (9 + k)), over the weights w_k after each step;
    the weights themselves go on training (kept in last.pt to resume)."""
    decay, steps = 0.5, 5
    s = settings(*data_2d, tmp_path / "run", steps=steps, ema=decay, optimizer="adam")
    job = plan_training(s)
    seen = []
    train(s, job=job, on_step=lambda row: seen.append({k: v.detach().clone() for k, v in job.model.state_dict().items()}))
    expected = dict(seen[0])
    for k, weights in enumerate(seen[1:], start=2):
        d = min(decay, k / (9 + k))
        expected = {key: avg + (1 - d) * (weights[key] - avg) for key, avg in expected.items()}
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.allclose(last["state_dict"][key], value, rtol=0, atol=1e-6), key
        assert torch.equal(best["state_dict"][key], last["state_dict"][key]), key
        assert torch.equal(last["training"]["weights"][key], seen[-1][key]), key
    assert any(not torch.allclose(expected[key], seen[-1][key]) for key in expected)  # an average, not the last
    # the average is an ordinary model: predict loads it
    assert load_model(tmp_path / "run" / "last.pt").dims == 2


def test_validation_scores_the_averaged_model(stack, tmp_path):
    """With --ema the validation row and best.pt's scores are those of the average, not of the
    last step's weights."""
    from pipeline.jobs.train import validate

    s = settings(*stack, tmp_path / "run", axes="zyx", dims=2, val_slices=(3,), steps=4, val_every=4, ema=0.9,
                 optimizer="adam", lr=0.01)
    job = plan_training(s)
    summary = train(s, job=job)
    row = log_rows(tmp_path / "run")[-1]
    best = load_model(tmp_path / "run" / "best.pt")
    scores = validate(best, job.images, job.labels, job.val_regions, job.val_tile_size, "reflect")
    assert summary.best == pytest.approx(scores) and float(row["rand_error"]) == pytest.approx(scores["rand_error"])
    raw = validate(job.model, job.images, job.labels, job.val_regions, job.val_tile_size, "reflect")
    assert raw != scores


def test_corrupt_or_incompatible_checkpoint_is_a_clear_error(data_2d, tmp_path):
    out = tmp_path / "run"
    train(settings(*data_2d, out, steps=2))
    with pytest.raises(InputError, match="pass --resume"):
        train(settings(*data_2d, out, steps=4))
    with pytest.raises(InputError, match="incompatible.*base_channels"):
        train(settings(*data_2d, out, steps=4, resume=True, base_channels=8))
    with pytest.raises(InputError, match="optimizer 'sgd'"):
        train(settings(*data_2d, out, steps=4, resume=True, optimizer="adam"))
    before = (out / "log.csv").read_bytes()
    (out / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="last.pt: not an overtile checkpoint"):
        train(settings(*data_2d, out, steps=4, resume=True))
    assert (out / "log.csv").read_bytes() == before  # nothing touched


# --- 3D, validation and the command line ---------------------------------------------------


def test_3d_training_with_held_out_slices(tmp_path):
    image, labels = disks((12, 32, 32), 6, seed=2, radius=(4, 7))
    urls = write_zarr(tmp_path / "i.zarr", image), write_zarr(tmp_path / "l.zarr", labels)
    s = TrainSettings(images=urls[0], labels=urls[1], out=str(tmp_path / "out"), axes="zyx", depth=2,
                      base_channels=2, tile_size=20, steps=3, val_slices=(10, 11), val_every=2, threads=1)
    summary = train(s)
    rows = log_rows(tmp_path / "out")
    assert summary.step == 3 and [r["rand_error"] != "" for r in rows] == [False, True, True]
    model = load_model(tmp_path / "out" / "best.pt")
    assert model.dims == 3 and summary.best_step in (2, 3) and 0 <= summary.best["rand_error"] <= 1
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_cli_train_then_predict_the_stack_and_score_it(stack, tmp_path, capsys):
    images, labels = stack
    out = tmp_path / "run"
    code = main(["train", "--images", images, "--labels", labels, "--out", str(out), "--axes", "zyx", "--dims", "2",
                 "--depth", "2", "--base-channels", "4", "--tile-size", "44", "--steps", "4", "--val-slices", "2-3",
                 "--val-every", "2", "--threads", "1", "--optimizer", "adam", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "from 2 slices (2 more held out for validation)" in printed
    assert "best Rand error" in printed and str(out / "best.pt") in printed
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt", "log.csv", "curves.png"}
    assert load_model(out / "best.pt").normalization.scale_integers  # what training applied
    # the protocol from the command line alone: the 2-D net predicts the stack slice by slice,
    # the threshold is chosen on slice 2 and slice 3 scored once
    code = main(["predict", images, str(tmp_path / "pred.zarr"), "--model", str(out / "best.pt"), "--axes", "zyx",
                 "--workers", "1", "--block-size", "64"])
    printed = capsys.readouterr().out
    assert code == 0 and "a 2-D model over 4 slices" in printed and "4 blocks of 1×64×64" in printed, printed
    probabilities = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")["0"][:]
    assert probabilities.shape == (2, 4, 64, 64) and np.allclose(probabilities.sum(0), 1, atol=1e-5)
    code = main(["score", str(tmp_path / "pred.zarr"), labels, "--axes", "zyx", "--slices", "3", "--choose-on", "2",
                 "--json", str(tmp_path / "scores.json")])
    assert code == 0, capsys.readouterr()
    assert json.loads((tmp_path / "scores.json").read_text())["slices"] == [3]
    # resuming a finished run is a no-op that says so
    code = main(["train", "--images", images, "--labels", labels, "--out", str(out), "--axes", "zyx", "--dims", "2",
                 "--depth", "2", "--base-channels", "4", "--tile-size", "44", "--steps", "4", "--val-slices", "2", "3",
                 "--optimizer", "adam", "--resume", "--quiet"])
    assert code == 0 and "resuming after step 4" in capsys.readouterr().out


def test_a_dim_integer_image_is_warned_about_and_a_time_budget_shows_as_seconds(tmp_path, capsys):
    """A uint16 image whose values reach 235 (the shared nuclei image) is scaled by 65535: the
    net sees inputs under 0.004 and learned nothing for a new user, silently. Training says so
    and names --normalize standardize. With --time-limit the bar counts the budget's seconds
    (a step count of 1000000 made it promise 323 hours)."""
    images, masks = zip(*(disks((64, 64), 8, seed=z) for z in range(3)))
    dim = write_zarr(tmp_path / "dim.zarr", np.stack(images).astype(np.uint16))
    labels = write_zarr(tmp_path / "lab.zarr", (np.stack(masks) > 0).astype(np.uint8) * 255)
    common = ["--labels", labels, "--axes", "zyx", "--dims", "2", "--depth", "2", "--base-channels", "4",
              "--tile-size", "44", "--steps", "1000000", "--time-limit", "3", "--threads", "1"]
    assert main(["train", "--images", dim, "--out", str(tmp_path / "a"), *common]) == 0
    err = capsys.readouterr().err
    assert "uint16 values reach" in err and "--normalize standardize" in err, err
    assert "train (time budget)" in err and "/3 s" in err, err
    assert main(["train", "--images", dim, "--out", str(tmp_path / "b"), "--normalize", "standardize", "--quiet",
                 *common]) == 0
    assert "warning" not in capsys.readouterr().err


def test_small_patches_validate_with_a_tile_that_steps_on_the_pooling_grid(stack, tmp_path):
    """A depth-5 net trains on 188 px patches (4 px of labels), but validation tiles must step
    on its 16 px grid (at least 204 px): it crashed with a traceback after the first steps.
    Validation now takes a tile of at least 700 px in 2-D by default, and a --val-tile-size
    below the smallest is refused up front."""
    images, labels = stack
    job = plan_training(settings(images, labels, tmp_path / "a", axes="zyx", dims=2, depth=5, tile_size=188,
                                 val_slices=(3,)))
    assert job.spec.input_size == 188 and job.val_tile_size >= 700
    with pytest.raises(InputError, match="--val-tile-size 188: too small for this model; the smallest is 204"):
        plan_training(settings(images, labels, tmp_path / "b", axes="zyx", dims=2, depth=5, tile_size=188,
                               val_tile_size=188, val_slices=(3,)))


def test_cli_train_help():
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0


def test_cli_bad_input_is_one_line(data_2d, tmp_path, capsys):
    code = main(["train", "--images", data_2d[0], "--labels", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.zarr: no such file or directory" in err and len(err.strip().splitlines()) == 1
    code = main(["train", "--images", data_2d[0], "--labels", data_2d[1], "--out", str(tmp_path / "o"), "--val-slices", "1"])
    assert code == 2 and "held-out slices need a z axis" in capsys.readouterr().err


def test_starting_over_removes_the_old_runs_checkpoints(data_2d, tmp_path):
    """With --overwrite an old last.pt must not survive until the new run's first checkpoint:
    a retry (the train flow resumes from last.pt) would otherwise continue the old run."""
    images, labels = data_2d
    train(settings(images, labels, tmp_path / "run", steps=2, checkpoint_every=1))
    assert (tmp_path / "run" / "last.pt").exists()

    def crash(row):
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        train(settings(images, labels, tmp_path / "run", steps=5, checkpoint_every=100, overwrite=True), on_step=crash)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


@pytest.mark.slow
def test_a_time_limited_cosine_run_anneals_fully_and_ends_validated(stack, tmp_path):
    """With --time-limit the cosine schedule follows the budget: the rate falls step by step
    to near 0 as the budget runs out, whatever the machine's speed; the run stops before its
    step count, within about a step of the budget, and ends with a validation and both
    checkpoints."""
    budget = 4.0
    summary = train(settings(*stack, tmp_path / "run", steps=100_000, lr_schedule="cosine", optimizer="adam",
                             axes="zyx", val_slices=(3,), val_every=100_000, checkpoint_every=100_000, w0=0.0,
                             time_limit=budget))
    rows = log_rows(tmp_path / "run")
    rates = [float(r["lr"]) for r in rows]
    assert 5 < len(rows) < 100_000 and summary.step == len(rows)
    assert all(b <= a for a, b in zip(rates, rates[1:]))  # annealing, never back up
    assert rates[-1] < 0.05 * rates[0]  # annealed fully: not stopped a quarter of the way down
    assert rows[-1]["rand_error"] != ""  # the last step validated
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "best.pt").exists()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["training"]["step"] == len(rows)
    # resumed with the same budget, spent: nothing is trained, written or logged again
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("last.pt", "best.pt", "log.csv")}
    again = train(settings(*stack, tmp_path / "run", steps=100_000, lr_schedule="cosine", optimizer="adam",
                           axes="zyx", val_slices=(3,), val_every=100_000, checkpoint_every=100_000, w0=0.0,
                           time_limit=budget, resume=True))
    assert again.step == summary.step
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_the_budget_stops_before_a_step_that_would_not_fit_and_ends_near_progress_one():
    """The budget's arithmetic, on given step times (no clock): the first step (warm-up) is not
    an estimate; the schedule sees where the budget will be when a step ends; the loop stops
    when the next step would end past the budget, at a rate near 0."""
    from pipeline.jobs.train import Budget, learning_rate

    budget, spent, rates = Budget(10.0), 0.0, []
    for seconds in [3.0] + [1.0] * 20:
        rates.append(learning_rate(1.0, "cosine", len(rates) + 1, 10**6, budget.progress(spent)))
        spent += seconds
        budget.timed(seconds)
        if budget.exhausted(spent):
            break
    assert budget.step_time == 1.0 and spent == 9.0  # 3 s of warm-up, then six 1 s steps; a seventh would not fit
    assert rates[0] == 1.0 and all(b < a for a, b in zip(rates[1:], rates[2:]))
    assert rates[-1] == pytest.approx(learning_rate(1.0, "cosine", 1, 1, 0.9)) and rates[-1] < 0.03
    assert Budget(None).progress(5.0) is None and not Budget(None).exhausted(1e9)


@pytest.mark.slow
def test_training_killed_between_checkpoints_resumes_to_the_uninterrupted_run(data_2d, tmp_path):
    """``overtile train`` killed with SIGKILL between two checkpoints, then resumed: it goes
    on from the last checkpoint, and its losses, final weights and their average (--ema)
    equal a run never killed."""
    import os
    import signal
    import subprocess
    import sys

    from servers import ROOT

    images, labels = data_2d
    args = ["--depth", "2", "--base-channels", "4", "--tile-size", "44", "--threads", "1", "--no-channels-last",
            "--steps", "40", "--checkpoint-every", "10", "--batch-size", "2", "--dropout", "0.3", "--seed", "3",
            "--ema", "0.9", "--quiet"]
    cli = [sys.executable, "-m", "pipeline.cli", "train", "--images", images, "--labels", labels]
    subprocess.run(cli + ["--out", str(tmp_path / "straight")] + args, cwd=ROOT, check=True, capture_output=True)
    killed = tmp_path / "killed"
    run = subprocess.Popen(cli + ["--out", str(killed)] + args, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    checkpoint = 0
    while run.poll() is None:
        if (killed / "last.pt").exists():
            try:
                checkpoint = torch.load(killed / "last.pt", weights_only=True)["training"]["step"]
            except Exception:  # noqa: BLE001 - being replaced right now (written to a temporary name, then moved)
                continue
            if checkpoint >= 10 and len(log_rows(killed)) > checkpoint:  # past a checkpoint, before the next
                os.kill(run.pid, signal.SIGKILL)
                break
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed between checkpoints"
    assert 10 <= checkpoint < 40
    subprocess.run(cli + ["--out", str(killed), "--resume"] + args, cwd=ROOT, check=True, capture_output=True)
    straight, resumed = log_rows(tmp_path / "straight"), log_rows(killed)
    assert [r["step"] for r in resumed] == [str(i) for i in range(1, 41)]  # the killed steps' rows replaced
    assert [float(r["loss"]) for r in straight] == [float(r["loss"]) for r in resumed]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key in a["training"]["weights"]:  # the model saved is the average; the weights trained go on
        assert torch.equal(a["training"]["weights"][key], b["training"]["weights"][key]), key
    assert a["training"]["ema_updates"] == b["training"]["ema_updates"] == 40


def test_test_slices_are_neither_trained_nor_validated_on(stack, tmp_path):
    """The protocol's split: train on some slices, choose on --val-slices, keep --test-slices
    for scoring once at the end: the patches never come from them, validation never sees them."""
    job = plan_training(settings(*stack, tmp_path / "run", axes="zyx", val_slices=(2,), test_slices=(3,), dims=2))
    assert sorted(r.box.offset[0] for r in job.spec.regions) == [0, 1]
    assert [r.box.offset[0] for r in job.val_regions] == [2]
    with pytest.raises(InputError, match="share \\[2\\]"):
        plan_training(settings(*stack, tmp_path / "bad", axes="zyx", val_slices=(2,), test_slices=(2, 3)))
    with pytest.raises(InputError, match="--val-tta: rot45"):
        plan_training(settings(*stack, tmp_path / "bad", axes="zyx", val_slices=(2,), val_tta="rot45"))


def test_validation_with_test_time_augmentation(stack, tmp_path):
    """--val-tta all scores the held-out slice on the mean of its 8 transforms: a different
    probability map from the plain one, scored the same way."""
    from pipeline.jobs.train import validate

    job = plan_training(settings(*stack, tmp_path / "run", axes="zyx", val_slices=(3,), dims=2))
    plain = validate(job.model, job.images, job.labels, job.val_regions, job.val_tile_size, "reflect")
    augmented = validate(job.model, job.images, job.labels, job.val_regions, job.val_tile_size, "reflect", "all")
    assert set(plain) == set(augmented) and plain != augmented
