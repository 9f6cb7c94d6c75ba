"""Benchmark overtile's Zarr-to-Zarr prediction against the raw model and MONAI, on CPU.

One run measures, on a synthetic uint8 Zarr image (default 4096×4096) and the paper's valid
U-Net with 16 base channels (depth 5):

(a) raw model throughput: batched forward passes on tiles already in memory, run the way
    overtile runs them (channels_last, one torch thread per stream, one stream per Dask
    worker, 2 workers), in output megapixels per second;
(b) overtile end to end, Zarr in to Zarr out (:func:`pipeline.predict.predict`), on an
    already started 2-worker cluster (warm), and from a cold start (cluster start-up, worker
    imports and model loading included);
(c) MONAI's ``sliding_window_inference`` on the same image, read from and written to Zarr,
    with a same-padding U-Net of the same width in one process of 2 torch threads;
(d) the peak resident memory of each, sampled over the process and all its children
    (client, scheduler and Dask workers), and overtile's peak again on an image twice as
    large per side, which should be about the same (blockwise: memory follows the block,
    not the image).

Every measurement runs in its own child process (``--child``) so that peaks do not mix.
It prints a table and the ratios b/a and b/c against their targets.

Usage::

    .venv/bin/python bench/predict.py                 # the full benchmark (~10 min on 2 cores)
    .venv/bin/python bench/predict.py --quick         # small sizes: a smoke test (~1 min)
    .venv/bin/python bench/predict.py --size 2048 --json bench/out/result.json

MONAI is a bench-only dependency (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 2**20


# --- synthetic data and models (parent) --------------------------------------------------


def make_image(path: Path, size: int, chunk: int = 1024, seed: int = 0) -> None:
    """Write a ``size``² uint8 Zarr array of bright blobs on a dark noisy background.

    A smooth random field (Gaussian-blurred noise on a grid 8× coarser) is interpolated to
    full resolution chunk by chunk from global coordinates, so chunks join without seams and
    the full image is never in memory; thresholding it gives the blobs.
    """
    import zarr
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal((size // 8 + 2,) * 2).astype(np.float32), 2.0, mode="wrap")
    coarse /= coarse.std()
    array = zarr.create_array(store=str(path), shape=(size, size), chunks=(chunk, chunk), dtype="uint8", overwrite=True)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            yy, xx = np.meshgrid((np.arange(y, y + h) + 0.5) / 8, (np.arange(x, x + w) + 0.5) / 8, indexing="ij")
            field = ndimage.map_coordinates(coarse, [yy, xx], order=1)
            noise = np.random.default_rng((seed, y, x)).normal(0.0, 12.0, (h, w))
            value = 50 + 130 / (1 + np.exp(-4 * (field - 0.8))) + noise
            array[y : y + h, x : x + w] = np.clip(value, 0, 255).astype(np.uint8)


def make_models(workdir: Path, base: int) -> dict[str, str]:
    """Checkpoints of overtile's U-Net, valid and same padding, same width and seed."""
    import torch

    from pipeline.unet import UNet, save_model

    paths = {}
    for padding in ("valid", "same"):
        torch.manual_seed(0)
        path = workdir / f"unet{base}-{padding}.pt"
        save_model(UNet(base_channels=base, padding=padding), path)
        paths[padding] = str(path)
    return paths


# --- memory: sample the child's process tree (parent) ------------------------------------


class MemorySampler(threading.Thread):
    """Poll the resident memory of a process and all its descendants every ``interval`` s.

    Records the peak of the sum over the tree and each process's own peak. RSS counts the
    shared library pages (torch is ~200 MB of them) once per process, so the sum over several
    Python processes overstates what they take together; ``anon`` (RSS minus file-backed and
    shared pages) is the private part. Sampling can miss a spike shorter than the interval;
    each child also reports its own exact high-water mark (``ru_maxrss``).
    """

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stopped = threading.Event()
        self.peak_total = 0
        self.peak_total_anon = 0
        self.peak: dict[int, int] = {}
        self.peak_anon: dict[int, int] = {}
        self.names: dict[int, str] = {}

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        procs: list[psutil.Process] = []
        listed = 0.0
        while not self.stopped.is_set():
            if time.monotonic() - listed > 0.5:  # listing descendants scans /proc: not every sample
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.NoSuchProcess:
                    return
                listed = time.monotonic()
            total = total_anon = 0
            for p in procs:
                try:
                    mi = p.memory_info()
                    if p.pid not in self.names:
                        self.names[p.pid] = " ".join(p.cmdline()[-2:])[-60:]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                anon = mi.rss - mi.shared
                total += mi.rss
                total_anon += anon
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), mi.rss)
                self.peak_anon[p.pid] = max(self.peak_anon.get(p.pid, 0), anon)
            self.peak_total = max(self.peak_total, total)
            self.peak_total_anon = max(self.peak_total_anon, total_anon)
            self.stopped.wait(self.interval)


