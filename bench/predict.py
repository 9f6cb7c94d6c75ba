"""Benchmark overtile's Zarr-to-Zarr prediction against the raw model, MONAI and a DIY script, on CPU.

One run measures, on a synthetic uint8 Zarr image (default 4096×4096, and 8192² for the
scale check) and the paper's valid U-Net with 16 base channels (depth 5):

(a) the raw limit: forward passes of the model on tiles already in memory (the tile overtile
    runs, 1212² by default), in *plain* processes (no Dask), in every configuration that
    could be fastest: {NCHW, channels_last} × {one process × all cores' threads, one process
    per core × 1 thread} × {glibc's allocator defaults, the allocator setting of
    ``bench/allocator.py``}, and the same with ``torch.compile`` of the channels_last model
    (compile time reported apart). Output megapixels per second; the limit is the best row;
(b) overtile end to end, Zarr in to Zarr out (:func:`pipeline.jobs.predict.predict`), on an
    already started 2-worker cluster (warm), and from a cold start (cluster start-up, worker
    imports and model loading included); eager (``compile=False``), and again with
    ``compile=True`` at both sizes: the cold run then includes each worker's compile (its
    seconds per worker from the block records: ``compile_s``, and the compiling block's whole
    task time beyond its load, read, compute and write), the warm runs reuse it. From
    the block records (read + compute + write per block, eager against compiled) it computes
    the break-even job length in blocks per task slot (compile seconds / seconds saved per
    block) and the end-to-end MP/s a cold job of 8, 24 or 100 blocks per slot would get,
    against ``pipeline.jobs.inference.COMPILE_BREAK_EVEN_BLOCKS``;
(c) MONAI's ``sliding_window_inference`` at its best, on the same image, read from and written
    to Zarr, with a same-padding U-Net of the same width (MONAI blends outputs the size of the
    window, so a valid net does not fit it): a staged search over memory format × sw_batch_size
    (1, 2, 4), then roi (512 to 2048) × blending mode ('constant', 'gaussian'), then batch again
    and the allocator, each in a plain process of all cores' threads; every row is reported
    and the best is the baseline;
(d) the do-it-yourself baseline, ``dask.array.map_overlap`` with the eager model at its best
    scheduler (``bench/diy.py``, run on the same image);
(e) the peak resident memory of each, sampled over the process and all its children
    (client, scheduler and Dask workers), and overtile's peak again on the larger image,
    which should be about the same (blockwise: memory follows the block, not the image).

Every measurement runs in its own child process (``--child``) so that peaks do not mix. It
prints the tables and the ratios against their targets: overtile / raw limit ≥ 0.9 at 8192²
and ≥ 0.8 at 4096², overtile compiled (warm) / compiled raw limit ≥ 0.9 once a job is long
enough to pay for compiling, overtile / MONAI best ≥ 1.5, overtile / DIY best ≥ 1.8.

Usage::

    .venv/bin/python bench/predict.py --json bench/out/predict.json   # full (~45 min on 2 quiet cores)
    .venv/bin/python bench/predict.py --quick                         # small sizes, few configs (~5–8 min)
    .venv/bin/python bench/predict.py --diy-json bench/out/diy.json   # reuse a DIY result of the same size

MONAI is a bench-only dependency (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
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
from typing import Any, Callable, Self

import numpy as np
import torch

from pipeline import storage
from pipeline.jobs import predict as overtile
from pipeline.jobs.blockwise import dask_client, default_workers
from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import plan_tiles
from pipeline.numerics.unet import UNet, load_model, save_model

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pipeline.clusters import WORKER_ENVIRONMENT as KEEP  # bench/allocator.py: the allocator setting for workers

MiB = 2**20
LAUNCH_ENV_DROP = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
ALLOCATORS = {"keep": KEEP, "default": {}}


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


def run_child(kind: str, spec: dict[str, Any], workdir: Path, wait: float = 0.0, retries: int = 0,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh process, again (up to ``retries`` times) if others disturbed it."""
    for attempt in range(retries + 1):
        result = run_child_once(kind, spec, workdir, wait, env=env)
        result["attempts"] = attempt + 1
        if disturbance(result) <= 0.10:
            break
        if attempt < retries:
            print(f"    others took {100 * disturbance(result):.0f}% of the machine during a timed run; measuring again",
                  flush=True)
    return result


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without allocator and thread-count variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_ENV_DROP)}
    return {**env, **(extra or {})}


def run_child_once(kind: str, spec: dict[str, Any], workdir: Path, wait: float = 0.0, timeout: float = 3600,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; return its result with its memory and the load.

    ``env`` is the child's whole environment (default: this process's); the allocator reads
    its variables at process start, so they must be there, not set later by the child.
    """
    idle_before = wait_quiet(wait) if wait > 0 else None
    tag = f"{kind}-{spec.get('label', '')}-{time.monotonic_ns()}"
    spec_path, result_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps({"kind": kind, **spec}))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(spec_path), "--result", str(result_path)]
    before = cpu_busy()
    proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env)
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

    def __init__(self, pids: list[int], children: bool = False):
        import psutil

        self.procs = [psutil.Process()] + [psutil.Process(p) for p in pids]
        self.children = children  # count this process's children that end within the block (its own cluster)

    def _now(self) -> tuple[float, float, float]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        mine = 0.0
        for p in self.procs:
            c = p.cpu_times()
            mine += c.user + c.system
        if self.children:
            import psutil

            c = self.procs[0].cpu_times()
            mine += c.children_user + c.children_system
            for child in self.procs[0].children(recursive=True):
                try:
                    t = child.cpu_times()
                    mine += t.user + t.system
                except psutil.Error:
                    pass
        return time.perf_counter(), busy, mine

    def __enter__(self) -> Self:
        self.start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._now()
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        self.foreign = max(0.0, others) / (wall * len(os.sched_getaffinity(0)))


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_forward_passes() -> None:
    """Worker: wrap the ``run_tiles`` that overtile's block task calls, to log the time of every
    forward pass.

    For the diagnostic run only (never the timed ones): it splits a block's ``compute_s``
    into the model's share and everything around it (normalise, crop, stitch, softmax).
    """
    if getattr(overtile.run_tiles, "_bench_log", None) is not None:
        return
    inner, log = overtile.run_tiles, []

    def run_tiles(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - t)

    run_tiles._bench_log = log
    overtile.run_tiles = run_tiles


def forward_pass_log() -> list[float]:
    log = getattr(overtile.run_tiles, "_bench_log", [])
    return list(log)


def worker_maxrss() -> float:
    return maxrss_mib()


def torch_threads() -> int:
    return torch.get_num_threads()


# --- (a) the raw limit: plain processes, no Dask --------------------------------------------


def child_raw_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """One inference stream: the model on ``threads`` torch threads, ``repeats × tiles`` passes.

    Loads the same checkpoint as (b), in the given memory format, compiled or not; warms up
    (the first pass of a compiled model is its compile time, reported apart), says it is
    ready, waits for the coordinator's go (so that all streams run at once) and times every
    pass. A forward pass is what overtile's ``run_tiles`` does: tensor from numpy, memory
    format, model, numpy out.
    """
    torch.set_num_threads(spec["threads"])
    if torch.get_num_threads() != spec["threads"]:
        raise RuntimeError(f"asked torch for {spec['threads']} threads, got {torch.get_num_threads()}")
    fmt = torch.channels_last if spec["format"] == "channels_last" else torch.contiguous_format
    model = load_model(spec["model"]).eval().to(memory_format=fmt)
    if spec.get("py_threads", 1) > 1:
        return raw_stream_threads(spec, model, fmt)
    setup = 0.0
    if spec["compiled"]:  # the call itself imports torch._dynamo and inductor (seconds): part of compiling
        t = time.perf_counter()
        model = torch.compile(model)
        setup = time.perf_counter() - t
    x = np.random.default_rng(os.getpid()).standard_normal((spec["batch_size"], 1, spec["tile"], spec["tile"]))
    x = x.astype(np.float32)

    def forward() -> tuple[int, ...]:
        with torch.inference_mode():
            y = model(torch.from_numpy(x).contiguous(memory_format=fmt))
            return tuple(y.float().numpy().shape)

    warmup, shape = warm_up(forward)  # a compiled model's first pass compiles it
    Path(spec["ready"]).touch()
    while not Path(spec["go"]).exists():
        time.sleep(0.005)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    runs = timed_passes(forward, spec)
    return {"runs": runs, "warmup_s": warmup, "compile_s": setup + warmup[0] if spec["compiled"] else None,
            "out_shape": list(shape), **process_usage(cpu0)}


def warm_up(forward: Callable[[], tuple[int, ...]]) -> tuple[list[float], tuple[int, ...]]:
    """Two timed passes before the timed ones (the second settles oneDNN and the heap)."""
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        shape = forward()
        seconds.append(time.perf_counter() - t)
    return seconds, shape


def timed_passes(forward: Callable[[], Any], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """``repeats`` runs of ``tiles`` timed passes each, with each run's wall-clock window."""
    runs = []
    for _ in range(spec["repeats"]):
        start, seconds = time.time(), []
        for _ in range(spec["tiles"]):
            t = time.perf_counter()
            forward()
            seconds.append(time.perf_counter() - t)
        runs.append({"start": start, "end": time.time(), "tile_s": seconds})
    return runs


