"""onnxruntime against torch on the same U-Net, on CPU: per tile and end to end.

The question it answers: when a model exists both as torch weights (an overtile checkpoint,
or a bioimage.io package's state dict or TorchScript) and as ONNX, which should overtile run
by default? One run measures, for the paper's valid U-Net with 16 base channels (depth 5,
random He weights) exported by ``overtile model export --format onnx``:

(a) per tile: forward passes on tiles already in memory (1212² inputs; ``--tiles`` for more), each
    configuration in a plain child process with the workers' allocator setting, in rounds of
    alternating order, each configuration's fastest pass reported: torch eager
    in ``channels_last`` (overtile's default; NCHW too, for reference), the TorchScript export
    (``channels_last``) and onnxruntime
    (``CPUExecutionProvider``, all graph optimisations, which lays convolutions out in its own
    blocked NCHWc format), each with 1 thread (what a Dask worker slot runs) and with all
    cores' threads. Output megapixels per second, median of the repeats, and the largest
    difference between the two engines' logits;
(b) end to end: ``overtile predict`` (:func:`pipeline.jobs.predict.predict`) of a uint8 Zarr
    image on a warm 2-worker cluster as overtile starts it (one thread each, the allocator
    setting of ``bench/allocator.py``: without it torch's forward passes fault their freed
    activations back in, onnxruntime's own arena does not, and torch loses ~2×), with the checkpoint (torch eager,
    channels_last), the TorchScript export (channels_last) and the ONNX export (onnxruntime);
    a first run of each loads (and for the exports probes) the model, the ``--rounds`` timed
    ones after it (the best reported) do not.

It prints the tables and the ratios onnxruntime / torch. Usage::

    .venv/bin/python bench/models.py --json bench/out/models.json     # ~3 min on 2 cores
    .venv/bin/python bench/models.py --tiles 572 1212 --rounds 3      # the RESULTS.md run, ~6.5 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pipeline.clusters import WORKER_ENVIRONMENT  # the allocator setting workers run with  # noqa: E402

LAUNCH_ENV_DROP = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One per-tile configuration, in this (plain) process: seconds per forward pass."""
    from pipeline.models.kinds import OnnxNet
    from pipeline.numerics.unet import load_model

    torch.set_num_threads(spec["threads"])
    if spec["engine"] == "onnxruntime":
        model = OnnxNet(Path(spec["model"]).read_bytes(), spec["model"], threads=spec["threads"])
    elif spec["engine"] == "torchscript":
        model = torch.jit.load(spec["model"]).eval()
        if spec["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
    else:
        model = load_model(spec["model"])
        if spec["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, spec["tile"], spec["tile"]), dtype=np.float32))
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    times = []
    with torch.inference_mode():
        y = model(x)  # warm-up: first-pass allocations, onnxruntime's kernel selection
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            y = model(x)
            times.append(time.perf_counter() - start)
    np.save(spec["output"], y.float().numpy())
    out = y.shape[-1]
    seconds = min(times)  # the pass least disturbed by anything else on the machine
    return {**spec, "seconds": seconds, "output_px": out * out, "mp_s": out * out / 1e6 / seconds}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_ENV_DROP)}
    env.update(WORKER_ENVIRONMENT)
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env, timeout=900)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def per_tile(args: argparse.Namespace, models: dict[str, Path], tmp: Path) -> list[dict[str, Any]]:
    """Every configuration ``--rounds`` times, the rounds in alternating order (so that a
    neighbour's load on a shared machine does not favour one engine); each configuration's
    best round is its row (the peer at its best)."""
    rows = []
    cores = os.cpu_count() or 1
    configs = [("torch", "channels_last", True), ("torch", "NCHW", False), ("torchscript", "channels_last", True),
               ("onnxruntime", "NCHWc (its own)", False)]
    for tile in args.tiles:
        for threads in sorted({1, cores}):
            best: dict[tuple[str, str], dict[str, Any]] = {}
            for round_ in range(args.rounds):
                for engine, layout, channels_last in (configs if round_ % 2 == 0 else configs[::-1]):
                    spec = {"engine": engine, "layout": layout, "model": str(models[engine]), "tile": tile,
                            "threads": threads, "channels_last": channels_last, "repeats": args.repeats,
                            "output": str(tmp / f"{engine}-{layout[:4]}-{tile}-{threads}.npy")}
                    row = run_child(spec)
                    if (engine, layout) not in best or row["seconds"] < best[engine, layout]["seconds"]:
                        best[engine, layout] = row
            for engine, layout, _ in configs:
                row = best[engine, layout]
                rows.append(row)
                print(f"  tile {tile}² {engine:11s} {layout:15s} {threads} thread(s): {row['seconds']:.3f} s/tile, "
                      f"{row['mp_s']:.3f} output MP/s", flush=True)
            torch_row, script_row, ort_row = rows[-4], rows[-2], rows[-1]
            diff = float(np.abs(np.load(ort_row["output"]) - np.load(torch_row["output"])).max())
            ort_row["max_abs_diff_vs_torch"] = diff
            print(f"  tile {tile}², {threads} thread(s): onnxruntime / torch channels_last = "
                  f"{ort_row['mp_s'] / torch_row['mp_s']:.2f}×, TorchScript / torch = {script_row['mp_s'] / torch_row['mp_s']:.2f}×; "
                  f"largest logit difference {diff:.1e}", flush=True)
    return rows


