"""The do-it-yourself baseline: ``dask.array.map_overlap`` and an eager torch model.

What a user writes instead of overtile, given the same U-Net: read the Zarr image with
``dask.array.from_zarr``, ``map_overlap`` a function that runs the valid net on each chunk
plus its context (``depth`` = the net's margin, 92 px at depth 5; ``boundary="reflect"``,
which is dask's edge-repeating mirror), normalise ``/255``, softmax, and write the
probabilities with ``to_zarr``. Chunks of 1028 px make each chunk's input 1028 + 2·92 = 1212
px, a valid input (a valid output is ≡ 4 mod 16); an edge chunk of another size is padded
up to the next valid size and its output cropped. The model is built once per process
(kept in a module-level cache), so neither interpreter start nor model building is timed;
each configuration runs in its own fresh process, warmed up on a corner of the image first.

The configurations, each with the eager model in torch's default memory format (NCHW, what
a user writes) and in ``channels_last``:

* ``threads-2x1``: the threaded scheduler with 2 threads, torch 1 thread each;
* ``threads-1x2``: the threaded scheduler with 1 thread, torch 2 threads;
* ``processes-2x1``: the multiprocessing scheduler on a kept pool of 2 spawned processes,
  torch 1 thread each (chunks are pickled to and from the processes);
* ``distributed-2x1``: a ``LocalCluster`` of 2 worker processes with 1 thread each and the
  Nanny's default environment (``MALLOC_TRIM_THRESHOLD_=65536``, ``OMP_NUM_THREADS=1``);

and all of them again with the allocator setting of ``bench/allocator.py`` (``KEEP``: in the
process's environment, or in the Nanny's pre-spawn environment), the DIY at its best. The
figure is output megapixels per second, Zarr to Zarr; the best row is the baseline.

Usage::

    .venv/bin/python bench/diy.py --json bench/out/diy.json             # 4096², 16 configs (~15 min quiet)
    .venv/bin/python bench/diy.py --input image.zarr --json out.json    # your own 2-D uint8 Zarr array
    .venv/bin/python bench/diy.py --quick                               # 1024², chunks 324, a few configs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.numerics.unet import UNet

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pipeline.clusters import WORKER_ENVIRONMENT as KEEP  # bench/allocator.py: the allocator setting for workers

SCHEDULERS = ("threads-2x1", "threads-1x2", "processes-2x1", "distributed-2x1")
FORMATS = ("nchw", "channels_last")
ALLOCATORS = ("default", "keep")


# --- the user's code: model, block function, graph ------------------------------------------

_MODELS: dict[tuple[Any, ...], UNet] = {}


def get_model(base: int, channels_last: bool) -> UNet:
    """The model, built once per process (same seed, so the same weights everywhere)."""
    key = (base, channels_last)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = UNet(in_channels=1, num_classes=2, base_channels=base).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        _MODELS[key] = model
    return _MODELS[key]


def predict_chunk(block: np.ndarray, *, margin: int, base: int, channels_last: bool, threads: int) -> np.ndarray:
    """One chunk and its ``margin`` of context in, the chunk's (2, h, w) probabilities out."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    model = get_model(base, channels_last)
    h, w = block.shape[0] - 2 * margin, block.shape[1] - 2 * margin
    ph, pw = (model.min_input_size(n) - 2 * margin - n for n in (h, w))  # up to a valid size
    x = block.astype(np.float32) / 255
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw)), mode="symmetric")
    t = torch.from_numpy(x)[None, None]
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = torch.softmax(model(t), dim=1)[0, :, :h, :w]
    return np.ascontiguousarray(y.numpy())


def build_graph(source: str, output: str, chunk: int, base: int, channels_last: bool, threads: int,
                region: int | None = None) -> Any:
    """``map_overlap`` over the image (or its top-left ``region``²), stored to ``output``: lazy."""
    import dask.array as da

    margin = UNet(base_channels=base).margin
    image = da.from_zarr(source)
    if region:
        image = image[:region, :region]
    image = image.rechunk(tuple(split(n, chunk, margin) for n in image.shape))
    probs = da.map_overlap(predict_chunk, image, depth=margin, boundary="reflect", trim=False, dtype=np.float32,
                           new_axis=0, chunks=((2,),) + image.chunks, meta=np.empty((0, 0, 0), np.float32),
                           margin=margin, base=base, channels_last=channels_last, threads=threads)
    if any(axis[-1] > axis[0] for axis in image.chunks):  # a merged last chunk: to_zarr wants a regular grid
        probs = probs.rechunk((2, chunk, chunk))
    return probs.to_zarr(output, overwrite=True, compute=False)


