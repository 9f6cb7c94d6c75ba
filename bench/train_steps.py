"""Training step time: what a choice of issue 16's ablation table costs per step.

A choice that makes steps slower cannot buy accuracy within a time budget except by chance,
so these rows need no 30-minute run. Each configuration runs in a plain child process
(glibc malloc with its defaults, the allocator of a plain ``overtile train``):

- ``eager`` / ``compiled``: forward, weighted cross-entropy, backward and Adam on one patch
  in memory (16-base valid U-Net, depth 5, 572², channels_last), eager against
  ``torch.compile`` (inductor, default mode; its compile time is the first step's);
- ``loop-0`` / ``loop-1``: whole steps of ``overtile train``'s loop on ISBI 2012 (patches cut
  in the loop, or in one loader worker process), steady state after 6 steps.

Usage::

    .venv/bin/python bench/train_steps.py            # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = ("eager", "compiled", "loop-0", "loop-1")


def model_steps(compiled: bool, steps: int, size: int, base: int) -> dict:
    import torch

    from pipeline.jobs.train import weighted_cross_entropy
    from pipeline.numerics.unet import UNet

    torch.manual_seed(0)
    model = UNet(1, 2, 2, 5, base, "valid").to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    forward = torch.compile(model) if compiled else model
    out = model.output_size(size)
    x = torch.rand(1, 1, size, size).contiguous(memory_format=torch.channels_last)
    target, weight = torch.randint(0, 2, (1, out, out)), torch.rand(1, out, out)
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        loss = weighted_cross_entropy(forward(x), target, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return {"first": times[0], "median": float(np.median(times[2:])), "min": float(min(times[2:]))}


def loop_steps(loader_workers: int, steps: int, base: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from isbi2012 import DATA, write_zarr_inputs

    from pipeline.jobs.train import TrainSettings, train

    if not DATA.exists():
        return {"skipped": f"{DATA} is absent"}
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = write_zarr_inputs(Path(tmp))
        stamps: list[float] = []
        train(TrainSettings(images=images, labels=labels, axes="zyx", dims=2, test_slices=tuple(range(15, 25)),
                            base_channels=base, optimizer="adam", out=f"{tmp}/run", steps=steps + 6,
                            val_every=10**6, checkpoint_every=10**6, loader_workers=loader_workers),
              on_step=lambda row: stamps.append(time.perf_counter()))
    gaps = np.diff(stamps[5:])
    return {"median": float(np.median(gaps)), "min": float(gaps.min())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (default 12)")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=572)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)  # a child: one configuration
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.one:
        if args.one.startswith("loop"):
            result = loop_steps(int(args.one[-1]), args.steps, args.base_channels)
        else:
            result = model_steps(args.one == "compiled", args.steps, args.tile_size, args.base_channels)
        print(json.dumps(result))
        return 0
    import torch

    rows = {}
    for config in CONFIGS:
        child = subprocess.run([sys.executable, __file__, "--one", config, "--steps", str(args.steps),
                                "--base-channels", str(args.base_channels), "--tile-size", str(args.tile_size)],
                               capture_output=True, text=True, check=True)
        rows[config] = json.loads(child.stdout.strip().splitlines()[-1])
        print(config, rows[config], flush=True)
    print(f"\ntraining steps, {args.base_channels}-base valid U-Net, {args.tile_size}² patches, batch 1, Adam, "
          f"channels_last; torch {torch.__version__}, {torch.get_num_threads()} threads, glibc malloc defaults; "
          f"median (min) seconds per step of {args.steps}")
    print("| configuration | s per step | against eager / the loop in-process | first step s (compiles) |\n"
          "| --- | --- | --- | --- |")
    for config, base in (("eager", "eager"), ("compiled", "eager"), ("loop-0", "loop-0"), ("loop-1", "loop-0")):
        r, b = rows[config], rows[base]
        if "skipped" in r or "skipped" in b:
            print(f"| {config} | skipped: {r.get('skipped') or b.get('skipped')} | | |")
            continue
        first = f"{r['first']:.1f}" if "first" in r else ""
        print(f"| {config} | {r['median']:.3f} ({r['min']:.3f}) | {b['median'] / r['median']:.2f}× | {first} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
