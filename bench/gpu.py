"""Benchmark overtile end to end against the raw model on the same GPU.

One run, on a synthetic uint8 Zarr image (default 8192²) and overtile's valid U-Net at the
paper's width (64 base channels) and at 16, each in float32 with TensorFloat-32 convolutions
(PyTorch's cuDNN default, overtile's ``--autocast none``), bf16 autocast, and on request
strict float32 (``--precisions fp32``, overtile's ``--autocast fp32``):

(a) the raw limit: forward passes of the model on the tile overtile runs (1212² input),
    the input already on the GPU and the output left there, in every configuration that
    could be fastest: {NCHW, channels_last} × batch {1, 4} × cudnn.benchmark {off, on};
    output megapixels per second after warm-up, timed to a synchronisation. Beside the best
    row, the same configuration from host memory to host memory through overtile's own
    forward (:func:`pipeline.jobs.inference.run_tiles`: pinned uploads one batch ahead);
(b) overtile end to end, Zarr in to Zarr out (:func:`pipeline.jobs.predict.predict`, float32
    probabilities, no pyramid: the same output as (a)), on a started cluster of 1, 4 and 8
    GPU workers sharing the one GPU (each worker: 2 task slots, resource GPU=1, so one block
    computes while the next is read), each block stitched and encoded on the GPU
    (overtile's default there) and on the host (``--stitch``), second run of each (the first
    loads the model); GPU
    utilisation sampled through NVML every 50 ms while it runs; the ratio to (a)'s best;
(c) the same end to end from a cold start for the best configuration (cluster start,
    worker imports, CUDA initialisation and model loading included), and with labels out;
(e) the host side of one block with an infinitely fast GPU (the tiles' logits handed back at
    once), on one core, in milliseconds per step: cutting and stitching the tiles, softmax,
    labels (``np.argmax`` against overtile's ``class_labels``), and writing each output with
    overtile's codec, after normalising the uint8 block; and what is left on the host when
    the block stays on the GPU (``--device-stitch``, overtile's default there): handing the
    input over as stored (pinning), taking the stored form back, writing it. It bounds what a GPU worker can do per core
    whatever the GPU, and runs anywhere: ``--host-only``;
(d) a correctness check: overtile's tiled GPU output against one forward pass over the
    whole (mirror-padded) image on the same GPU, float32 and bf16, max |difference| of the
    probabilities and the share of pixels whose argmax differs.

Results are written to ``--json`` after every step (a run cut short keeps what it measured);
steps past ``--deadline`` seconds are skipped and listed.

Usage (on a machine with a CUDA GPU)::

    python bench/gpu.py --json bench/out/gpu.json
    python bench/gpu.py --size 2048 --workers 1 --bases 16 --device cpu   # the code paths, anywhere
    python bench/gpu.py --host-only                                      # (e) alone, on any machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from pipeline.jobs import predict as overtile  # noqa: E402
from pipeline.jobs.blockwise import dask_client  # noqa: E402
from pipeline.jobs.inference import AUTOCAST, run_tiles  # noqa: E402
from pipeline.numerics.geometry import Box  # noqa: E402
from pipeline.numerics.tiling import class_labels, plan_tiles, predict_region, predict_whole, softmax  # noqa: E402
from pipeline.storage.images import OUTPUT_CODEC  # noqa: E402
from pipeline.numerics.unet import Normalization, UNet, load_model, save_model  # noqa: E402
from predict import make_image  # noqa: E402  (bench/predict.py: the same synthetic image)

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
OUTPUTS = {"probabilities": {}, "uint8": {"dtype": "uint8"}, "labels": {"output_kind": "labels"}}  # what is written


class Utilisation(threading.Thread):
    """Sample the GPU's utilisation (% of time a kernel ran) and memory in use through NVML."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.samples, self.memory = interval, [], []
        self._stop_event = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]  # NVML counts every GPU
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)
        except Exception:  # noqa: BLE001 - no NVML (a CPU run): no figures
            self._nvml = None

    def run(self) -> None:
        while self._nvml is not None and not self._stop_event.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self.memory.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30)
            self._stop_event.wait(self.interval)

    def __enter__(self) -> Utilisation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join()

    def figures(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_mem_gib": None}
        return {"gpu_util_pct": round(statistics.mean(self.samples), 1), "gpu_mem_gib": round(max(self.memory), 2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], Any], device: torch.device, min_s: float, min_n: int = 5, max_n: int = 200) -> tuple[int, float]:
    """Passes of ``step`` until ``min_s`` seconds and ``min_n`` passes; (passes, seconds)."""
    sync(device)
    start, n = time.perf_counter(), 0
    while n < min_n or (time.perf_counter() - start < min_s and n < max_n):
        step()
        n += 1
    sync(device)
    return n, time.perf_counter() - start