def split(n: int, chunk: int, least: int) -> tuple[int, ...]:
    """Chunks of ``chunk`` along an axis of ``n``, a last one under ``least`` merged into the one before
    (``map_overlap`` would otherwise rechunk behind the back of the ``chunks`` it was given)."""
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    if len(sizes) > 1 and sizes[-1] < least:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return tuple(sizes)


# --- one configuration in this process -------------------------------------------------------


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``spec['repeats']`` full runs of one configuration after a warm-up run on a corner."""
    import dask

    scheduler, workers, threads = spec["scheduler"], spec["workers"], spec["threads"]
    channels_last = spec["format"] == "channels_last"

    def graph(out: str, region: int | None = None) -> Any:
        return build_graph(spec["input"], out, spec["chunk"], spec["base"], channels_last, threads, region)

    torch.set_num_threads(threads)
    pool = cluster = client = None
    compute_kwargs: dict[str, Any] = {}
    try:
        if scheduler == "threads":
            compute_kwargs = {"scheduler": "threads", "num_workers": workers}
        elif scheduler == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=set_threads, initargs=(threads,))
            compute_kwargs = {"scheduler": "processes", "pool": pool}
        else:
            from distributed import Client, LocalCluster

            if spec["allocator"] == "keep":  # see bench/allocator.py: config *and* os.environ
                os.environ.update(KEEP)
                pre = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **KEEP}
                dask.config.set({"distributed.nanny.pre-spawn-environ": pre})
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
            client.run(set_threads, threads)
            compute_kwargs = {}
        out = spec["output"]
        warm_region = spec["chunk"] * 2 * max(1, workers // 2)
        t = time.perf_counter()
        dask.compute(graph(out + "-warm", min(warm_region, spec["size"])), **compute_kwargs)
        warm_s = time.perf_counter() - t
        shutil.rmtree(out + "-warm", ignore_errors=True)
        runs = []
        for i in range(spec["repeats"]):
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            dask.compute(graph(out), **compute_kwargs)
            runs.append(time.perf_counter() - t)
        env = client.run(lambda: {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}) if client else None
        seen = client.run(torch.get_num_threads) if client else None
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        if pool is not None:
            pool.shutdown()
    check = verify(out, spec["size"])
    shutil.rmtree(out, ignore_errors=True)
    mp = spec["size"] ** 2 / 1e6
    return {"seconds": runs, "best_s": min(runs), "mp_s": mp / min(runs), "warm_s": warm_s,
            "worker_env": env, "worker_torch_threads": seen, "check": check,
            "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def verify(output: str, size: int) -> dict[str, Any]:
    """Shape, finiteness and sum-to-one of the written probabilities (a corner of them)."""
    import zarr

    array = zarr.open_array(output, mode="r")
    corner = array[:, : min(size, 1500), : min(size, 1500)]
    return {"shape": list(array.shape), "finite": bool(np.isfinite(corner).all()),
            "max_sum_error": float(np.abs(corner.sum(axis=0) - 1).max())}


# --- the benchmark (parent) -------------------------------------------------------------------


def make_image(path: str, size: int, chunk: int = 1024, seed: int = 0) -> None:
    """A ``size``² uint8 Zarr array of smooth blobs and noise, written chunk by chunk."""
    import zarr

    array = zarr.create_array(store=path, shape=(size, size), chunks=(chunk, chunk), dtype="uint8", overwrite=True)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            yy, xx = np.meshgrid(np.arange(y, y + h), np.arange(x, x + w), indexing="ij")
            field = np.sin(yy / 37.0) * np.cos(xx / 53.0)
            noise = np.random.default_rng((seed, y, x)).normal(0.0, 12.0, (h, w))
            array[y : y + h, x : x + w] = np.clip(110 + 80 * field + noise, 0, 255).astype(np.uint8)


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for allocator in args.allocators:
        for sched in args.schedulers:
            name, layout = sched.split("-")
            workers, threads = (int(v) for v in layout.split("x"))
            for fmt in args.formats:
                out.append({"label": f"{sched} {fmt} {allocator}", "scheduler": name, "workers": workers,
                            "threads": threads, "format": fmt, "allocator": allocator})
    return out


def clean_env() -> dict[str, str]:
    drop = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run_config(cfg: dict[str, Any], args: argparse.Namespace, source: str, workdir: Path) -> dict[str, Any]:
    tag = cfg["label"].replace(" ", "_")
    spec = {**cfg, "input": source, "output": str(workdir / f"out-{tag}.zarr"), "chunk": args.chunk,
            "base": args.base, "size": args.size, "repeats": args.repeats}
    spec_path, result_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    if cfg["allocator"] == "keep" and cfg["scheduler"] != "distributed":
        env.update(KEEP)  # the distributed child gives it to its Nanny itself
    proc = subprocess.run([sys.executable, str(HERE / "diy.py"), "--child", str(spec_path), "--result", str(result_path)],
                          env=env, timeout=3600, check=False)
    if proc.returncode != 0 or not result_path.exists():
        return {**cfg, "error": f"exit status {proc.returncode}"}
    return {**cfg, **json.loads(result_path.read_text())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help="a 2-D uint8 Zarr array (default: generate one of --size²)")
    p.add_argument("--size", type=int, default=4096, help="edge of the generated image (default 4096)")
    p.add_argument("--chunk", type=int, default=1028, help="chunk edge: the net's output per task (default 1028 → 1212 in)")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration, best taken (default 2)")
    p.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    p.add_argument("--quick", action="store_true", help="1024², chunks of 324, 1 repeat, 5 configurations")
    p.add_argument("--json", type=Path, default=None, help="also write every row to this JSON file")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.chunk, args.repeats = min(args.size, 1024), 324, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        import diy  # this file as a module: its functions then pickle by reference, and the
        #             model cache is each worker process's own (not a copy sent with every task)

        spec = json.loads(args.child.read_text())
        args.result.write_text(json.dumps(diy.child(spec)))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="overtile-diy-"))
    t_all = time.perf_counter()
    try:
        if args.input:
            import zarr

            source = args.input
            shape = zarr.open_array(source, mode="r").shape
            if len(shape) != 2 or shape[0] != shape[1]:
                raise SystemExit(f"{source}: expected a square 2-D array, got shape {shape}")
            args.size = shape[0]
        else:
            source = str(workdir / "image.zarr")
            make_image(source, args.size)
        todo = configs(args)
        if args.quick:  # every code path once
            keep = {("threads", "nchw", "default"), ("threads", "channels_last", "keep"),
                    ("processes", "channels_last", "default"), ("distributed", "channels_last", "default"),
                    ("distributed", "channels_last", "keep")}
            todo = [c for c in todo if (c["scheduler"], c["format"], c["allocator"]) in keep
                    and (c["scheduler"] != "threads" or (c["threads"] == 1) == (c["format"] == "nchw"))]
        print(f"DIY map_overlap benchmark: {args.size}² uint8, chunks {args.chunk} (+2×{UNet(base_channels=args.base).margin} "
              f"context), base {args.base}, {len(todo)} configurations, best of {args.repeats}", flush=True)
        results = []
        for cfg in todo:
            r = run_config(cfg, args, source, workdir)
            results.append(r)
            msg = r.get("error") or (f"{r['mp_s']:.3f} MP/s (runs {'/'.join(f'{s:.1f}' for s in r['seconds'])} s, "
                                     f"warm-up {r['warm_s']:.1f} s; check {r['check']})")
            print(f"  {cfg['label']}: {msg}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = [r for r in results if "error" not in r]
    best = max(ok, key=lambda r: r["mp_s"]) if ok else None
    print("\n| configuration | torch threads | best s | out MP/s |\n|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | {r['threads']} | failed: {r['error']} | |")
        else:
            print(f"| {r['label']}{' ← best' if r is best else ''} | {r['threads']} | {r['best_s']:.2f} | {r['mp_s']:.3f} |")
    if best:
        print(f"\nDIY best: {best['label']}, {best['mp_s']:.3f} MP/s")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "keep": KEEP,
                                         "rows": results, "best": best}, indent=1))
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