def cpu_busy() -> dict[str, float]:
    """Machine-wide busy and stolen CPU seconds so far, and this process's children's."""
    import psutil

    t = psutil.cpu_times()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"busy": t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0),
            "steal": getattr(t, "steal", 0.0), "children": children.ru_utime + children.ru_stime,
            "self": me.ru_utime + me.ru_stime, "wall": time.perf_counter()}


def foreign_load(before: dict[str, float], after: dict[str, float], cores: int) -> dict[str, float]:
    """How much of the machine others used while a child ran (this is a shared 2-core box).

    ``foreign`` is the machine's busy CPU time not spent by the child's process tree (the
    child and its Dask workers, exact from ``RUSAGE_CHILDREN``), as a fraction of all the
    cores over the child's wall time; ``steal`` is time the hypervisor gave to other VMs.
    A few per cent is the sampler and the kernel; more means the timing is not clean.
    """
    wall = after["wall"] - before["wall"]
    tree = after["children"] - before["children"]
    others = after["busy"] - before["busy"] - tree - (after["self"] - before["self"])
    return {"wall_s": wall, "tree_cpu_s": tree, "foreign": max(0.0, others) / (wall * cores),
            "steal": (after["steal"] - before["steal"]) / (wall * cores),
            "sampler_cpu_s": after["self"] - before["self"]}


def wait_quiet(limit: float, threshold: float = 0.10) -> float:
    """Wait up to ``limit`` s until the machine was idle (< ``threshold`` busy) for 3 s; return the last load."""
    import psutil

    deadline = time.monotonic() + limit
    while True:
        load = psutil.cpu_percent(interval=3.0) / 100
        if load < threshold or time.monotonic() > deadline:
            return load
        print(f"    machine busy ({100 * load:.0f}% of all cores used by others); waiting", flush=True)


def disturbance(result: dict[str, Any]) -> float:
    """The largest share of the machine others took during any timed run of a child's result."""
    shares = [r["foreign"] for r in result.get("runs", []) + result.get("warm", [])]
    shares += [result[k]["foreign"] for k in ("cold",) if k in result] + ([result["foreign"]] if "foreign" in result else [])
    return max(shares, default=result["load"]["foreign"])


def run_child(kind: str, spec: dict[str, Any], workdir: Path, wait: float = 0.0, retries: int = 0) -> dict[str, Any]:
    """Run one measurement in a fresh process, again (up to ``retries`` times) if others disturbed it."""
    for attempt in range(retries + 1):
        result = run_child_once(kind, spec, workdir, wait)
        result["attempts"] = attempt + 1
        if disturbance(result) <= 0.10:
            break
        if attempt < retries:
            print(f"    others took {100 * disturbance(result):.0f}% of the machine during a timed run; measuring again",
                  flush=True)
    return result