def end_to_end(args: argparse.Namespace, models: dict[str, Path], tmp: Path) -> list[dict[str, Any]]:
    from pipeline.jobs.blockwise import dask_client
    from pipeline.jobs.predict import PredictSettings, predict

    sys.path.insert(0, str(HERE))
    from predict import make_image

    image = tmp / "image.zarr"
    make_image(image, args.size)
    rows = []
    with dask_client(workers=2, warm="pipeline.jobs.predict") as client:  # overtile's own cluster: its allocator setting
        # each engine's runs in a row: workers keep one model per process, as in a real job
        runs = [(engine, attempt) for engine in models for attempt in ["first (loads the model)"] + ["timed"] * args.rounds]
        for engine, attempt in runs:
            out = tmp / f"{engine}-{attempt[:5]}.zarr"
            settings = PredictSettings(input=str(image), output=str(out), model=str(models[engine]), block_size=args.block,
                                       tile_size=args.tile, compile=False, pyramid=False, overwrite=True)
            start = time.perf_counter()
            job, summary = predict(settings, client=client)
            seconds = time.perf_counter() - start
            compute = sum(r.get("compute_s", 0.0) for r in summary.records)
            rows.append({"engine": engine, "run": attempt, "seconds": seconds, "mp_s": args.size**2 / 1e6 / seconds,
                         "compute_s": compute, "blocks": summary.done, "tiling": job.model.tiling})
            print(f"  {engine:11s} {attempt:24s} {args.size}² in {seconds:.1f} s = {rows[-1]['mp_s']:.2f} MP/s "
                  f"(compute {compute:.1f} s over {summary.done} blocks)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--tiles", type=int, nargs="+", default=[1212], help="tile input edges for (a) (default 1212, overtile's CPU tile)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per configuration and round in (a)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every configuration, in alternating order (default 2)")
    p.add_argument("--size", type=int, default=3072, help="image edge for (b) (default 3072: 9 blocks)")
    p.add_argument("--block", type=int, default=1024, help="block edge for (b)")
    p.add_argument("--tile", type=int, default=1212, help="tile input edge for (b)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from pipeline.models import export
    from pipeline.numerics.unet import UNet, save_model

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        torch.manual_seed(0)
        save_model(UNet(base_channels=args.base), tmp / "unet.pt")
        export(str(tmp / "unet.pt"), str(tmp / "unet.onnx"), "onnx")
        export(str(tmp / "unet.pt"), str(tmp / "unet.ts"), "torchscript")
        models = {"torch": tmp / "unet.pt", "torchscript": tmp / "unet.ts", "onnxruntime": tmp / "unet.onnx"}
        print(f"valid U-Net, depth 5, {args.base} base channels; torch {torch.__version__}, onnxruntime "
              f"{__import__('onnxruntime').__version__}, {os.cpu_count()} cores\n(a) per tile", flush=True)
        tiles = per_tile(args, models, tmp)
        print("(b) end to end, warm 2-worker cluster, 1 thread per worker", flush=True)
        e2e = end_to_end(args, models, tmp)
    timed: dict[str, dict[str, Any]] = {}
    for r in e2e:  # each engine's best timed run
        if r["run"] == "timed" and (r["engine"] not in timed or r["seconds"] < timed[r["engine"]]["seconds"]):
            timed[r["engine"]] = r
    for engine, r in timed.items():
        print(f"  best timed {engine:11s} {r['mp_s']:.2f} MP/s")
    print(f"end to end: onnxruntime / torch channels_last = {timed['onnxruntime']['mp_s'] / timed['torch']['mp_s']:.2f}×, "
          f"TorchScript / torch = {timed['torchscript']['mp_s'] / timed['torch']['mp_s']:.2f}×")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "per_tile": tiles, "end_to_end": e2e}, indent=1))


if __name__ == "__main__":
    main()