def process_usage(cpu0: Any, streams: int = 1) -> dict[str, Any]:
    """This process's CPU, system time and page faults since ``cpu0``, per stream, with its
    peak memory and allocator settings."""
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"torch_threads": torch.get_num_threads(), "pid": os.getpid(),
            "timed_cpu_s": ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / streams,
            "timed_sys_s": (cpu1.ru_stime - cpu0.ru_stime) / streams,
            "timed_minflt": (cpu1.ru_minflt - cpu0.ru_minflt) / streams, "maxrss_mib": maxrss_mib(),
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}}


def raw_stream_threads(spec: dict[str, Any], model: torch.nn.Module, fmt: torch.memory_format) -> dict[str, Any]:
    """``py_threads`` streams in this one process, each a Python thread forwarding on
    ``threads`` torch threads, all sharing the one model (eager only): what a Dask worker
    with that many task slots does with overtile's model, the DIY script's threaded
    scheduler too. Returns a list of stream results, each as :func:`child_raw_stream`'s."""
    n, barrier = spec["py_threads"], threading.Barrier(spec["py_threads"] + 1)
    xs = [np.random.default_rng(i).standard_normal((spec["batch_size"], 1, spec["tile"], spec["tile"])).astype(np.float32)
          for i in range(n)]
    streams: list[dict[str, Any]] = [{} for _ in range(n)]

    def forward(x: np.ndarray) -> tuple[int, ...]:
        with torch.inference_mode():
            return tuple(model(torch.from_numpy(x).contiguous(memory_format=fmt)).float().numpy().shape)

    failed: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            warmup, shape = warm_up(lambda: forward(xs[i]))
            barrier.wait()  # warm, then released together by the coordinator's go
            barrier.wait()
            streams[i] = {"runs": timed_passes(lambda: forward(xs[i]), spec), "warmup_s": warmup,
                          "out_shape": list(shape)}
        except BaseException as exc:  # the others and the coordinator must not wait for this one
            failed.append(exc)
            barrier.abort()

    def joined() -> None:
        for t in threads:
            t.join()
        if failed:
            raise RuntimeError(f"a stream thread failed: {failed[0]!r}") from failed[0]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        joined()
    Path(spec["ready"]).touch()
    while not Path(spec["go"]).exists():
        time.sleep(0.005)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    joined()
    common = {"compile_s": None, **process_usage(cpu0, n)}
    return {"streams": [{**common, **st} for st in streams]}


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) one configuration: ``streams`` plain processes started with the allocator ``env``,
    released together once all are warm; MP/s per repeat over the streams' common window."""
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="raw-", dir=spec["workdir"]))
    go = tmp / "go"
    procs = []
    for i in range(spec["streams"]):
        sspec = {**spec, "kind": "raw-stream", "ready": str(tmp / f"ready{i}"), "go": str(go)}
        (tmp / f"{i}.spec.json").write_text(json.dumps(sspec))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(tmp / f"{i}.spec.json"),
               "--result", str(tmp / f"{i}.result.json")]
        procs.append(subprocess.Popen(cmd, env=launch_env(spec["env"])))
    try:
        while not all((tmp / f"ready{i}").exists() for i in range(len(procs))):
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError(f"a raw stream failed: {[p.poll() for p in procs]}")
            time.sleep(0.02)
        t = psutil.cpu_times()
        busy0, wall0 = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0), time.perf_counter()
        go.touch()
        codes = [p.wait() for p in procs]
        t = psutil.cpu_times()
        busy1, wall1 = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0), time.perf_counter()
    finally:
        for p in procs:  # only the streams this function started
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise RuntimeError(f"raw streams exited with {codes}")
    res = []
    for i in range(len(procs)):  # a process of several Python-thread streams gives one entry per stream
        r = json.loads((tmp / f"{i}.result.json").read_text())
        res.extend(r.get("streams", [r]))
    shutil.rmtree(tmp, ignore_errors=True)
    own = sum(r["timed_cpu_s"] for r in res)
    foreign = max(0.0, busy1 - busy0 - own) / ((wall1 - wall0) * len(os.sched_getaffinity(0)))
    out = res[0]["out_shape"]
    runs = []
    for k in range(spec["repeats"]):
        start = min(r["runs"][k]["start"] for r in res)
        wall = max(r["runs"][k]["end"] for r in res) - start
        pixels = sum(len(r["runs"][k]["tile_s"]) for r in res) * out[0] * out[2] * out[3]
        runs.append({"wall_s": wall, "mp_s": pixels / 1e6 / wall, "tile_s": [r["runs"][k]["tile_s"] for r in res],
                     "start_skew_s": max(r["runs"][k]["start"] for r in res) - start, "foreign": foreign})
    return {"runs": runs, "out_shape": out, "warmup_s": [r["warmup_s"] for r in res],
            "compile_s": [r["compile_s"] for r in res] if spec["compiled"] else None,
            "torch_threads": [r["torch_threads"] for r in res], "worker_pids": [r["pid"] for r in res],
            "worker_maxrss_mib": [r["maxrss_mib"] for r in res], "client_maxrss_mib": maxrss_mib(),
            "sys_s_per_tile": statistics.mean(r["timed_sys_s"] for r in res) / (spec["repeats"] * spec["tiles"]),
            "minflt_per_tile": statistics.mean(r["timed_minflt"] for r in res) / (spec["repeats"] * spec["tiles"]),
            "allocator_env": res[0]["allocator_env"]}