def raw_row(model_path: str, device: torch.device, fmt: str, batch: int, precision: str, benchmark: bool,
            tile: int, min_s: float) -> dict[str, Any]:
    """(a) one configuration: passes on a tile already on the device, output left there."""
    torch.backends.cudnn.benchmark = benchmark
    tf32(precision)
    model = load_model(model_path).to(device).to(memory_format=FORMATS[fmt])
    dtype = AUTOCAST[precision]
    x = torch.randn(batch, 1, tile, tile, device=device).contiguous(memory_format=FORMATS[fmt])
    shape: list[int] = []

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            shape[:] = model(x).shape

    t = time.perf_counter()
    for _ in range(3):  # cuDNN's algorithm search (benchmark on) and the allocator settle here
        forward()
    sync(device)
    warm = time.perf_counter() - t
    n, seconds = timed(forward, device, min_s)
    pixels = n * batch * shape[2] * shape[3]
    torch.backends.cudnn.benchmark = False
    return {"format": fmt, "batch": batch, "precision": precision, "cudnn_benchmark": benchmark, "passes": n,
            "seconds": seconds, "warmup_s": warm, "mp_s": pixels / 1e6 / seconds, "out_tile": shape[2]}


def tf32(precision: str) -> None:
    """TensorFloat-32 convolutions unless strict ``fp32``, as overtile's workers set them."""
    torch.backends.cudnn.allow_tf32 = precision != "fp32"


def host_row(model_path: str, device: torch.device, best: dict[str, Any], tile: int, min_s: float) -> dict[str, Any]:
    """(a) the best configuration again, from numpy batches to numpy logits through overtile's
    own forward (pinned uploads one batch ahead of the compute, downloads into pinned memory)."""
    model = load_model(model_path).to(device).to(memory_format=FORMATS[best["format"]])
    batches = [np.random.default_rng(i).standard_normal((best["batch"], 1, tile, tile)).astype(np.float32) for i in range(8)]
    dtype = AUTOCAST[best["precision"]]
    tf32(best["precision"])
    run_tiles(model, batches[:2], dtype)
    n, seconds = timed(lambda: run_tiles(model, batches, dtype), device, min_s, min_n=2)
    pixels = n * len(batches) * best["batch"] * best["out_tile"] ** 2
    return {**{k: best[k] for k in ("format", "batch", "precision")}, "cudnn_benchmark": False, "passes": n * len(batches),
            "seconds": seconds, "mp_s": pixels / 1e6 / seconds}


def settings(args: argparse.Namespace, image: str, model: str, out: str, precision: str, cl: bool,
             **extra: Any) -> overtile.PredictSettings:
    fields = dict(input=image, output=out, model=model, block_size=args.block, tile_size=args.tile,
                  batch_size=args.batch_size, device=args.device, autocast=precision, channels_last=cl,
                  overwrite=True, pyramid=False, compile=False)
    return overtile.PredictSettings(**{**fields, **extra})


def end_to_end(client: Any, s: overtile.PredictSettings) -> dict[str, Any]:
    """(b)/(c): one predict(); seconds, MP/s, GPU utilisation, and the block records' sums."""
    shutil.rmtree(s.output, ignore_errors=True)
    with Utilisation() as use:
        t = time.perf_counter()
        job, summary = overtile.predict(s, client=client)
        seconds = time.perf_counter() - t
    records = summary.records
    pixels = sum(r["pixels"] for r in records)
    phase = {f"{k}_s": round(sum(r.get(f"{k}_s", 0.0) for r in records), 2) for k in ("load", "read", "compute", "write")}
    return {"seconds": seconds, "mp_s": pixels / 1e6 / seconds, "blocks": summary.done, **use.figures(), **phase,
            "workers": len({r["worker_pid"] for r in records})}


