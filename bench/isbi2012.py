"""ISBI 2012 EM segmentation: train a U-Net within a fixed CPU budget, score held-out slices.

The data is the U-Net paper's first headline result: serial-section TEM of the Drosophila
larva ventral nerve cord, ``../shared/data/isbi2012`` (25 labelled 512² slices; 255 = cell,
0 = membrane). One run:

1. writes the volume and labels to Zarr under ``--out`` (not counted in the budget);
2. trains a 2-D valid U-Net (default: depth 5, 16 base channels, 572² patches, Adam with a
   cosine schedule, the paper's elastic deformation, flips, rotations, gray values and the
   weight map with w0 = 10, sigma = 5) on slices 0-19, validating on 20-24, with
   ``overtile train``'s Python API, for ``--budget`` seconds: the cosine schedule follows the
   time budget (``time_limit``), so it anneals fully whatever a step costs that day;
3. predicts slices 20-24 with the overlap-tile path (mirrored borders) from ``last.pt``
   (the model at the end of the budget) and from ``best.pt`` (chosen on these same slices,
   so slightly optimistic), each plainly and with test-time flips and rotations (the mean of
   the 8 dihedral transforms), and prints pixel error, Rand error (cells grown over the
   predicted membrane, as the challenge thinned borders; best threshold of a sweep) and the
   raw Rand error, beside the paper's figures (on the challenge's hidden test labels).

With ``--protocol SEED ...`` it runs the honest protocol instead (issue 16): train on slices
0-14, choose the checkpoint (best.pt or last.pt), the test-time augmentation, the
thresholds and the rule that makes cells on 15-19, score 20-24 once; per seed and as
mean ± sd, in ``OUT/protocol.md`` (:func:`protocol_seed` says the CLI commands it equals,
:func:`protocol_scores` what is chosen). ``--protocol-rescore OUT`` makes the choices and
the score again for those runs without training (``protocol-rescored.md``).

Usage::

    .venv/bin/python bench/isbi2012.py                      # the benchmark: 30 min of training
    .venv/bin/python bench/isbi2012.py --protocol 0 1 2 --budget 1750   # the protocol, 3 seeds
    .venv/bin/python bench/isbi2012.py --budget 120 --no-tta   # a smoke test (about 3 min)
    .venv/bin/python bench/isbi2012.py --cell-rules OUT/protocol-seed0/best.pt   # rules that make cells (5 min)
    .venv/bin/python bench/isbi2012.py --protocol-rescore OUT --out OUT   # the protocol's choices again, no training

The table is printed and written to ``OUT/result.md``; copy it to ``bench/RESULTS.md`` with
the command after a full run.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.numerics.metrics import score_segmentation
from pipeline.numerics.tiling import overlap_tile, softmax
from pipeline.jobs.train import TrainSettings, train
from pipeline.numerics.unet import load_model, num_parameters, read_checkpoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"
PAPER = {"pixel_error": 0.0611, "rand_error": 0.0382}  # test set, hidden labels; warping error 0.000353
TRAIN_SLICES, VAL_SLICES = range(0, 20), range(20, 25)


def write_zarr_inputs(out: Path) -> tuple[str, str]:
    """The tif volume and labels as Zarr arrays (one chunk per slice), written once."""
    import tifffile
    import zarr

    urls = []
    for name in ("train-volume", "train-labels"):
        path = out / f"{name}.zarr"
        if not (path / "zarr.json").exists():
            data = tifffile.imread(DATA / f"{name}.tif")
            array = zarr.create_array(str(path), shape=data.shape, chunks=(1, *data.shape[1:]), dtype=data.dtype, overwrite=True)
            array[...] = data
        urls.append(str(path))
    return urls[0], urls[1]


def predict_slices(model, volume: np.ndarray, tile_size: int, tta: bool) -> np.ndarray:
    """Cell probabilities ``(Z, Y, X)`` by overlap-tile prediction; with ``tta`` the mean over
    the 8 flips/rotations of each slice (each mapped back before averaging)."""
    out = []
    for image in volume:
        x = model.normalization(image[None])
        transforms = [(k, f) for k in range(4) for f in (False, True)] if tta else [(0, False)]
        total = np.zeros(image.shape, np.float32)
        for k, flip in transforms:
            t = np.rot90(x[:, :, ::-1] if flip else x, k, axes=(1, 2))
            p = softmax(overlap_tile(model, np.ascontiguousarray(t), tile_size=tile_size))[1]
            p = np.rot90(p, -k)
            total += p[:, ::-1] if flip else p
        out.append(total / len(transforms))
    return np.stack(out)


def score_objects(model_path: Path, images: str, labels: str, out: Path, grow_distances=(0, 4, 8)) -> list[tuple]:
    """The held-out slices through ``overtile predict`` and ``overtile objects`` as a user runs
    them (blockwise, on a local cluster), each object rule fixed beforehand (seeds P(cell) > 0.5,
    grown over any pixel by d steps), the job's own labels scored with the foreground-
    restricted Rand error: no growing and no threshold sweep by the scorer."""
    import zarr
    from scipy import ndimage

    from pipeline.jobs.blockwise import dask_client
    from pipeline.jobs.objects import ObjectSettings, find_objects
    from pipeline.jobs.predict import PredictSettings, predict
    from pipeline.numerics.metrics import pixel_error, rand_error

    volume = zarr.open_array(images, mode="r")
    truth = zarr.open_array(labels, mode="r")
    rows = []
    with dask_client(workers=2) as client:
        errors: dict[int, list[float]] = {d: [] for d in grow_distances}
        pixel: list[float] = []
        for z in VAL_SLICES:
            image = out / "objects" / f"slice-{z}.zarr"
            zarr.create_array(str(image), data=volume[z], chunks=(256, 256), overwrite=True)
            probs = out / "objects" / f"p-{z}.zarr"
            predict(PredictSettings(input=str(image), output=str(probs), model=str(model_path), block_size=256,
                                    tile_size=700, overwrite=True, pyramid=False), client=client)
            true_cells, _ = ndimage.label(truth[z] > 0)
            pixel.append(pixel_error(zarr.open_array(str(probs / "0"))[1] > 0.5, truth[z] > 0))
            for d in grow_distances:
                cells = out / "objects" / f"cells-{z}-grow{d}.zarr"
                find_objects(ObjectSettings(probabilities=str(probs), output=str(cells), threshold=0.5,
                                            grow_distance=d, overwrite=True, pyramid=False), client=client)
                errors[d].append(rand_error(true_cells, zarr.open_array(str(cells / "0"))[...]))
        for d in grow_distances:
            rows.append((d, float(np.mean(errors[d])), float(np.min(errors[d])), float(np.max(errors[d])),
                         float(np.mean(pixel))))
    return rows


def training_choices(args: argparse.Namespace, images: str, labels: str) -> dict:
    """The TrainSettings both runs share, from the command line: data, net, patch, optimiser,
    loss, augmentation and threads (the split, seed, length and output are each run's own)."""
    return dict(images=images, labels=labels, axes="zyx", dims=2, depth=args.depth, base_channels=args.base_channels,
                tile_size=args.tile_size, optimizer=args.optimizer, lr=args.lr,
                lr_schedule=args.lr_schedule, ema=args.ema, w0=args.w0, sigma=args.sigma,
                class_balance=not args.no_class_balance, batch_norm=args.batch_norm, dropout=args.dropout,
                weight_decay=args.weight_decay, elastic=not args.no_elastic,
                val_tile_size=args.val_tile_size, threads=args.threads, overwrite=True)


def tiled_probability(model, volume, slices: range, tta: str, tile_size: int) -> np.ndarray:
    """P(cell) of each slice ``(Z, Y, X)``: the library's tile-exact prediction with the test-
    time augmentation ``tta`` ("none", "all", ...), what ``overtile predict --tta`` computes."""
    from pipeline.numerics.geometry import Box
    from pipeline.numerics.tta import predict_region_tta, transforms

    chosen = transforms(2, tta)
    out = []
    for z in slices:
        image = model.normalization(volume[z][None])
        box = Box.from_shape(image.shape[1:])
        out.append(predict_region_tta(model, box, box.shape, lambda b: image[(slice(None), *b.slices())], chosen,
                                      tile_size)[1])
    return np.stack(out)


def cell_rules(checkpoint: Path, images: str, labels: str, tile_size: int) -> str:
    """What the rule that makes cells from P(cell) buys, for one checkpoint: each rule's
    parameters chosen on 15-19, then 20-24 scored once (Rand error, foreground-restricted).
    The rules: components of p > t grown over the rest by distance (the challenge's way,
    :func:`cells_from_probability`); the same seeds grown by a watershed of 1 - p (borders on
    the membrane's ridge), on p as it is or smoothed (σ = 1 px) and with seeds under 50 px
    dropped; a watershed of the distance transform of p > t from its h-maxima (the usual
    split of touching cells); fragments merged by the mean membrane probability along their
    borders (:func:`agglomerated_cells`)."""
    import zarr
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from pipeline.numerics.metrics import MERGE_THRESHOLDS, agglomerated_cells, cells_from_probability, rand_error

    def seeded(p: np.ndarray, t: float, sigma: float, min_size: int) -> np.ndarray:
        q = ndimage.gaussian_filter(p, sigma) if sigma else p
        seeds, _ = ndimage.label(q > t)
        if min_size:
            small = np.bincount(seeds.ravel()) < min_size
            small[0] = True
            seeds[small[seeds]] = 0
        return watershed(1 - q, seeds)

    def split(p: np.ndarray, t: float, h: float) -> np.ndarray:
        distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(p > t), 2)
        return watershed(-distance, ndimage.label(h_maxima(distance, h) & (p > t))[0])

    thresholds = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95)
    rules = {"grown by distance (the scorer's)": [(f"t {t}", lambda p, t=t: cells_from_probability(p, t))
                                                  for t in thresholds],
             "watershed of 1 - p from p > t": [(f"t {t}", lambda p, t=t: seeded(p, t, 0, 0)) for t in thresholds],
             "the same, p smoothed (σ 1), seeds ≥ 50 px": [(f"t {t}", lambda p, t=t: seeded(p, t, 1, 50))
                                                         for t in thresholds],
             "distance-transform watershed": [(f"t {t}, h {h}", lambda p, t=t, h=h: split(p, t, h))
                                              for t in (0.5, 0.7, 0.9) for h in (2, 4, 8)],
             "fragments of p > 0.95 (σ 1) merged by their borders": [
                 (f"merge below {m}", lambda p, m=m: agglomerated_cells(p, m)) for m in MERGE_THRESHOLDS]}
    model = load_model(checkpoint)
    volume = zarr.open_array(images, mode="r")
    truth = zarr.open_array(labels, mode="r")
    lines = [f"Rules that make cells from P(cell), {checkpoint}: parameters chosen on 15-19, 20-24 scored once",
             "", "| augmentation | rule | chosen | Rand error on 15-19 | Rand error on 20-24 |", "| --- | --- | --- | --- | --- |"]
    for tta in ("none", "all"):
        sets = {}
        for name, slices in (("choose", PROTOCOL["choose"]), ("score", PROTOCOL["score"])):
            p = tiled_probability(model, volume, slices, tta, tile_size)
            sets[name] = (p, [ndimage.label(truth[z] > 0)[0] for z in slices])

        def error(rule, name: str) -> float:
            p, cells = sets[name]
            return float(np.mean([rand_error(c, rule(q)) for c, q in zip(cells, p)]))

        for rule, options in rules.items():
            on_choice, label, chosen = min((error(f, "choose"), label, f) for label, f in options)
            lines.append(f"| {tta} | {rule} | {label} | {on_choice:.4f} | {error(chosen, 'score'):.4f} |")
    return "\n".join(lines)