def raw_configs(args: argparse.Namespace, cores: int) -> list[dict[str, Any]]:
    """Every configuration of (a): format × layout × allocator, eager, then compiled channels_last.

    The layouts: ``cores`` processes of one thread, one process of ``cores`` torch threads,
    and (eager) one process of ``cores`` one-thread streams in Python threads, sharing the model.
    """
    layouts = [(cores, 1, 1), (1, cores, 1), (1, 1, cores)] if cores > 1 else [(1, 1, 1)]
    rows = []
    for allocator in args.allocators:
        for compiled in ([False, True] if args.compile else [False]):
            for fmt in (["channels_last"] if compiled else ["channels_last", "nchw"]):
                for streams, threads, py_threads in layouts:
                    if compiled and py_threads > 1:
                        continue
                    rows.append({"format": fmt, "compiled": compiled, "streams": streams, "threads": threads,
                                 "py_threads": py_threads, "allocator": allocator})
    if args.quick:  # every code path once
        wanted = [("channels_last", False, 1, 1, "keep"), ("nchw", False, cores, 1, "keep"),
                  ("channels_last", False, 1, 1, "default"), ("channels_last", True, 1, 1, "keep"),
                  ("channels_last", False, 1, cores, "keep")]
        rows = [r for r in rows if (r["format"], r["compiled"], r["threads"], r["py_threads"], r["allocator"]) in wanted]
    return rows


def raw_label(c: dict[str, Any]) -> str:
    fmt = ("compiled " if c["compiled"] else "") + ("channels_last" if c["format"] == "channels_last" else "NCHW")
    if c.get("py_threads", 1) > 1:
        return f"{fmt}, {c['streams']} proc × {c['py_threads']} one-thread streams, {c['allocator']} allocator"
    return f"{fmt}, {c['streams']} proc × {c['threads']} thr, {c['allocator']} allocator"


def raw_mps(r: dict[str, Any]) -> float:
    return statistics.median(run["mp_s"] for run in r["runs"])


# --- (b) compiled: what compiling costs and when it pays ----------------------------------------