def run_child_once(kind: str, spec: dict[str, Any], workdir: Path, wait: float = 0.0, timeout: float = 3600) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; return its result with its memory and the load."""
    idle_before = wait_quiet(wait) if wait > 0 else None
    tag = f"{kind}-{spec.get('label', '')}-{time.monotonic_ns()}"
    spec_path, result_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps({"kind": kind, **spec}))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(spec_path), "--result", str(result_path)]
    before = cpu_busy()
    proc = subprocess.Popen(cmd, cwd=os.getcwd())
    sampler = MemorySampler(proc.pid)
    sampler.start()
    try:
        rc = proc.wait(timeout)
    finally:
        sampler.stopped.set()
        sampler.join()
    load = foreign_load(before, cpu_busy(), len(os.sched_getaffinity(0)))
    if rc != 0 or not result_path.exists():
        raise RuntimeError(f"child {kind} {spec.get('label', '')} failed with exit status {rc}")
    result = json.loads(result_path.read_text())
    workers = [int(p) for p in result.get("worker_pids", [])]
    if result.get("output"):
        result["check"] = verify_output(result["output"])
        shutil.rmtree(result["output"], ignore_errors=True)
    result["load"] = {**load, "idle_check_before": idle_before}
    result["memory"] = {
        "peak_sum_mib": sampler.peak_total / MiB,
        "peak_sum_anon_mib": sampler.peak_total_anon / MiB,
        "client_peak_mib": sampler.peak.get(proc.pid, 0) / MiB,
        "worker_peak_mib": [sampler.peak.get(p, 0) / MiB for p in workers],
        "worker_peak_anon_mib": [sampler.peak_anon.get(p, 0) / MiB for p in workers],
        "processes": {sampler.names.get(p, str(p)) + f" [{p}]": v / MiB for p, v in sampler.peak.items()},
    }
    return result


# --- children ------------------------------------------------------------------------------


class TreeLoad:
    """Others' share of the machine while a block of code runs, seen from inside a child.

    Machine-wide busy CPU time minus the CPU time of this process and the given worker
    processes, as a fraction of all cores over the wall time.
    """

    def __init__(self, pids: list[int]):
        import psutil

        self.procs = [psutil.Process()] + [psutil.Process(p) for p in pids]

    def _now(self) -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        mine = 0.0
        for p in self.procs:
            c = p.cpu_times()
            mine += c.user + c.system
        return time.perf_counter(), busy, mine

    def __enter__(self) -> "TreeLoad":
        self.start = self._now()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = self._now()
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        self.foreign = max(0.0, others) / (wall * len(os.sched_getaffinity(0)))


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def raw_stream(model_path: str, tile: int, threads: int, tiles: int, batch_size: int) -> dict[str, Any]:
    """Dask task: forward ``tiles`` batches of random tiles through the worker's cached model.

    The model comes from :func:`pipeline.predict.cached_model`, the very loader (thread
    count, channels_last) that :func:`pipeline.predict.predict_block` uses, and the batches go
    through :func:`pipeline.tiling.run_tiles`, its forward pass; the tile is made here, in the
    worker, so no pixels cross the network.
    """
    import torch

    from pipeline.predict import cached_model
    from pipeline.tiling import run_tiles

    # cached_model's signature is still moving (an explicit thread count was dropped for
    # "one thread per task"); call it whichever way it is, and report the threads it set
    if "threads" in inspect.signature(cached_model).parameters:
        model = cached_model(model_path, "cpu", threads, True)
    else:
        model = cached_model(model_path, "cpu", True)
    x = np.random.default_rng(os.getpid()).standard_normal((batch_size, 1, tile, tile)).astype(np.float32)
    seconds = []
    start = time.time()
    for _ in range(tiles):
        t = time.perf_counter()
        (y,) = run_tiles(model, [x])
        seconds.append(time.perf_counter() - t)
    end = time.time()
    return {"start": start, "end": end, "tile_s": seconds, "out_shape": list(y.shape) if tiles else None,
            "pid": os.getpid(), "torch_threads": torch.get_num_threads(), "maxrss_mib": maxrss_mib()}


def time_forward_passes() -> None:
    """Worker: wrap :func:`pipeline.tiling.run_tiles` to log the time of every forward pass.

    For the diagnostic run only (never the timed ones): it splits a block's ``compute_s``
    into the model's share and everything around it (normalise, crop, stitch, softmax).
    """
    import pipeline.tiling as tiling

    if getattr(tiling.run_tiles, "_bench_log", None) is not None:
        return
    inner, log = tiling.run_tiles, []

    def run_tiles(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - t)

    run_tiles._bench_log = log
    tiling.run_tiles = run_tiles


def forward_pass_log() -> list[float]:
    import pipeline.tiling as tiling

    log = getattr(tiling.run_tiles, "_bench_log", [])
    return list(log)


def worker_maxrss() -> float:
    return maxrss_mib()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """(a): one stream per worker of the same 2-worker cluster overtile runs on."""
    from pipeline import execute

    with execute.dask_client(workers=spec["workers"]) as client:
        workers = sorted(client.scheduler_info()["workers"])
        pids = client.run(os.getpid)
        args = (spec["model"], spec["tile"], spec["threads"])

        def streams(tiles: int) -> list[dict[str, Any]]:
            futures = [client.submit(raw_stream, *args, tiles, spec["batch_size"], workers=[w], pure=False)
                       for w in workers]
            return client.gather(futures)

        warm = streams(1)  # first tile of a shape: oneDNN picks its kernels, pages are touched
        runs = []
        for _ in range(spec["repeats"]):
            with TreeLoad(list(pids.values())) as load:
                res = streams(spec["tiles"])
            wall = max(r["end"] for r in res) - min(r["start"] for r in res)
            out = res[0]["out_shape"]
            pixels = sum(len(r["tile_s"]) for r in res) * out[0] * out[2] * out[3]
            runs.append({"wall_s": wall, "mp_s": pixels / 1e6 / wall, "tile_s": [r["tile_s"] for r in res],
                         "start_skew_s": max(r["start"] for r in res) - min(r["start"] for r in res),
                         "foreign": load.foreign})
        maxrss = client.run(worker_maxrss)
    return {"runs": runs, "warmup_tile_s": [w["tile_s"][0] for w in warm], "out_shape": out,
            "torch_threads": [r["torch_threads"] for r in res], "worker_pids": [pids[w] for w in workers],
            "worker_maxrss_mib": [maxrss[w] for w in workers], "client_maxrss_mib": maxrss_mib()}


def verify_output(url: str) -> dict[str, Any]:
    """Every chunk written (the fill value is NaN) and probabilities that sum to one."""
    import zarr

    array = zarr.open_group(store=url, mode="r")["0"]
    finite, worst = True, 0.0
    for y in range(0, array.shape[1], 2048):
        part = array[:, y : y + 2048, :]
        finite &= bool(np.isfinite(part).all())
        worst = max(worst, float(np.abs(part.sum(axis=0) - 1).max()))
    return {"all_finite": finite, "max_sum_error": worst}


def child_overtile(spec: dict[str, Any]) -> dict[str, Any]:
    """(b): cluster start, a cold predict(), then warm predict() runs on the same cluster."""
    from pipeline import execute
    from pipeline.predict import PredictSettings, predict

    def settings(out: str) -> PredictSettings:
        return PredictSettings(input=spec["input"], output=out, model=spec["model"], block_size=spec["block"],
                               tile_size=spec["tile"], batch_size=spec["batch_size"], device="cpu", overwrite=True,
                               pyramid=False)  # the same output as MONAI's: full resolution only

    def run(client: Any, out: str) -> dict[str, Any]:
        shutil.rmtree(out, ignore_errors=True)
        with TreeLoad(list(pids.values())) as load:
            t = time.perf_counter()
            job, summary = predict(settings(out), client=client)
            seconds = time.perf_counter() - t
        return {"seconds": seconds, "records": summary.records, "tile": job.tile_size,
                "blocks": summary.done, "output": out, "foreign": load.foreign}

    t0 = time.perf_counter()
    with execute.dask_client(workers=spec["workers"]) as client:
        start_s = time.perf_counter() - t0
        pids = client.run(os.getpid)
        cold = run(client, spec["output"] + "-cold")
        shutil.rmtree(cold["output"], ignore_errors=True)
        warm = []
        for i in range(spec["repeats"]):
            warm.append(run(client, spec["output"] + f"-warm{i}"))
            if i + 1 < spec["repeats"]:
                shutil.rmtree(warm[-1]["output"], ignore_errors=True)
        maxrss = client.run(worker_maxrss)
        threads = client.run(torch_threads)
        diagnostic = None
        if spec.get("diagnose"):
            shutil.rmtree(warm[-1]["output"], ignore_errors=True)
            client.run(time_forward_passes)
            diagnostic = run(client, spec["output"] + "-diagnostic")
            diagnostic["forward_s"] = client.run(forward_pass_log)
            warm[-1]["output"] = diagnostic["output"]
    return {"start_s": start_s, "cold": cold, "warm": warm, "output": warm[-1]["output"], "diagnostic": diagnostic,
            "worker_pids": [pids[w] for w in pids],
            "torch_threads": [threads[w] for w in pids], "worker_maxrss_mib": [maxrss[w] for w in pids],
            "client_maxrss_mib": maxrss_mib()}


def child_monai(spec: dict[str, Any]) -> dict[str, Any]:
    """(c): MONAI sliding_window_inference over the whole image in one process, Zarr to Zarr.

    The output is written with overtile's own :func:`pipeline.storage.create_image` (same
    OME-Zarr layout, chunks and codec as (b)) so that only the inference differs.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline import storage
    from pipeline.geometry import Box
    from pipeline.unet import load_model

    torch.set_num_threads(spec["threads"])
    normalization = None
    if spec["net"] == "overtile-same":
        model = load_model(spec["model"])
        normalization = model.normalization
    else:  # MONAI's own same-padding U-Net (instance norm, LeakyReLU), random weights
        from monai.networks.nets import BasicUNet

        torch.manual_seed(0)
        b = spec["base"]
        model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(b, 2 * b, 4 * b, 8 * b, 16 * b, b))
    model = model.eval()
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = {"seconds": 0.0, "windows": 0}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        y = model(x.contiguous(memory_format=fmt))
        net["seconds"] += time.perf_counter() - t
        net["windows"] += x.shape[0]
        return y

    roi = spec["roi"]
    with torch.inference_mode():
        predictor(torch.zeros((spec["sw_batch_size"], 1, roi, roi)))  # warm-up, like (a) and warm (b)
    net.update(seconds=0.0, windows=0)
    phases = {}
    load = TreeLoad([]).__enter__()
    t0 = time.perf_counter()
    source = storage.open_image(spec["input"])
    raw = source.read(Box.from_shape(source.spatial_shape))
    image = normalization(raw) if normalization else raw.astype(np.float32) / 255
    x = torch.from_numpy(image[None])  # (1, 1, H, W)
    phases["read_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi, spec["sw_batch_size"], predictor, overlap=spec["overlap"], mode="gaussian")
        probs = torch.softmax(logits, dim=1)[0].numpy()
    phases["infer_s"] = time.perf_counter() - t
    phases["net_s"], windows = net["seconds"], net["windows"]
    t = time.perf_counter()
    out = spec["output"]
    shutil.rmtree(out, ignore_errors=True)
    array = storage.create_image(out, probs.shape, (probs.shape[0], spec["block"], spec["block"]), "float32", "cyx",
                                 name="probabilities", overwrite=True)
    array[...] = probs
    phases["write_s"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    load.__exit__()
    phases["foreign"] = load.foreign
    return {"seconds": seconds, **phases, "windows": windows, "torch_threads": torch.get_num_threads(),
            "output": out, "client_maxrss_mib": maxrss_mib(), "worker_pids": []}


CHILDREN = {"raw": child_raw, "overtile": child_overtile, "monai": child_monai}


# --- the benchmark (parent) ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="image edge in pixels (default 4096)")
    p.add_argument("--scale-size", type=int, default=None, help="edge of the larger image for overtile's memory check (default 2×size; 0 skips it)")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    p.add_argument("--block", type=int, default=2048, help="overtile block edge (default 2048)")
    p.add_argument("--tile", type=int, default=1212, help="overtile tile input edge (default 1212)")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass in (a) and (b) (default 1)")
    p.add_argument("--raw-tiles", type=int, default=8, help="timed tiles per stream in (a) (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of (a) and of warm (b) (default 3; medians reported)")
    p.add_argument("--roi", type=int, default=1024, help="MONAI roi edge (default 1024)")
    p.add_argument("--overlap", type=float, default=0.25, help="MONAI overlap (default 0.25, MONAI's default)")
    p.add_argument("--sw-batch", type=int, nargs="+", default=[1, 4], help="MONAI sw_batch_size values to try (default 1 4)")
    p.add_argument("--monai-threads", type=int, default=None, help="torch threads of the MONAI process (default: all cores)")
    p.add_argument("--no-basicunet", action="store_true", help="skip the extra MONAI BasicUNet row")
    p.add_argument("--monai-extra", nargs="*", default=["1152:0.125"], metavar="ROI:OVERLAP",
                   help="extra MONAI rows with other roi and overlap (best sw_batch and format), not used for b/c "
                        "(default 1152:0.125: fewer, larger windows than the default's 25)")
    p.add_argument("--workdir", type=Path, default=None, help="where images and outputs go (default: a temporary directory)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each measurement wait up to this long for the machine to be idle (others < 10%%)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help="measure again, up to N times, when others took over 10%% of the machine during a timed run")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.block, args.tile, args.roi = min(args.size, 1024), 512, 540, 256
        args.raw_tiles, args.repeats, args.sw_batch, args.monai_extra = 2, 1, [1], ["320:0.125"]
    if args.scale_size is None:
        args.scale_size = 2 * args.size
    return args


def fmt_mib(values: list[float] | float) -> str:
    if isinstance(values, list):
        return "/".join(f"{v:.0f}" for v in values) if values else "-"
    return f"{values:.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child.read_text())
        result = CHILDREN[spec["kind"]](spec)
        args.result.write_text(json.dumps(result))
        return 0

    import torch

    from pipeline import execute
    from pipeline.geometry import Box
    from pipeline.tiling import plan_tiles
    from pipeline.unet import UNet

    cores = execute.default_workers()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="overtile-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"overtile benchmark: {args.size}² uint8, U-Net base {args.base} depth 5, {args.workers} Dask workers, "
          f"{cores} cores, torch {torch.__version__}; work dir {workdir}", flush=True)

    # the tile shape (b) really runs: the tile size snapped and shrunk to cover a block evenly
    valid = UNet(base_channels=args.base, padding="valid")
    plan = plan_tiles(valid, Box.from_shape((min(args.block, args.size),) * 2), args.tile)
    tile = plan.tiles[0].input.shape[0]
    threads = max(1, cores // args.workers)  # what plan_prediction gives a local CPU cluster
    models = make_models(workdir, args.base)
    sizes = [args.size] + ([args.scale_size] if args.scale_size else [])
    images = {}
    for n in sizes:
        t = time.perf_counter()
        images[n] = str(workdir / f"image-{n}.zarr")
        make_image(Path(images[n]), n)
        print(f"  made {n}² image in {time.perf_counter() - t:.1f} s", flush=True)

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "cores": cores, "tile": tile,
                               "torch": torch.__version__}
    print(f"(a) raw model: {args.workers} streams × {args.raw_tiles} tiles of {tile}², {threads} thread(s) each", flush=True)
    results["a"] = run_child("raw", {"label": "a", "model": models["valid"], "tile": tile, "threads": threads,
                                     "workers": args.workers, "tiles": args.raw_tiles, "repeats": args.repeats,
                                     "batch_size": args.batch_size}, workdir, args.wait_quiet, args.retry_busy)
    print("(b) overtile predict()", flush=True)
    results["b"] = {}
    for n in sizes:
        results["b"][n] = run_child("overtile", {
            "label": f"b{n}", "input": images[n], "output": str(workdir / f"overtile-{n}.zarr"), "model": models["valid"],
            "block": args.block, "tile": args.tile, "batch_size": args.batch_size, "workers": args.workers,
            "repeats": args.repeats if n == args.size else 1, "diagnose": n == args.size},
            workdir, args.wait_quiet, args.retry_busy)
    print("(c) MONAI sliding_window_inference", flush=True)
    monai_threads = args.monai_threads or cores
    results["c"] = []

    def monai(net: str, bs: int, cl: bool, roi: int, overlap: float, size: int) -> dict[str, Any]:
        spec = {"label": f"c{size}-{net}-{bs}-{int(cl)}-{roi}", "net": net, "model": models["same"], "base": args.base,
                "input": images[size], "output": str(workdir / f"monai-{size}.zarr"), "roi": roi, "overlap": overlap,
                "sw_batch_size": bs, "channels_last": cl, "threads": monai_threads, "block": args.block}
        r = run_child("monai", spec, workdir, args.wait_quiet, args.retry_busy)
        r["config"] = {"net": net, "sw_batch_size": bs, "channels_last": cl, "threads": monai_threads,
                       "roi": roi, "overlap": overlap, "size": size}
        print(f"    {net} {size}² roi {roi} overlap {overlap} sw_batch={bs} channels_last={cl}: {r['seconds']:.1f} s",
              flush=True)
        return r

    for cl in (True, False):
        for bs in args.sw_batch:
            results["c"].append(monai("overtile-same", bs, cl, args.roi, args.overlap, args.size))
    best_c = min(results["c"], key=lambda r: r["seconds"])  # b/c is taken against MONAI at its best
    best = best_c["config"]
    if not args.no_basicunet:
        results["c"].append(monai("monai-basicunet", best["sw_batch_size"], best["channels_last"], args.roi,
                                  args.overlap, args.size))
    for extra in args.monai_extra:
        roi, overlap = extra.split(":")
        results["c"].append(monai("overtile-same", best["sw_batch_size"], best["channels_last"], int(roi),
                                  float(overlap), args.size))
    if args.scale_size:
        results["c_scale"] = monai("overtile-same", best["sw_batch_size"], best["channels_last"], args.roi,
                                   args.overlap, args.scale_size)
    results["total_s"] = time.perf_counter() - t_all

    report(results, args, tile, threads, best_c)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace, tile: int, threads: int, best_c: dict[str, Any]) -> None:
    n = args.size
    mp = n * n / 1e6
    a = results["a"]
    a_mps = statistics.median(r["mp_s"] for r in a["runs"])
    b = results["b"][n]
    b_s = statistics.median(r["seconds"] for r in b["warm"])
    b_mps = mp / b_s
    cold_s = b["start_s"] + b["cold"]["seconds"]
    c_s = best_c["seconds"]
    c_mps = mp / c_s
    out = a["out_shape"]

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    def others(r: dict[str, Any]) -> str:
        return f"{100 * r['load']['foreign']:.0f}%/{100 * r['load']['steal']:.0f}%"

    rows = [("measure", "seconds", "out MP/s", "peak RSS sum MiB", "client MiB", "per-worker MiB", "others/steal")]
    am = a["memory"]
    rows.append((f"(a) raw model, {args.workers}×{args.raw_tiles} tiles {tile}²→{out[2]}², median of {len(a['runs'])}",
                 f"{statistics.median(r['wall_s'] for r in a['runs']):.2f}", f"{a_mps:.3f}",
                 fmt_mib(am["peak_sum_mib"]), fmt_mib(am["client_peak_mib"]), fmt_mib(am["worker_peak_mib"]), others(a)))
    bm = b["memory"]
    rows.append((f"(b) overtile {n}², warm cluster, median of {len(b['warm'])}", f"{b_s:.2f}", f"{b_mps:.3f}",
                 fmt_mib(bm["peak_sum_mib"]), fmt_mib(bm["client_peak_mib"]), fmt_mib(bm["worker_peak_mib"]), others(b)))
    rows.append((f"(b) overtile {n}², cold: cluster start {b['start_s']:.1f} s + first predict", f"{cold_s:.2f}",
                 f"{mp / cold_s:.3f}", "(same run)", "", "", ""))
    for r in results["c"]:
        cfg = r["config"]
        rows.append((f"(c) MONAI {cfg['net']}, roi {cfg['roi']} overlap {cfg['overlap']}, sw_batch {cfg['sw_batch_size']}, "
                     f"{'channels_last' if cfg['channels_last'] else 'NCHW'}, {cfg['threads']} threads"
                     + (" ← best" if r is best_c else ""),
                     f"{r['seconds']:.2f}", f"{mp / r['seconds']:.3f}", fmt_mib(r["memory"]["peak_sum_mib"]),
                     fmt_mib(r["memory"]["client_peak_mib"]), "-", others(r)))
    if args.scale_size:
        s = args.scale_size
        bs = results["b"][s]
        rows.append((f"(b) overtile {s}², warm cluster", f"{bs['warm'][0]['seconds']:.2f}",
                     f"{s * s / 1e6 / bs['warm'][0]['seconds']:.3f}", fmt_mib(bs["memory"]["peak_sum_mib"]),
                     fmt_mib(bs["memory"]["client_peak_mib"]), fmt_mib(bs["memory"]["worker_peak_mib"]), others(bs)))
        cs = results["c_scale"]
        rows.append((f"(c) MONAI best config, {s}²", f"{cs['seconds']:.2f}", f"{s * s / 1e6 / cs['seconds']:.3f}",
                     fmt_mib(cs["memory"]["peak_sum_mib"]), fmt_mib(cs["memory"]["client_peak_mib"]), "-", others(cs)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")

    def pct(values: list[float]) -> str:
        return "/".join(f"{100 * v:.0f}%" for v in values)

    print(f"\nothers' CPU share during each timed run: (a) {pct([r['foreign'] for r in a['runs']])}, "
          f"(b) warm {pct([r['foreign'] for r in b['warm']])} cold {pct([b['cold']['foreign']])}, "
          f"(c) {pct([r['foreign'] for r in results['c']])}")
    diag = b.get("diagnostic")
    if diag:
        forward = [t for ts in diag["forward_s"].values() for t in ts]
        drecs = diag["records"]
        compute = sum(r["compute_s"] for r in drecs)
        io = sum(r["read_s"] + r["write_s"] + r["load_s"] for r in drecs)
        busy = compute + io
        print(f"(b) diagnostic run ({diag['seconds']:.2f} s, forward passes timed in the workers): {len(forward)} forward "
              f"passes, median {statistics.median(forward):.3f} s vs (a)'s "
              f"{statistics.median(t for r in a['runs'] for s in r['tile_s'] for t in s):.3f} s; of the workers' "
              f"{busy:.2f} s busy: model {sum(forward):.2f} s ({100 * sum(forward) / busy:.1f}%), rest of compute "
              f"(normalise, crop, stitch, softmax, encode) {compute - sum(forward):.2f} s "
              f"({100 * (compute - sum(forward)) / busy:.1f}%), read+write {io:.2f} s ({100 * io / busy:.1f}%); "
              f"idle {args.workers * diag['seconds'] - busy:.2f} s of {args.workers}×{diag['seconds']:.2f} s")
    print(f"(a) runs MP/s {spread([r['mp_s'] for r in a['runs']])}; per-tile s "
          f"{spread([t for r in a['runs'] for s in r['tile_s'] for t in s])}; warm-up tile s "
          f"{'/'.join(f'{t:.2f}' for t in a['warmup_tile_s'])}; torch threads per worker {a['torch_threads']}")
    print(f"(b) warm runs s {spread([r['seconds'] for r in b['warm']])}; cold predict {b['cold']['seconds']:.2f} s "
          f"after a {b['start_s']:.2f} s cluster start; {b['warm'][0]['blocks']} blocks, torch threads per worker "
          f"{b['torch_threads']}; output check {b['check']}")
    recs = [rec for r in b["warm"] for rec in r["records"]]
    tiles = sum(rec["tiles"] for rec in b["warm"][0]["records"])
    busy = {}
    for rec in b["warm"][0]["records"]:
        busy[rec["worker_pid"]] = busy.get(rec["worker_pid"], 0) + sum(rec[k] for k in ("load_s", "read_s", "compute_s", "write_s"))
    tile_s = statistics.median(t for r in a["runs"] for s in r["tile_s"] for t in s)
    per_block = {k: statistics.mean(rec[k] for rec in recs) for k in ("load_s", "read_s", "compute_s", "write_s")}
    tiles_per_block = tiles / len(b["warm"][0]["records"])
    print(f"(b) per block (mean over {len(recs)}): " + ", ".join(f"{k} {v:.3f}" for k, v in per_block.items())
          + f"; {tiles_per_block:.1f} tiles/block × (a)'s median tile {tile_s:.3f} s = {tiles_per_block * tile_s:.3f} s "
          f"of model; per-worker busy s {[round(v, 2) for v in busy.values()]} of {b['warm'][0]['seconds']:.2f} s wall")
    print(f"(c) best: read {best_c['read_s']:.2f} s, infer {best_c['infer_s']:.2f} s (network {best_c['net_s']:.2f} s), "
          f"write {best_c['write_s']:.2f} s; check {best_c['check']}")
    print(f"pixels through the network per image pixel: (b) {tiles} tiles of {out[2]}² out = "
          f"{tiles * out[2] * out[3] / (n * n):.3f}× (each from a {tile}² input)")
    for r in results["c"]:
        cfg = r["config"]
        print(f"    (c) {cfg['net']} roi {cfg['roi']} overlap {cfg['overlap']}: {r['windows']} windows = "
              f"{r['windows'] * cfg['roi'] ** 2 / (n * n):.3f}×; network {r['net_s']:.2f} s of {r['seconds']:.2f} s = "
              f"{r['windows'] * cfg['roi'] ** 2 / 1e6 / r['net_s']:.2f} MP/s through the net; check {r['check']}")
    print(f"(d) exact per-process high-water marks (ru_maxrss MiB): (a) workers {fmt_mib(a['worker_maxrss_mib'])}, "
          f"(b) workers {fmt_mib(b['worker_maxrss_mib'])} client {fmt_mib(b['client_maxrss_mib'])}, "
          f"(c) {fmt_mib(best_c['client_maxrss_mib'])}; private (anon) peak sums: (a) {fmt_mib(am['peak_sum_anon_mib'])}, "
          f"(b) {fmt_mib(bm['peak_sum_anon_mib'])}, (c) {fmt_mib(best_c['memory']['peak_sum_anon_mib'])}")

    print("others/steal: CPU used by processes outside the measured tree / stolen by the hypervisor, as a share "
          "of all cores over the child's run; above a few per cent the timing is disturbed")
    print("\nratios (targets)")
    print(f"  b/a = {b_mps:.3f} / {a_mps:.3f} = {b_mps / a_mps:.3f}   (target ≥ 0.9: {'met' if b_mps / a_mps >= 0.9 else 'NOT met'})")
    print(f"  b/c = {b_mps:.3f} / {c_mps:.3f} = {b_mps / c_mps:.3f}   (target ≥ 1: {'met' if b_mps / c_mps >= 1 else 'NOT met'})")
    if args.scale_size:
        s = args.scale_size
        big = results["b"][s]["memory"]
        ratio = big["peak_sum_mib"] / bm["peak_sum_mib"]
        wr = max(big["worker_peak_mib"]) / max(bm["worker_peak_mib"])
        print(f"  overtile peak memory {s}² / {n}² = {big['peak_sum_mib']:.0f} / {bm['peak_sum_mib']:.0f} MiB = {ratio:.3f}"
              f"   (target within ±20%: {'met' if abs(ratio - 1) <= 0.2 else 'NOT met'}); largest worker {wr:.3f}")
        cs = results["c_scale"]["memory"]["peak_sum_mib"]
        print(f"  MONAI peak memory {s}² / {n}² = {cs:.0f} / {best_c['memory']['peak_sum_mib']:.0f} MiB = "
              f"{cs / best_c['memory']['peak_sum_mib']:.3f}   (for contrast)")
    print(f"\ntotal benchmark time {results['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