PROTOCOL = {"train": "0-14", "choose": range(15, 20), "score": range(20, 25)}


def protocol_seed(seed: int, images: str, labels: str, out: Path, args: argparse.Namespace) -> dict:
    """One seed of the honest protocol::

        overtile train --images I --labels L --axes zyx --dims 2 --val-slices 15-19 --test-slices 20-24 \
            --time-limit BUDGET --lr-schedule cosine --steps 1000000 --seed S ...
        overtile predict I p.zarr --axes zyx --model OUT/{best,last}.pt [--tta all]
        (slice by slice, tile-exact; here the library's predict_region_tta per slice, as
         validation does: the same numbers without a cluster)
        overtile score p.zarr L --axes zyx --choose-on 15-19 --slices 20-24 --json s.json

    for each of the four candidates, reading only their errors on 15-19 (``on_choice``,
    ``pixel_error`` there) to keep one for each of the headline, the joint choice and pixel
    error, and only then the kept ones' scores of 20-24; :func:`protocol_scores` says which."""
    run = out / f"protocol-seed{seed}"
    train(TrainSettings(
        **training_choices(args, images, labels), val_slices=tuple(PROTOCOL["choose"]),
        test_slices=tuple(PROTOCOL["score"]), seed=seed, out=str(run), steps=10**6,
        time_limit=args.budget, val_every=args.val_every, checkpoint_every=args.val_every))
    return protocol_scores(run, seed, images, labels, args)