def compile_per_worker(records: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds each worker process spent compiling (the sum of its blocks' ``compile_s``)."""
    seconds: dict[str, float] = {}
    for r in records:
        seconds[str(r["worker_pid"])] = seconds.get(str(r["worker_pid"]), 0.0) + r.get("compile_s", 0.0)
    return seconds


def compile_cost_per_worker(records: list[dict[str, Any]]) -> dict[str, float]:
    """What compiling cost each worker process, whatever the timer in the task covers: the
    task time (``finished - started``) of its compiling blocks beyond their load, read, compute
    and write. This includes ``compile_s`` and what runs before its timer starts (the
    ``torch.compile`` call itself imports torch._dynamo and inductor: seconds)."""
    seconds: dict[str, float] = {}
    for r in records:
        if r.get("compile_s"):
            extra = r["finished"] - r["started"] - sum(r.get(k, 0.0) for k in ("load_s", "read_s", "compute_s", "write_s"))
            seconds[str(r["worker_pid"])] = seconds.get(str(r["worker_pid"]), 0.0) + extra
    return seconds


def steady_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The block records of (b)'s warm runs and of its cold run less each worker's first block
    (the one that loads, and with compile=True compiles, the model): blocks at steady state."""
    cold = sorted(result["cold"]["records"], key=lambda r: r["started"])
    first = {}
    for r in cold:
        first.setdefault(r["worker_pid"], r["block"])
    rest = [r for r in cold if first[r["worker_pid"]] != r["block"] and not r.get("compile_s")]
    return rest + [r for run in result["warm"] for r in run["records"]]


def block_seconds(record: dict[str, Any]) -> float:
    """A block's time in its task slot without model loading and compiling: read, compute, write."""
    return record.get("read_s", 0.0) + record["compute_s"] + record["write_s"]


def compile_analysis(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Compile cost, per-block saving and the break-even job length, from (b)'s block records.

    Break-even, in blocks per task slot: the slowest worker's compile seconds over the
    seconds a compiled block saves (medians of read + compute + write per steady block, eager
    against compiled, at the main size); the headline with the whole cost of compiling in the
    task (:func:`compile_cost_per_worker`), and again with the records' ``compile_s`` (which
    leaves out the ``torch.compile`` call itself). Then a linear model of a cold job of N
    blocks per slot, ``fixed + N × block_s``, where ``fixed`` is what the measured cold run
    took beyond its blocks (cluster start, model loading, planning, and for the compiled job
    its compile): the end-to-end MP/s each would get at N = 8, 24, 100, and where they cross.
    """
    from pipeline.jobs.inference import COMPILE_BREAK_EVEN_BLOCKS

    n = args.size
    eager, comp = results["b"][n], results["b_compiled"][n]
    notes = sorted({r["compile_note"] for r in comp["cold"]["records"] if r.get("compile_note")})
    slots = args.workers * max(1, results["cores"] // args.workers)  # dask_client: one slot per core
    out: dict[str, Any] = {"size": n, "block": args.block, "slots": slots, "current_default": COMPILE_BREAK_EVEN_BLOCKS,
                           "compile_notes": notes}
    out["compile_s_per_worker"] = {m: compile_per_worker(results["b_compiled"][m]["cold"]["records"])
                                   for m in results["b_compiled"]}
    out["compile_cost_s_per_worker"] = {m: compile_cost_per_worker(results["b_compiled"][m]["cold"]["records"])
                                        for m in results["b_compiled"]}
    out["warm_compile_s"] = {m: sum(r.get("compile_s", 0.0) for run in results["b_compiled"][m]["warm"]
                                    for r in run["records"]) for m in results["b_compiled"]}
    e_recs, c_recs = steady_records(eager), steady_records(comp)
    eager_s = statistics.median(block_seconds(r) for r in e_recs)
    comp_s = statistics.median(block_seconds(r) for r in c_recs)
    block_mp = statistics.median(r["pixels"] for r in e_recs) / 1e6
    compile_s = max(out["compile_s_per_worker"][n].values())
    compile_cost = max(out["compile_cost_s_per_worker"][n].values(), default=0.0)
    saved = eager_s - comp_s
    out.update(eager_block_s=eager_s, compiled_block_s=comp_s, eager_blocks=len(e_recs), compiled_blocks=len(c_recs),
               block_megapixels=block_mp, compile_s=compile_s, compile_cost_s=compile_cost, saved_per_block_s=saved,
               break_even_blocks_per_slot=compile_cost / saved if saved > 0 else None,
               break_even_from_compile_s=compile_s / saved if saved > 0 else None)

    def fixed(r: dict[str, Any], block_s: float) -> float:  # the cold run beyond its blocks, per slot
        return r["start_s"] + r["cold"]["seconds"] - len(r["cold"]["records"]) / slots * block_s

    fixed_e, fixed_c = fixed(eager, eager_s), fixed(comp, comp_s)
    out.update(fixed_eager_s=fixed_e, fixed_compiled_s=fixed_c,
               break_even_end_to_end=(fixed_c - fixed_e) / saved if saved > 0 else None)
    ns = sorted({8, 24, 100, COMPILE_BREAK_EVEN_BLOCKS})
    out["projection"] = [{"blocks_per_slot": k, "eager_mp_s": slots * k * block_mp / (fixed_e + k * eager_s),
                          "compiled_mp_s": slots * k * block_mp / (fixed_c + k * comp_s)} for k in ns]
    return out


# --- (c) MONAI at its best: a staged search ----------------------------------------------------


class MonaiSearch:
    """Run MONAI configurations once each (a repeated one is answered from the table)."""

    def __init__(self, args: argparse.Namespace, models: dict[str, str], images: dict[int, str], workdir: Path,
                 threads: int):
        self.args, self.models, self.images, self.workdir, self.threads = args, models, images, workdir, threads
        self.rows: list[dict[str, Any]] = []
        self.done: dict[tuple[Any, ...], dict[str, Any]] = {}

    def fits(self, roi: int, bs: int) -> bool:
        """The memory cap: sw_batch × roi² up to ``--monai-max-pixels`` (activations grow with it)."""
        return bs * roi * roi <= self.args.monai_max_pixels

    def run(self, net: str = "overtile-same", bs: int = 1, cl: bool = True, roi: int = 1024, overlap: float = 0.25,
            mode: str = "gaussian", allocator: str = "keep", size: int | None = None, record: bool = True) -> dict[str, Any]:
        size = size or self.args.size
        key = (net, bs, cl, roi, overlap, mode, allocator, size)
        if key in self.done:
            return self.done[key]
        a = self.args
        spec = {"label": f"c{size}-{net}-{bs}-{int(cl)}-{roi}-{mode}-{allocator}", "net": net, "model": self.models["same"],
                "base": a.base, "input": self.images[size], "output": str(self.workdir / f"monai-{size}.zarr"), "roi": roi,
                "overlap": overlap, "mode": mode, "sw_batch_size": bs, "channels_last": cl, "threads": self.threads,
                "block": a.block}
        r = run_child("monai", spec, self.workdir, a.wait_quiet, a.retry_busy, env=launch_env(ALLOCATORS[allocator]))
        r["config"] = {"net": net, "sw_batch_size": bs, "channels_last": cl, "threads": self.threads, "roi": roi,
                       "overlap": overlap, "mode": mode, "allocator": allocator, "size": size}
        print(f"    {net} {size}² roi {roi} overlap {overlap} {mode} sw_batch={bs} "
              f"{'channels_last' if cl else 'NCHW'} {allocator} allocator: {r['seconds']:.1f} s "
              f"({size * size / 1e6 / r['seconds']:.3f} MP/s)", flush=True)
        self.done[key] = r
        if record:
            self.rows.append(r)
        return r

    def best(self, any_overlap: bool = False) -> dict[str, Any]:
        """The fastest overtile-same row on the main image: at MONAI's default overlap (what the
        staged search steers by), or at any overlap tried (the baseline: MONAI at its best)."""
        pool = [r for r in self.rows if r["config"]["net"] == "overtile-same" and r["config"]["size"] == self.args.size
                and (any_overlap or r["config"]["overlap"] == self.args.overlap)]
        return min(pool, key=lambda r: r["seconds"])

    def search(self) -> dict[str, Any]:
        a = self.args
        # 1. memory format × sw_batch_size at the default roi
        for cl in (True, False):
            for bs in a.sw_batch:
                if self.fits(a.roi, bs):
                    self.run(bs=bs, cl=cl, roi=a.roi, overlap=a.overlap)
        cfg = self.best()["config"]
        # 2. roi × blending mode, with the best format and the largest batch that fits up to the best
        for roi in a.monai_rois:
            for mode in ("constant", "gaussian"):
                bs = max([b for b in a.sw_batch if b <= cfg["sw_batch_size"] and self.fits(roi, b)], default=1)
                self.run(bs=bs, cl=cfg["channels_last"], roi=roi, overlap=a.overlap, mode=mode)
        cfg = self.best()["config"]
        # 3. batch again at the best roi and mode, then the other allocator
        for bs in a.sw_batch:
            if self.fits(cfg["roi"], bs):
                self.run(bs=bs, cl=cfg["channels_last"], roi=cfg["roi"], overlap=a.overlap, mode=cfg["mode"])
        cfg = self.best()["config"]
        for allocator in a.allocators:
            self.run(bs=cfg["sw_batch_size"], cl=cfg["channels_last"], roi=cfg["roi"], overlap=a.overlap,
                     mode=cfg["mode"], allocator=allocator)
        return self.best()


# --- (d) the DIY baseline: bench/diy.py --------------------------------------------------------


def run_diy(args: argparse.Namespace, image: str, workdir: Path) -> dict[str, Any] | None:
    """``bench/diy.py`` on the same image (or its earlier result from ``--diy-json``)."""
    if args.no_diy:
        return None
    if args.diy_json:
        result = json.loads(Path(args.diy_json).read_text())
    else:
        out = workdir / "diy.json"
        cmd = [sys.executable, str(HERE / "diy.py"), "--input", image, "--json", str(out)] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, env=launch_env(), check=True, timeout=4 * 3600)
        result = json.loads(out.read_text())
    if int(result["args"]["size"]) != args.size:
        raise SystemExit(f"the DIY result is for {result['args']['size']}², not {args.size}²")
    return result


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
    """(b): cluster start, a cold predict(), then warm predict() runs on the same cluster.

    With ``spec['compile']`` every run asks for ``compile=True``: the cold run's workers
    compile the model in their first block (``compile_s`` in its record; the cluster start
    and the model loading are in the cold run as for eager), the warm runs reuse it.
    """
    def settings(out: str) -> overtile.PredictSettings:
        return overtile.PredictSettings(input=spec["input"], output=out, model=spec["model"], block_size=spec["block"],
                               tile_size=spec["tile"], batch_size=spec["batch_size"], device="cpu", overwrite=True,
                               pyramid=False,  # the same output as MONAI's: full resolution only
                               compile=spec.get("compile", False))  # eager unless asked: never the job-length default

    def run(client: Any, out: str) -> dict[str, Any]:
        shutil.rmtree(out, ignore_errors=True)
        with TreeLoad(list(pids.values()), children=client is None) as load:
            t = time.perf_counter()
            job, summary = overtile.predict(settings(out), client=client)
            seconds = time.perf_counter() - t
        return {"seconds": seconds, "records": summary.records, "tile": job.tile_size,
                "blocks": summary.done, "output": out, "foreign": load.foreign}

    # cold: predict() as a user calls it, with its own cluster (started while it plans, its
    # workers importing the job's module as they start); then warm runs on a cluster of ours
    pids: dict[str, int] = {}
    cold = run(None, spec["output"] + "-cold")
    shutil.rmtree(cold["output"], ignore_errors=True)
    start_s = 0.0  # in the cold run's seconds
    with dask_client(workers=spec["workers"], warm="pipeline.jobs.predict") as client:
        pids = client.run(os.getpid)
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
    OME-Zarr layout, chunks and codec as (b)) so that only the inference differs. The
    blending mode is ``spec['mode']`` ('constant' or 'gaussian').
    """
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(spec["threads"])
    if torch.get_num_threads() != spec["threads"]:
        raise RuntimeError(f"asked torch for {spec['threads']} threads, got {torch.get_num_threads()}")
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
        logits = sliding_window_inference(x, roi, spec["sw_batch_size"], predictor, overlap=spec["overlap"],
                                           mode=spec["mode"])
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
            "output": out, "client_maxrss_mib": maxrss_mib(), "worker_pids": [],
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


CHILDREN = {"raw": child_raw, "raw-stream": child_raw_stream, "overtile": child_overtile, "monai": child_monai}


# --- the benchmark (parent) ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="image edge in pixels (default 4096)")
    p.add_argument("--scale-size", type=int, default=None, help="edge of the larger image for overtile's memory check and the "
                   "8192² ratio (default 2×size; 0 skips it)")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat, a handful of configurations: a smoke test")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--workers", type=int, default=2, help="Dask workers of overtile's cluster (default 2)")
    p.add_argument("--block", type=int, default=2048, help="overtile block edge (default 2048)")
    p.add_argument("--tile", type=int, default=1212, help="overtile tile input edge (default 1212)")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per forward pass in (a) and (b) (default 1)")
    p.add_argument("--raw-tiles", type=int, default=8, help="timed tiles per stream and repeat in (a) (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of (a) and of warm (b) (default 3; medians reported)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows of (a) and (b)")
    p.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS),
                   help="allocator settings for (a) and (c): keep = bench/allocator.py's KEEP, default = glibc's")
    p.add_argument("--roi", type=int, default=1024, help="MONAI roi edge of the search's first stage (default 1024)")
    p.add_argument("--monai-rois", type=int, nargs="+", default=[512, 1024, 1536, 2048],
                   help="MONAI roi edges of the second stage (default 512 1024 1536 2048)")
    p.add_argument("--overlap", type=float, default=0.25, help="MONAI overlap (default 0.25, MONAI's default)")
    p.add_argument("--sw-batch", type=int, nargs="+", default=[1, 2, 4], help="MONAI sw_batch_size values (default 1 2 4)")
    p.add_argument("--monai-max-pixels", type=int, default=4 * 1024 * 1024,
                   help="largest sw_batch × roi² tried (default 4×1024²: memory)")
    p.add_argument("--monai-threads", type=int, default=None, help="torch threads of the MONAI process (default: all cores)")
    p.add_argument("--no-basicunet", action="store_true", help="skip the extra MONAI BasicUNet row")
    p.add_argument("--monai-extra", nargs="*", default=["1152:0.125"], metavar="ROI:OVERLAP",
                   help="extra MONAI rows with other roi and overlap (best sw_batch, format and mode); the fastest row "
                        "of all is the baseline (default 1152:0.125: fewer, larger windows than the default's 25)")
    p.add_argument("--no-diy", action="store_true", help="skip (d), the DIY baseline")
    p.add_argument("--diy-json", type=Path, default=None, help="take (d) from this earlier `bench/diy.py --json` result")
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
        args.size, args.block, args.tile, args.roi, args.monai_rois = min(args.size, 1024), 512, 540, 256, [256, 512]
        args.raw_tiles, args.repeats, args.sw_batch, args.monai_extra = 2, 1, [1], ["320:0.125"]
        args.monai_max_pixels = 512 * 512
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

    cores = default_workers()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="overtile-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"overtile benchmark: {args.size}² uint8, U-Net base {args.base} depth 5, {args.workers} Dask workers, "
          f"{cores} cores, torch {torch.__version__}; work dir {workdir}", flush=True)

    # the tile shape (b) really runs: the tile size snapped and shrunk to cover a block evenly
    valid = UNet(base_channels=args.base, padding="valid")
    plan = plan_tiles(valid, Box.from_shape((min(args.block, args.size),) * 2), args.tile)
    tile = plan.tiles[0].input.shape[0]
    models = make_models(workdir, args.base)
    sizes = [args.size] + ([args.scale_size] if args.scale_size else [])
    images = {}
    for n in sizes:
        t = time.perf_counter()
        images[n] = str(workdir / f"image-{n}.zarr")
        make_image(Path(images[n]), n)
        print(f"  made {n}² image in {time.perf_counter() - t:.1f} s", flush=True)

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "cores": cores, "tile": tile,
                               "torch": torch.__version__, "keep_allocator": KEEP}
    print(f"(a) raw model in plain processes: {args.raw_tiles} tiles of {tile}² per stream × {args.repeats} repeats",
          flush=True)
    results["a"] = []
    for cfg in raw_configs(args, cores):
        spec = {"label": "a-" + raw_label(cfg).replace(" ", ""), **cfg, "model": models["valid"], "tile": tile,
                "tiles": args.raw_tiles, "repeats": args.repeats, "batch_size": args.batch_size,
                "env": ALLOCATORS[cfg["allocator"]], "workdir": str(workdir)}
        r = run_child("raw", spec, workdir, args.wait_quiet, args.retry_busy)
        r["config"] = cfg
        results["a"].append(r)
        comp = f", compile {'/'.join(f'{c:.0f}' for c in r['compile_s'])} s" if r["compile_s"] else ""
        print(f"    {raw_label(cfg)}: {raw_mps(r):.3f} MP/s{comp}", flush=True)
    print("(b) overtile predict()", flush=True)
    results["b"] = {}
    for n in sizes:
        results["b"][n] = run_child("overtile", {
            "label": f"b{n}", "input": images[n], "output": str(workdir / f"overtile-{n}.zarr"), "model": models["valid"],
            "block": args.block, "tile": args.tile, "batch_size": args.batch_size, "workers": args.workers,
            "repeats": args.repeats if n == args.size else 1, "diagnose": n == args.size},
            workdir, args.wait_quiet, args.retry_busy)
    if args.compile:
        print("(b) overtile predict() with torch.compile (compile=True), cold start then warm", flush=True)
        results["b_compiled"] = {}
        for n in sizes:
            results["b_compiled"][n] = r = run_child("overtile", {
                "label": f"b{n}-compiled", "input": images[n], "output": str(workdir / f"overtile-{n}-compiled.zarr"),
                "model": models["valid"], "block": args.block, "tile": args.tile, "batch_size": args.batch_size,
                "workers": args.workers, "repeats": args.repeats if n == args.size else 1, "compile": True},
                workdir, args.wait_quiet, args.retry_busy)
            per_worker, cost = compile_per_worker(r["cold"]["records"]), compile_cost_per_worker(r["cold"]["records"])
            print(f"    {n}²: compile s per worker {'/'.join(f'{v:.1f}' for v in per_worker.values())} (all of "
                  f"compiling: {'/'.join(f'{v:.1f}' for v in cost.values())}); cold "
                  f"{r['start_s'] + r['cold']['seconds']:.1f} s, warm {n * n / 1e6 / r['warm'][0]['seconds']:.3f} MP/s",
                  flush=True)
        results["compile"] = compile_analysis(results, args)
    print("(c) MONAI sliding_window_inference, staged search", flush=True)
    monai = MonaiSearch(args, models, images, workdir, args.monai_threads or cores)
    best_c = monai.search()
    best = best_c["config"]
    if not args.no_basicunet:
        monai.run(net="monai-basicunet", bs=best["sw_batch_size"], cl=best["channels_last"], roi=best["roi"],
                  overlap=args.overlap, mode=best["mode"], allocator=best["allocator"])
    for extra in args.monai_extra:
        roi, overlap = extra.split(":")
        bs = best["sw_batch_size"] if monai.fits(int(roi), best["sw_batch_size"]) else 1
        monai.run(bs=bs, cl=best["channels_last"], roi=int(roi), overlap=float(overlap), mode=best["mode"],
                  allocator=best["allocator"])
    results["c"] = monai.rows
    best_c = monai.best(any_overlap=True)  # the extra overlaps count: MONAI at its best
    best = best_c["config"]
    results["c_best_config"] = {k: best[k] for k in ("sw_batch_size", "channels_last", "mode", "allocator", "roi",
                                                     "overlap")}
    if args.scale_size:
        results["c_scale"] = monai.run(bs=best["sw_batch_size"], cl=best["channels_last"], roi=best["roi"],
                                       overlap=best["overlap"], mode=best["mode"], allocator=best["allocator"],
                                       size=args.scale_size, record=False)
    print("(d) DIY: dask.array.map_overlap + the eager model (bench/diy.py)", flush=True)
    results["d"] = run_diy(args, images[args.size], workdir)
    results["total_s"] = time.perf_counter() - t_all

    report(results, args, tile, best_c)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def report(results: dict[str, Any], args: argparse.Namespace, tile: int, best_c: dict[str, Any]) -> None:
    n = args.size
    mp = n * n / 1e6

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    def others(r: dict[str, Any]) -> str:
        return f"{100 * r['load']['foreign']:.0f}%/{100 * r['load']['steal']:.0f}%"

    def tiles_of(r: dict[str, Any]) -> list[float]:
        return [t for run in r["runs"] for s in run["tile_s"] for t in s]

    # (a): every configuration, and the limit
    raw = results["a"]
    limit = max(raw, key=raw_mps)
    eager = [r for r in raw if not r["config"]["compiled"]]
    limit_eager = max(eager, key=raw_mps) if eager else limit
    # the stream overtile's workers run (eager channels_last, 1 thread), at its best allocator: for the diagnostics
    like_workers = [r for r in eager if r["config"]["format"] == "channels_last" and r["config"]["threads"] == 1] or eager
    ref = max(like_workers, key=raw_mps)
    out = limit["out_shape"]
    rows = [("(a) raw model, plain processes", "out MP/s (median)", "runs MP/s", "tile s (median)", "compile s",
             "sys s/tile", "faults/tile", "per-process MiB", "others/steal")]
    for r in raw:
        mark = " ← limit" if r is limit else (" ← eager limit" if r is limit_eager else "")
        rows.append((raw_label(r["config"]) + mark, f"{raw_mps(r):.3f}", spread([x["mp_s"] for x in r["runs"]]),
                     f"{statistics.median(tiles_of(r)):.3f}",
                     "/".join(f"{c:.0f}" for c in r["compile_s"]) if r["compile_s"] else "-",
                     f"{r['sys_s_per_tile']:.3f}", f"{r['minflt_per_tile'] / 1e3:.0f}k",
                     fmt_mib(r["memory"]["worker_peak_mib"]), others(r)))
    print(f"\n(a) {args.raw_tiles} tiles of {tile}² → {out[2]}² per stream, median of {args.repeats} repeats; "
          f"keep allocator = {KEEP}")
    print_table(rows)

    # the main table
    a_mps = raw_mps(limit)
    b = results["b"][n]
    b_s = statistics.median(r["seconds"] for r in b["warm"])
    b_mps = mp / b_s
    cold_s = b["start_s"] + b["cold"]["seconds"]
    c_s = best_c["seconds"]
    c_mps = mp / c_s
    diy = results.get("d")
    d_best = diy["best"] if diy else None
    rows = [("measure", "seconds", "out MP/s", "peak RSS sum MiB", "client MiB", "per-worker MiB", "others/steal")]
    am = limit["memory"]
    rows.append((f"(a) raw limit: {raw_label(limit['config'])}, {len(limit['runs'])} runs",
                 f"{statistics.median(x['wall_s'] for x in limit['runs']):.2f}", f"{a_mps:.3f}",
                 fmt_mib(am["peak_sum_mib"]), fmt_mib(am["client_peak_mib"]), fmt_mib(am["worker_peak_mib"]), others(limit)))
    if limit_eager is not limit:
        em = limit_eager["memory"]
        rows.append((f"(a) eager limit: {raw_label(limit_eager['config'])}",
                     f"{statistics.median(x['wall_s'] for x in limit_eager['runs']):.2f}", f"{raw_mps(limit_eager):.3f}",
                     fmt_mib(em["peak_sum_mib"]), fmt_mib(em["client_peak_mib"]), fmt_mib(em["worker_peak_mib"]),
                     others(limit_eager)))
    bm = b["memory"]
    rows.append((f"(b) overtile {n}², warm cluster, median of {len(b['warm'])}", f"{b_s:.2f}", f"{b_mps:.3f}",
                 fmt_mib(bm["peak_sum_mib"]), fmt_mib(bm["client_peak_mib"]), fmt_mib(bm["worker_peak_mib"]), others(b)))
    rows.append((f"(b) overtile {n}², cold: predict() starting its own cluster, as a user calls it", f"{cold_s:.2f}",
                 f"{mp / cold_s:.3f}", "(same run)", "", "", ""))
    compiled = results.get("b_compiled", {})

    def compiled_rows(m: int) -> None:
        r = compiled[m]
        w = statistics.median(x["seconds"] for x in r["warm"])
        cold = r["start_s"] + r["cold"]["seconds"]
        per_worker, cost = compile_per_worker(r["cold"]["records"]), compile_cost_per_worker(r["cold"]["records"])
        rm = r["memory"]
        rows.append((f"(b) overtile {m}² compiled, warm cluster, median of {len(r['warm'])}", f"{w:.2f}",
                     f"{m * m / 1e6 / w:.3f}", fmt_mib(rm["peak_sum_mib"]), fmt_mib(rm["client_peak_mib"]),
                     fmt_mib(rm["worker_peak_mib"]), others(r)))
        label = (f"(b) overtile {m}² compiled, cold: predict() with its own cluster (compile "
                 f"{'/'.join(f'{v:.0f}' for v in per_worker.values())} s per worker; the compiling block "
                 f"{'/'.join(f'{v:.0f}' for v in cost.values())} s beyond its work)")
        rows.append((label, f"{cold:.2f}", f"{m * m / 1e6 / cold:.3f}", "(same run)", "", "", ""))

    if n in compiled:
        compiled_rows(n)
    for r in results["c"]:
        cfg = r["config"]
        rows.append((f"(c) MONAI {cfg['net']}, roi {cfg['roi']} overlap {cfg['overlap']} {cfg['mode']}, sw_batch "
                     f"{cfg['sw_batch_size']}, {'channels_last' if cfg['channels_last'] else 'NCHW'}, {cfg['threads']} thr, "
                     f"{cfg['allocator']} alloc" + (" ← best" if r is best_c else ""),
                     f"{r['seconds']:.2f}", f"{mp / r['seconds']:.3f}", fmt_mib(r["memory"]["peak_sum_mib"]),
                     fmt_mib(r["memory"]["client_peak_mib"]), "-", others(r)))
    if d_best:
        rows.append((f"(d) DIY map_overlap, best: {d_best['label']} (of {len(diy['rows'])}, bench/diy.py)",
                     f"{d_best['best_s']:.2f}", f"{d_best['mp_s']:.3f}", "-", "-", "-", "-"))
    if args.scale_size:
        s = args.scale_size
        bs = results["b"][s]
        rows.append((f"(b) overtile {s}², warm cluster", f"{bs['warm'][0]['seconds']:.2f}",
                     f"{s * s / 1e6 / bs['warm'][0]['seconds']:.3f}", fmt_mib(bs["memory"]["peak_sum_mib"]),
                     fmt_mib(bs["memory"]["client_peak_mib"]), fmt_mib(bs["memory"]["worker_peak_mib"]), others(bs)))
        cold_big = bs["start_s"] + bs["cold"]["seconds"]
        rows.append((f"(b) overtile {s}², cold: predict() starting its own cluster, as a user calls it", f"{cold_big:.2f}",
                     f"{s * s / 1e6 / cold_big:.3f}", "(same run)", "", "", ""))
        if s in compiled:
            compiled_rows(s)
        cs = results["c_scale"]
        rows.append((f"(c) MONAI best config, {s}²", f"{cs['seconds']:.2f}", f"{s * s / 1e6 / cs['seconds']:.3f}",
                     fmt_mib(cs["memory"]["peak_sum_mib"]), fmt_mib(cs["memory"]["client_peak_mib"]), "-", others(cs)))
    print()
    print_table(rows)
    if diy:
        print("\n(d) DIY rows: " + "; ".join(f"{r['label']} {r['mp_s']:.3f}" if "error" not in r else f"{r['label']} failed"
                                           for r in diy["rows"]) + " MP/s")

    def pct(values: list[float]) -> str:
        return "/".join(f"{100 * v:.0f}%" for v in values)

    print(f"\nothers' CPU share during each timed run: (a) limit {pct([x['foreign'] for x in limit['runs']])}, "
          f"(b) warm {pct([r['foreign'] for r in b['warm']])} cold {pct([b['cold']['foreign']])}, "
          f"(c) {pct([r['foreign'] for r in results['c']])}")
    diag = b.get("diagnostic")
    tile_s = statistics.median(tiles_of(ref))
    if diag:
        forward = [t for ts in diag["forward_s"].values() for t in ts]
        drecs = diag["records"]
        compute = sum(r["compute_s"] for r in drecs)
        io = sum(r["read_s"] + r["write_s"] + r["load_s"] for r in drecs)
        busy = compute + io
        print(f"(b) diagnostic run ({diag['seconds']:.2f} s, forward passes timed in the workers): {len(forward)} forward "
              f"passes, median {statistics.median(forward):.3f} s vs (a) {raw_label(ref['config'])}'s {tile_s:.3f} s; of the "
              f"workers' {busy:.2f} s busy: model {sum(forward):.2f} s ({100 * sum(forward) / busy:.1f}%), rest of compute "
              f"(normalise, crop, stitch, softmax, encode) {compute - sum(forward):.2f} s "
              f"({100 * (compute - sum(forward)) / busy:.1f}%), read+write {io:.2f} s ({100 * io / busy:.1f}%); "
              f"idle {args.workers * diag['seconds'] - busy:.2f} s of {args.workers}×{diag['seconds']:.2f} s")
    print(f"(a) limit: runs MP/s {spread([x['mp_s'] for x in limit['runs']])}; per-tile s {spread(tiles_of(limit))}; "
          f"warm-up s {limit['warmup_s']}; torch threads per process {limit['torch_threads']}; allocator env "
          f"{limit['allocator_env'] or 'glibc defaults'}")
    print(f"(b) warm runs s {spread([r['seconds'] for r in b['warm']])}; cold predict {b['cold']['seconds']:.2f} s "
          f"after a {b['start_s']:.2f} s cluster start; {b['warm'][0]['blocks']} blocks, torch threads per worker "
          f"{b['torch_threads']}; output check {b['check']}")
    recs = [rec for r in b["warm"] for rec in r["records"]]
    tiles = sum(rec["tiles"] for rec in b["warm"][0]["records"])
    busy_w: dict[Any, float] = {}
    for rec in b["warm"][0]["records"]:
        busy_w[rec["worker_pid"]] = busy_w.get(rec["worker_pid"], 0) + sum(rec[k] for k in ("load_s", "read_s", "compute_s", "write_s"))
    per_block = {k: statistics.mean(rec[k] for rec in recs) for k in ("load_s", "read_s", "compute_s", "write_s")}
    tiles_per_block = tiles / len(b["warm"][0]["records"])
    print(f"(b) per block (mean over {len(recs)}): " + ", ".join(f"{k} {v:.3f}" for k, v in per_block.items())
          + f"; {tiles_per_block:.1f} tiles/block × (a)'s median tile {tile_s:.3f} s = {tiles_per_block * tile_s:.3f} s "
          f"of model; per-worker busy s {[round(v, 2) for v in busy_w.values()]} of {b['warm'][0]['seconds']:.2f} s wall")
    print(f"(c) best: read {best_c['read_s']:.2f} s, infer {best_c['infer_s']:.2f} s (network {best_c['net_s']:.2f} s), "
          f"write {best_c['write_s']:.2f} s; check {best_c['check']}")
    print(f"pixels through the network per image pixel: (b) {tiles} tiles of {out[2]}² out = "
          f"{tiles * out[2] * out[3] / (n * n):.3f}× (each from a {tile}² input)")
    for r in results["c"]:
        cfg = r["config"]
        print(f"    (c) {cfg['net']} roi {cfg['roi']} overlap {cfg['overlap']} {cfg['mode']}: {r['windows']} windows = "
              f"{r['windows'] * cfg['roi'] ** 2 / (n * n):.3f}×; network {r['net_s']:.2f} s of {r['seconds']:.2f} s = "
              f"{r['windows'] * cfg['roi'] ** 2 / 1e6 / r['net_s']:.2f} MP/s through the net; check {r['check']}")
    print(f"(e) exact per-process high-water marks (ru_maxrss MiB): (a) limit {fmt_mib(limit['worker_maxrss_mib'])}, "
          f"(b) workers {fmt_mib(b['worker_maxrss_mib'])} client {fmt_mib(b['client_maxrss_mib'])}, "
          f"(c) {fmt_mib(best_c['client_maxrss_mib'])}; private (anon) peak sums: (a) {fmt_mib(am['peak_sum_anon_mib'])}, "
          f"(b) {fmt_mib(bm['peak_sum_anon_mib'])}, (c) {fmt_mib(best_c['memory']['peak_sum_anon_mib'])}")

    print("others/steal: CPU used by processes outside the measured tree / stolen by the hypervisor, as a share "
          "of all cores over the child's run; above a few per cent the timing is disturbed")

    def ratio(name: str, num: float, den: float, target: float | None) -> None:
        verdict = "" if target is None else f"   (target ≥ {target}: {'met' if num / den >= target else 'NOT met'})"
        print(f"  {name} = {num:.3f} / {den:.3f} = {num / den:.3f}{verdict}")

    print("\nratios (targets)")
    # As a user runs it: cluster start included (cold), against the eager raw limit, since
    # overtile runs the eager model unless a job is long enough to compile (below).
    eager_mps = raw_mps(limit_eager)
    cold_mps = mp / cold_s
    ratio(f"overtile {n}², cluster start included / eager raw limit", cold_mps, eager_mps, 0.8)
    if args.scale_size:
        s = args.scale_size
        bs_ = results["b"][s]
        s_mps = s * s / 1e6 / bs_["warm"][0]["seconds"]
        s_cold_mps = s * s / 1e6 / (bs_["start_s"] + bs_["cold"]["seconds"])
        ratio(f"overtile {s}², cluster start included / eager raw limit", s_cold_mps, eager_mps, 0.9)
    ratio(f"overtile {n}² warm / eager raw limit (for information)", b_mps, eager_mps, None)
    if limit_eager is not limit:
        ratio(f"overtile {n}² warm / raw limit, compiled (for information)", b_mps, a_mps, None)
    raw_compiled = [r for r in raw if r["config"]["compiled"]]
    if compiled and raw_compiled:
        limit_c = max(raw_compiled, key=raw_mps)
        for m in compiled:
            w = statistics.median(x["seconds"] for x in compiled[m]["warm"])
            ratio(f"overtile {m}² compiled (warm) / compiled raw limit ({raw_label(limit_c['config'])}), once a job is "
                  f"long enough to pay for compiling", m * m / 1e6 / w, raw_mps(limit_c), 0.9)
    ratio(f"overtile {n}² warm / MONAI best", b_mps, c_mps, 1.5)
    ratio(f"overtile {n}², cluster start included / MONAI best", cold_mps, c_mps, None)
    if args.scale_size:
        cs_mps = s * s / 1e6 / results["c_scale"]["seconds"]
        ratio(f"overtile {s}² warm / MONAI best config at {s}²", s_mps, cs_mps, None)
    if d_best:
        ratio(f"overtile {n}² warm / DIY best", b_mps, d_best["mp_s"], 1.8)
        ratio(f"overtile {n}², cluster start included / DIY best", cold_mps, d_best["mp_s"], None)
    if args.scale_size:
        big = results["b"][s]["memory"]
        mem = big["peak_sum_mib"] / bm["peak_sum_mib"]
        wr = max(big["worker_peak_mib"]) / max(bm["worker_peak_mib"])
        print(f"  overtile peak memory {s}² / {n}² = {big['peak_sum_mib']:.0f} / {bm['peak_sum_mib']:.0f} MiB = {mem:.3f}"
              f"   (target within ±20%: {'met' if abs(mem - 1) <= 0.2 else 'NOT met'}); largest worker {wr:.3f}")
        cs = results["c_scale"]["memory"]["peak_sum_mib"]
        print(f"  MONAI peak memory {s}² / {n}² = {cs:.0f} / {best_c['memory']['peak_sum_mib']:.0f} MiB = "
              f"{cs / best_c['memory']['peak_sum_mib']:.3f}   (for contrast)")
    if "compile" in results:
        report_compile(results["compile"])
    print(f"\ntotal benchmark time {results['total_s']:.0f} s")