def check(client: Any, args: argparse.Namespace, image: str, model: str, out: str, precision: str) -> dict[str, Any]:
    """(d): the tiled output on the GPU against one forward pass over the whole image there."""
    import zarr

    s = settings(args, image, model, out, precision, True, block_size=512)
    shutil.rmtree(out, ignore_errors=True)
    overtile.predict(s, client=client)
    tiled = zarr.open_group(out, mode="r")["0"][...]
    net = load_model(model).to(torch.device(args.device))
    data = zarr.open_array(image, mode="r")[...]
    tf32(precision)
    whole = softmax(predict_whole(net, net.normalization(data[None]), autocast=AUTOCAST[precision]))
    return {"precision": precision, "shape": list(data.shape), "block": 512, "max_abs_diff": float(np.abs(tiled - whole).max()),
            "argmax_differs": float((tiled.argmax(0) != whole.argmax(0)).mean())}


def host_side(args: argparse.Namespace, workdir: Path, repeats: int = 7) -> dict[str, Any]:
    """(e): one block's work around the forward passes, medians in ms over ``repeats``."""
    import zarr

    from pipeline.jobs.predict import encode_output

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as one task slot of a worker
    net = UNet(base_channels=16).eval()  # the geometry only: every base has the same
    block = Box.from_bounds((args.block,) * 2, (2 * args.block,) * 2)
    plan = plan_tiles(net, block, args.tile)
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (1, *plan.read.shape), dtype=np.uint8)  # the block as read
    normalization = Normalization(0.5, 0.2)
    image = normalization(stored)
    ready: dict[tuple[int, ...], np.ndarray] = {}

    def instant(_: Any, batches: list[np.ndarray], autocast: Any = None) -> list[np.ndarray]:
        out = []
        for b in batches:
            if b.shape not in ready:
                ready[b.shape] = rng.standard_normal((b.shape[0], 2, *(n - 2 * net.geometry.margin for n in b.shape[2:])),
                                                     dtype=np.float32)
            out.append(ready[b.shape].copy())  # as a download from the GPU would be: a fresh array
        return out

    pinned = torch.cuda.is_available()

    def hand_over(block_input: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(block_input)
        return host.pin_memory() if pinned else host.clone()

    shape, chunks = (2, 3 * args.block, 3 * args.block), (2, args.block, args.block)
    stores = {k: zarr.create_array(store=str(workdir / f"host-{k}.zarr"), shape=(c, *shape[1:]), chunks=(c, *chunks[1:]),
                                   dtype=d, compressors=[OUTPUT_CODEC], overwrite=True)
              for k, c, d in (("probabilities", 2, "float32"), ("labels", 1, "uint8"))}
    where = (slice(None), *block.slices())
    steps: dict[str, Callable[[np.ndarray], Any]] = {
        "stitch": lambda _: predict_region(net, plan, image, args.batch_size, runner=instant),
        "softmax (float32 probabilities)": lambda lg: encode_output(lg, "probabilities", "float32"),
        "labels, np.argmax(axis=0)": lambda lg: lg.argmax(axis=0).astype(np.uint8),
        "labels, class_labels (overtile's)": class_labels,
        "write probabilities": lambda lg: stores["probabilities"].__setitem__(where, lg),
        "write labels": lambda _: stores["labels"].__setitem__(where, labels),
        "normalise the block (uint8 to float32)": lambda _: normalization(stored),
        # with --device-stitch (the default on CUDA) the host only hands the block over and takes the result back:
        f"hand the input over as stored, uint8 ({'pinning' if pinned else 'a copy, as pinning does'})":
            lambda _: hand_over(stored),
        "hand a float32 input over (a float image)": lambda _: hand_over(image),
        "take float32 probabilities back (a copy)": lambda lg: lg.copy(),
        "take labels back (a copy)": lambda _: labels.copy(),
    }
    logits = steps["stitch"](None)
    labels = class_labels(logits)[None]
    ms = {}
    for name, step in steps.items():
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            step(logits)
            seconds.append(time.perf_counter() - t)
        ms[name] = round(1000 * statistics.median(seconds), 1)
    torch.set_num_threads(threads)
    mp = block.size / 1e6
    over = next(v for k, v in ms.items() if k.startswith("hand the input over"))
    normalise = ms["normalise the block (uint8 to float32)"]
    per_block = {k: round(v, 1) for k, v in {  # ms of one core per block, reading aside: host, and --device-stitch
        "host probabilities": normalise + ms["stitch"] + ms["softmax (float32 probabilities)"] + ms["write probabilities"],
        "host labels": normalise + ms["stitch"] + ms["labels, class_labels (overtile's)"] + ms["write labels"],
        "device-stitch probabilities": over + ms["take float32 probabilities back (a copy)"] + ms["write probabilities"],
        "device-stitch labels": over + ms["take labels back (a copy)"] + ms["write labels"],
    }.items()}
    return {"block": args.block, "tiles": len(plan.tiles), "ms": ms, "labels_speedup": ms["labels, np.argmax(axis=0)"] / max(
        ms["labels, class_labels (overtile's)"], 1e-9), "ms_per_block": per_block,
        "mp_s_per_core": {k: round(mp / v * 1000, 1) for k, v in per_block.items()}}


class Run:
    """The results so far, written to ``--json`` after every step; steps past the deadline skipped."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.perf_counter()
        self.result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "raw": [], "host": [],
                                       "end_to_end": [], "checks": [], "host_side": [], "skipped": [], "errors": []}

    def step(self, name: str, fn: Callable[[], Any], into: str | None = None) -> Any:
        if time.perf_counter() - self.start > self.args.deadline:
            self.result["skipped"].append(name)
            return None
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one failed configuration must not lose the others
            self.result["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"  {name}: FAILED {type(exc).__name__}: {exc}"[:500], flush=True)
            value = None
        if value is not None and into:  # the stored record is returned: what callers add to it is saved
            value = {"step": name, **value, "step_s": round(time.perf_counter() - t, 1)}
            self.result[into].append(value)
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items()}
            print(f"  {name}: {shown}", flush=True)
        self.save()
        return value

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        if self.args.json:
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(self.result, indent=1))


def raw_limits(run: Run, models: dict[int, str], device: torch.device) -> dict[tuple[int, str], dict[str, Any]]:
    """(a) for every net and precision: every configuration's row, the best one (the limit)
    and the host-to-host row at its configuration."""
    args, best = run.args, {}
    for base in args.bases:
        for precision in args.precisions:
            rows = [run.step(f"raw {base} {precision} {fmt} b{batch}{' cudnn.benchmark' if on else ''}",
                             lambda: {"base": base, **raw_row(models[base], device, fmt, batch, precision, on,
                                                              args.tile, args.min_seconds)}, "raw")
                    for fmt in FORMATS for batch in (1, 4) for on in (False, True)]
            rows = [r for r in rows if r]
            if rows:
                best[base, precision] = max(rows, key=lambda r: r["mp_s"])
                run.step(f"host {base} {precision}", lambda: {"base": base, **host_row(
                    models[base], device, best[base, precision], args.tile, args.min_seconds)}, "host")
    run.result["raw_best"] = [{"base": b, "precision": p, **r} for (b, p), r in best.items()]
    return best


def warm_runs(run: Run, client: Any, n: int, base: int, precision: str, raw: dict[str, Any],
              base_settings: overtile.PredictSettings) -> None:
    """(b) each output kind and place of stitching on a started cluster of ``n`` workers; the
    first run of the net loads the model and warms cuDNN on every worker and is kept apart
    (``warm`` false)."""
    cases = [(kind, where) for kind in run.args.outputs for where in run.args.stitch]
    for k, (kind, where) in enumerate(cases):
        s = base_settings.model_copy(update={**OUTPUTS[kind], "device_stitch": where == "device"})
        for i in range(1 if k else 0, 2):
            r = run.step(f"end to end {base} {precision} {kind} stitched on the {where} workers {n}"
                         f"{'' if i else ' (first)'}",
                         lambda: {"base": base, "precision": precision, "workers_asked": n, "output": kind,
                                  "stitch": where, "warm": i == 1, **end_to_end(client, s)}, "end_to_end")
            if r and i == 1:
                r["ratio_to_raw"] = r["mp_s"] / raw["mp_s"]
                print(f"    → {r['ratio_to_raw']:.2f}× the raw limit", flush=True)
    run.save()


def cold_runs(run: Run, best: dict[tuple[int, str], dict[str, Any]],
              settings_for: Callable[..., overtile.PredictSettings]) -> None:
    """(c) predict() as a user calls it (its own cluster) at each net's best warm worker count;
    labels too for the last net and precision."""
    args = run.args
    warm = [r for r in run.result["end_to_end"] if r["warm"] and r["output"] == "probabilities"]
    for (base, precision), raw in best.items():
        mine = [r for r in warm if r["base"] == base and r["precision"] == precision]
        if not mine:
            continue
        n = max(mine, key=lambda r: r["mp_s"])["workers_asked"]
        last = (base, precision) == (args.bases[-1], args.precisions[-1])
        for kind in ("probabilities", "labels") if last else ("probabilities",):
            s = settings_for(base, precision, "cold.zarr", workers=n or None, **OUTPUTS[kind])
            r = run.step(f"cold {base} {precision} workers {n} {kind}",
                         lambda: {"base": base, "precision": precision, "workers_asked": n, "warm": False,
                                  "cold": True, "output": kind, "stitch": "default", **end_to_end(None, s)}, "end_to_end")
            if r:
                r["ratio_to_raw"] = r["mp_s"] / raw["mp_s"]
    run.save()


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192, help="image edge in pixels (default 8192)")
    p.add_argument("--bases", type=int, nargs="+", default=[64, 16], help="U-Net base channels (default 64 16)")
    p.add_argument("--precisions", nargs="+", default=["none", "bf16"], choices=list(AUTOCAST),
                   help="precision of each run (overtile's --autocast): none (float32, TF32 convolutions) and bf16 by "
                        "default; fp32 is strict float32")
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip (c), the cold runs")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8],
                   help="GPU workers of (b)'s clusters (default 1 4 8; 0: overtile's default)")
    p.add_argument("--block", type=int, default=2048, help="overtile block edge (default 2048: 2×2 tiles, one batch of 4)")
    p.add_argument("--tile", type=int, default=1212, help="tile input edge, (a) and (b) (default 1212)")
    p.add_argument("--batch-size", type=int, default=4, help="overtile's tiles per forward pass (default 4)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per raw row (default 1)")
    p.add_argument("--outputs", nargs="+", default=["probabilities"], choices=list(OUTPUTS),
                   help="(b)'s outputs: float32 probabilities (default; (a)'s output), uint8 probabilities, labels")
    p.add_argument("--stitch", nargs="+", default=["device", "host"], choices=["device", "host"],
                   help="(b): where blocks are stitched and encoded (overtile's --device-stitch; default both)")
    p.add_argument("--check-size", type=int, default=1500, help="edge of (d)'s image (default 1500; 0 skips (d))")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda; cpu only to try the code paths")
    p.add_argument("--deadline", type=float, default=420, help="skip steps that would start after this many seconds")
    p.add_argument("--workdir", type=Path, default=None, help="images and outputs (default: a temporary directory)")
    p.add_argument("--host-only", action="store_true", help="only (e), the host side of a block (any machine)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (after every step)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.host_only else args.device)
    run = Run(args)
    run.result["environment"] = environment(device)
    print(json.dumps(run.result["environment"]), flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="overtile-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run.step("host side of a block", lambda: host_side(args, workdir), "host_side")
    if args.host_only:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    image, small = str(workdir / "image.zarr"), str(workdir / "small.zarr")
    t = time.perf_counter()
    make_image(Path(image), args.size)
    if args.check_size:
        make_image(Path(small), args.check_size, seed=1)
    run.result["image_s"] = round(time.perf_counter() - t, 1)
    models = {}
    for base in args.bases:
        torch.manual_seed(0)
        models[base] = str(workdir / f"unet{base}.pt")
        save_model(UNet(base_channels=base), models[base])

    best = raw_limits(run, models, device)

    def settings_for(base: int, precision: str, out: str, **extra: Any) -> overtile.PredictSettings:
        """The image through net ``base`` at ``precision``, in the memory format of its raw limit."""
        cl = best[base, precision]["format"] == "channels_last"
        return settings(args, image, models[base], str(workdir / out), precision, cl, **extra)

    if device.type == "cuda":
        torch.cuda.empty_cache()
    for n in args.workers:  # (b) warm, on clusters of each worker count; (d) on the first
        if time.perf_counter() - run.start > args.deadline:
            run.result["skipped"].append(f"cluster of {n}")
            continue
        with dask_client(workers=n or None, gpu=device.type == "cuda", warm="pipeline.jobs.predict") as client:
            run.result.setdefault("cluster_workers", {})[n] = len(client.scheduler_info()["workers"])
            if n == args.workers[0] and args.check_size:
                for precision in args.precisions:
                    run.step(f"check {precision}", lambda: {"base": args.bases[-1], **check(
                        client, args, small, models[args.bases[-1]], str(workdir / "check.zarr"), precision)}, "checks")
            for (base, precision), raw in best.items():
                warm_runs(run, client, n, base, precision, raw, settings_for(base, precision, "out.zarr"))
    if args.cold:
        cold_runs(run, best, settings_for)
    run.save()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {run.result['elapsed_s']} s; skipped: {run.result['skipped']}; errors: {len(run.result['errors'])}")


if __name__ == "__main__":
    main()