def protocol_scores(run: Path, seed: int, images: str, labels: str, args: argparse.Namespace) -> dict:
    """The protocol's choices on 15-19 and its one score of 20-24 for the run in ``run``
    (``best.pt``, ``last.pt`` and ``log.csv``). Each candidate is a checkpoint (best.pt, the
    best validation on 15-19 while training, and last.pt, the end of the budget, or the one
    ``--protocol-checkpoint`` fixes) with an augmentation (none and all 8, or the one
    ``--protocol-tta`` fixes); for each, every choice of
    :func:`pipeline.numerics.metrics.choose` is made on 15-19. The headline takes the
    candidate whose grown cells score best there, with its threshold (agglomerated cells at
    its merge threshold beside them); the joint choice takes the candidate and rule (grown or
    agglomerated) with the lowest Rand error there; pixel error takes the candidate and
    threshold with the lowest pixel error there. Validation during training scores grown cells
    without test-time augmentation only, so best.pt can be an early step that loses to the
    annealed last.pt with augmentation, agglomerated cells or pixel error. Prediction is the
    library's tile-exact test-time augmentation on each slice, what ``overtile predict --tta``
    computes; 2 checkpoints × 2 augmentations are four predictions of 15-19, each with
    ``choose``'s sweeps (about 5 min a run on 2 cores)."""
    import csv

    import zarr

    from pipeline.numerics.metrics import agglomerated_rand_error, choose, pixel_error, scores_at

    with open(run / "log.csv") as f:
        steps = int(list(csv.DictReader(f))[-1]["step"])
    step_of = {name: read_checkpoint(run / name)["training"]["step"] for name in ("best.pt", "last.pt")}
    if args.protocol_checkpoint != "choose":
        checkpoints = [f"{args.protocol_checkpoint}.pt"]
    elif step_of["best.pt"] == step_of["last.pt"]:
        checkpoints = ["best.pt"]  # best.pt is the end of the budget: the same weights
    else:
        checkpoints = ["best.pt", "last.pt"]
    models = {name: load_model(run / name) for name in checkpoints}
    volume = zarr.open_array(images, mode="r")
    truth = zarr.open_array(labels, mode="r")[...] > 0
    on_choice = truth[PROTOCOL["choose"].start:PROTOCOL["choose"].stop]
    scored = truth[PROTOCOL["score"].start:PROTOCOL["score"].stop]

    # one candidate per checkpoint and augmentation; every choice is made among them on 15-19
    ttas = ("none", "all") if args.protocol_tta == "choose" else (args.protocol_tta,)
    choices = {(name, tta): choose(tiled_probability(models[name], volume, PROTOCOL["choose"], tta,
                                                     args.val_tile_size), on_choice)
               for name in models for tta in ttas}
    headline = min(choices, key=lambda k: choices[k].rand_error)
    joint_choice = min(choices, key=lambda k: choices[k].rule_error)
    pixel_choice = min(choices, key=lambda k: choices[k].pixel_error)
    probability = {k: tiled_probability(models[k[0]], volume, PROTOCOL["score"], k[1], args.val_tile_size)
                   for k in {headline, joint_choice, pixel_choice}}
    c, j, px = choices[headline], choices[joint_choice], choices[pixel_choice]
    at_chosen = scores_at(probability[headline], scored, c.threshold, merge_threshold=c.merge_threshold)
    if joint_choice == headline:
        joint = at_chosen["rand_error" if j.rule == "grown" else "rand_error_agglomerated"]
    elif j.rule == "grown":
        joint = scores_at(probability[joint_choice], scored, j.threshold)["rand_error"]
    else:
        joint = agglomerated_rand_error(probability[joint_choice], scored, j.merge_threshold)

    def candidate(k: tuple[str, str]) -> dict:
        return {"checkpoint": k[0], "step": step_of[k[0]], "tta": k[1]}

    return {"seed": seed, "steps": steps, "best_step": step_of["best.pt"], **candidate(headline),
            "threshold": c.threshold, "merge_threshold": c.merge_threshold,
            "on_choice": [{**candidate(k), "rand_error": v.rand_error, "rand_error_agglomerated": v.rand_error_agglomerated,
                           "pixel_error": v.pixel_error} for k, v in choices.items()],
            "at_0.5": scores_at(probability[headline], scored, 0.5), "at_chosen": at_chosen,
            "joint": {**candidate(joint_choice), "rule": j.rule, "rand_error": joint},
            "pixel": {**candidate(pixel_choice), "threshold": px.pixel_threshold,
                      "pixel_error": pixel_error(probability[pixel_choice] > px.pixel_threshold, scored)}}