def report_compile(c: dict[str, Any]) -> None:
    """When compiling pays: compile cost, per-block saving, break-even, projected throughput."""
    print(f"\ntorch.compile in overtile (block {c['block']}², {c['slots']} task slots, from (b)'s block records at "
          f"{c['size']}²)")
    for note in c["compile_notes"]:
        print(f"  NOTE: {note}")
    for m, per_worker in c["compile_s_per_worker"].items():
        cost = c["compile_cost_s_per_worker"][m]
        print(f"  compile s per worker at {m}² (cold run), the records' compile_s: "
              f"{', '.join(f'pid {p}: {v:.1f}' for p, v in per_worker.items())}; the compiling block's task time beyond "
              f"its load/read/compute/write (torch.compile's setup included): "
              f"{', '.join(f'pid {p}: {v:.1f}' for p, v in cost.items())}; compile_s in the warm runs "
              f"{c['warm_compile_s'][m]:.1f} s (reused)")
    print(f"  steady block (read + compute + write, median): eager {c['eager_block_s']:.3f} s of {c['eager_blocks']} "
          f"blocks, compiled {c['compiled_block_s']:.3f} s of {c['compiled_blocks']} blocks: saves "
          f"{c['saved_per_block_s']:.3f} s ({100 * c['saved_per_block_s'] / c['eager_block_s']:.1f}%) per block of "
          f"{c['block_megapixels']:.2f} MP")
    be, be1, be2 = c["break_even_blocks_per_slot"], c["break_even_from_compile_s"], c["break_even_end_to_end"]

    def blocks(x: float | None) -> str:
        return "never (no saving)" if x is None else f"{x:.1f}"

    print(f"  break-even = compile cost (slowest worker) / saving per block = {c['compile_cost_s']:.1f} / "
          f"{c['saved_per_block_s']:.3f} = {blocks(be)} blocks per task slot (with the records' compile_s "
          f"{c['compile_s']:.1f} s: {blocks(be1)}); from the cold runs' fixed costs (eager {c['fixed_eager_s']:.1f} s, "
          f"compiled {c['fixed_compiled_s']:.1f} s): {blocks(be2)}; pipeline.jobs.inference.COMPILE_BREAK_EVEN_BLOCKS = "
          f"{c['current_default']}")
    rows = [("blocks per slot", "eager MP/s", "compiled MP/s", "compiled / eager")]
    for row in c["projection"]:
        rows.append((str(row["blocks_per_slot"]), f"{row['eager_mp_s']:.3f}", f"{row['compiled_mp_s']:.3f}",
                     f"{row['compiled_mp_s'] / row['eager_mp_s']:.3f}"))
    print(f"  end to end, cold start, a job of N blocks per slot ({c['slots']} × N blocks): fixed + N × block s")
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