def print_protocol(results: list[dict], args: argparse.Namespace, command: str, out: Path, name: str) -> None:
    def spread(key: str, measure: str) -> str:
        values = np.array([r[key][measure] for r in results])
        return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"

    def described(choice: dict) -> str:
        return f"{choice['checkpoint']} ({choice['step']}), {choice['tta']}"

    lines = [f"ISBI 2012 protocol: train 0-14, choose checkpoint, augmentation, thresholds and rule on 15-19, score 20-24 "
             f"once; {len(results)} seeds, " + (f"the runs in {args.protocol_rescore} scored again" if args.protocol_rescore
                                                 else f"{args.budget:.0f} s of training each on {os.cpu_count()} cores"),
             "", "| seed | steps | best step | checkpoint, augmentation | threshold | Rand error @0.5 | Rand error @t | "
             "Rand error not grown @t | merge threshold | Rand error agglomerated | pixel error @0.5 | pixel error @t | "
             "joint choice (rule, checkpoint, augmentation) | Rand error, joint choice | pixel threshold, checkpoint, "
             "augmentation | pixel error @t_px |",
             "| " + " | ".join(["---"] * 16) + " |"]
    for r in results:
        a, c = r["at_0.5"], r["at_chosen"]
        lines.append(f"| {r['seed']} | {r['steps']} | {r['best_step']} | {described(r)} | {r['threshold']:.1f} | "
                     f"{a['rand_error']:.4f} | {c['rand_error']:.4f} | {c['rand_error_raw']:.4f} | "
                     f"{r['merge_threshold']:.2f} | {c['rand_error_agglomerated']:.4f} | "
                     f"{a['pixel_error']:.4f} | {c['pixel_error']:.4f} | {r['joint']['rule']}, {described(r['joint'])} | "
                     f"{r['joint']['rand_error']:.4f} | {r['pixel']['threshold']:.2f}, {described(r['pixel'])} | "
                     f"{r['pixel']['pixel_error']:.4f} |")
    lines.append(f"| mean ± sd | | | | | {spread('at_0.5', 'rand_error')} | {spread('at_chosen', 'rand_error')} | "
                 f"{spread('at_chosen', 'rand_error_raw')} | | {spread('at_chosen', 'rand_error_agglomerated')} | "
                 f"{spread('at_0.5', 'pixel_error')} | "
                 f"{spread('at_chosen', 'pixel_error')} | | {spread('joint', 'rand_error')} | | "
                 f"{spread('pixel', 'pixel_error')} |")
    lines += ["", f"command: `{command}`"]
    text = "\n".join(lines)
    print(text)
    (out / f"{name}.md").write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=1800, help="training seconds (default 1800)")
    parser.add_argument("--out", default="bench/out/isbi2012")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=572)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="cosine: anneals to 0 at the end of the time budget (default); constant: no annealing")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="decay of a moving average of the weights that is validated and kept (0: none)")
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma", type=float, default=5.0, help="the weight map's border width in px (5 in the paper)")
    parser.add_argument("--no-class-balance", action="store_true", help="no class-frequency weights in the loss")
    parser.add_argument("--batch-norm", action="store_true", help="batch normalisation after each convolution")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout at the end of the contracting path (0.5 in the paper)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW) or SGD's L2 penalty")
    parser.add_argument("--no-elastic", action="store_true")
    parser.add_argument("--val-tile-size", type=int, default=700, help="tile for validation and scoring (700: one tile per 512² slice)")
    parser.add_argument("--no-tta", action="store_true", help="score without test-time flips only (quicker)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects-only", type=Path, default=None, metavar="CKPT",
                        help="skip training: score the instance labels of 'overtile objects' for this checkpoint")
    parser.add_argument("--cell-rules", type=Path, default=None, metavar="CKPT",
                        help="skip training: what each rule that makes cells from P(cell) buys for this checkpoint "
                             "(chosen on 15-19, scored on 20-24)")
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument("--protocol", type=int, nargs="+", default=None, metavar="SEED",
                          help="the honest protocol (train 0-14, choose on 15-19, score 20-24 once) for these seeds, "
                               "each with --budget seconds of training")
    protocol.add_argument("--protocol-rescore", type=Path, default=None, metavar="OUT",
                          help="skip training: the protocol's choices and scores again for the runs "
                               "OUT/protocol-seedS/ of an earlier --protocol (e.g. after a new rule or choice), "
                               "with this command's --protocol-tta, --protocol-checkpoint and --val-tile-size; written to "
                               "--out as protocol-rescored.md")
    parser.add_argument("--protocol-tta", choices=["choose", "none", "all"], default="choose",
                        help="protocol: test-time augmentation chosen on 15-19 (default), or fixed in advance")
    parser.add_argument("--protocol-checkpoint", choices=["choose", "best", "last"], default="choose",
                        help="protocol: the checkpoint (best.pt or last.pt) chosen on 15-19 with the augmentation "
                             "and rule (default), or fixed in advance")
    parser.add_argument("--val-every", type=int, default=150, help="validate (and keep best.pt) every N steps")
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"isbi2012: {DATA} is absent; nothing to benchmark")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = write_zarr_inputs(out)
    if args.objects_only:
        print_objects(score_objects(args.objects_only, images, labels, out), args.objects_only)
        return 0
    if args.cell_rules:
        print(cell_rules(args.cell_rules, images, labels, args.val_tile_size))
        return 0
    if args.protocol or args.protocol_rescore:
        import json

        results = []
        if args.protocol_rescore:
            runs = {int(m[1]): p.parent for p in args.protocol_rescore.glob("protocol-seed*/best.pt")
                    if (m := re.fullmatch(r"protocol-seed(\d+)", p.parent.name))}
            if not runs:
                parser.error(f"--protocol-rescore: no {args.protocol_rescore}/protocol-seedS/best.pt to score")
            runs_to_score = [functools.partial(protocol_scores, runs[seed], seed) for seed in sorted(runs)]
        else:
            runs_to_score = [functools.partial(protocol_seed, seed, out=out) for seed in args.protocol]
        name = "protocol-rescored" if args.protocol_rescore else "protocol"  # the first scores stay
        for run_scores in runs_to_score:
            results.append(run_scores(images=images, labels=labels, args=args))
            (out / f"{name}.json").write_text(json.dumps(results, indent=1))
        print_protocol(results, args, "python bench/isbi2012.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                       out, name)
        return 0
    base = dict(training_choices(args, images, labels), val_slices=tuple(VAL_SLICES), seed=args.seed)

    # 1. training: the learning-rate schedule follows the time budget (issue 16), so the run
    # anneals fully and uses all of it; a few timed steps used to guess the step count instead
    # and left a third to half of the budget unused
    clock = time.perf_counter()
    run = out / "run"
    settings = TrainSettings(**base, out=str(run), steps=10**6, time_limit=args.budget,
                             val_every=args.val_every, checkpoint_every=args.val_every)
    last_print = [0.0]

    def progress(row: dict) -> None:
        if "rand_error" in row or time.perf_counter() - last_print[0] > 60:
            last_print[0] = time.perf_counter()
            val = f", val Rand error {row['rand_error']:.4f}, pixel error {row['pixel_error']:.4f}" if "rand_error" in row else ""
            print(f"isbi2012: step {row['step']}, loss {row['loss']:.4f}, {row['seconds']:.0f} s{val}", flush=True)

    summary = train(settings, on_step=progress)
    trained = time.perf_counter() - clock

    # 2. scoring on the held-out slices
    import zarr

    volume = zarr.open_array(images, mode="r")[VAL_SLICES.start:VAL_SLICES.stop]
    truth = zarr.open_array(labels, mode="r")[VAL_SLICES.start:VAL_SLICES.stop] > 0
    rows = []
    for name in ("last.pt", "best.pt"):
        model = load_model(run / name)
        for tta in (False,) if args.no_tta else (False, True):
            start = time.perf_counter()
            scores = score_segmentation(predict_slices(model, volume, args.val_tile_size, tta), truth)
            rows.append((name, tta, scores, time.perf_counter() - start))
    command = "python bench/isbi2012.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"ISBI 2012, train slices 0-19, validate 20-24; {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        f"model: 2-D valid U-Net, depth {args.depth}, {args.base_channels} base channels, "
        f"{num_parameters(model):,} parameters; {args.tile_size}² patches, batch 1, {args.optimizer} "
        f"({args.lr_schedule}{f', ema {args.ema}' if args.ema else ''}), elastic {'off' if args.no_elastic else 'on'}, w0 {args.w0}",
        f"training: {summary.step} steps in {trained:.0f} s (budget {args.budget:.0f} s); "
        f"best.pt from step {summary.best_step}",
        "",
        "| model | test-time flips | pixel error | Rand error | Rand error (not grown) | IoU | threshold | predict s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, tta, s, seconds in rows:
        lines.append(f"| {name} | {'8' if tta else 'no'} | {s.pixel_error:.4f} | {s.rand_error:.4f} | "
                     f"{s.rand_error_raw:.4f} | {s.iou:.4f} | {s.threshold:.1f} | {seconds:.1f} |")
    lines.append(f"| paper (test set) | | {PAPER['pixel_error']} | {PAPER['rand_error']} | | | | |")
    lines += ["", f"command: `{command}`"]
    text = "\n".join(lines)
    print(text)
    (out / "result.md").write_text(text + "\n")
    print_objects(score_objects(run / "last.pt", images, labels, out), run / "last.pt")
    return 0


def print_objects(rows: list[tuple], model: Path) -> None:
    print(f"\ninstance labels of 'overtile objects' (seeds P(cell) > 0.5, grown over any pixel), {model}, "
          f"slices {VAL_SLICES.start}-{VAL_SLICES.stop - 1}, scored as the job wrote them:")
    print("| grow distance (px) | Rand error, mean | min | max | pixel error (P > 0.5) |\n| --- | --- | --- | --- | --- |")
    for d, mean, low, high, pixel in rows:
        print(f"| {d} | {mean:.4f} | {low:.4f} | {high:.4f} | {pixel:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
