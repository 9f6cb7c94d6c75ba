"""The model on a worker: the device it runs on, loaded once per process, and its forward
passes, on the GPU with streams and pinned memory, and a block kept on the GPU from its
upload to its encoded output.

What the block tasks of :mod:`pipeline.jobs.predict` call; the numerics they feed
(:mod:`pipeline.numerics.tiling`) stay free of device code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline import models
from pipeline.errors import InputError
from pipeline.numerics import tiling

AUTOCAST = {"none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: TF32 off, no autocast


def resolve_device(device: str, remote: bool = False) -> str:
    """``auto`` becomes ``cuda`` where this process sees a GPU. With ``remote`` (the blocks run
    on another cluster, whose workers may have GPUs this planning machine lacks) ``cuda`` is
    taken on trust: the blocks then wait for workers offering the ``GPU`` resource."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not remote and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (and no --scheduler of a GPU cluster given)")
    return device


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a model of any kind, a package folder included: what fingerprints hold."""
    return models.model_digest(path)


def worker_gpu(count: int | None = None) -> int:
    """The GPU this process computes on, of ``count`` visible (default: all). A local
    cluster's workers, named 0, 1, ..., take the GPUs in turn (worker i: GPU i mod count);
    elsewhere (a SLURM or Kubernetes worker is given one GPU) the first."""
    count = torch.cuda.device_count() if count is None else count
    if count <= 1:
        return 0
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not in a Dask worker
        return 0
    return int(name) % count if str(name).isdigit() else 0


_MODELS: dict[tuple[Any, ...], models.Model] = {}


def cached_model(info: models.ModelInfo, device: str, channels_last: bool) -> models.Model:
    """The model of ``info``, loaded once per worker process and kept (keyed by its files,
    the weights chosen, device and format); never probed again: ``info`` is the plan's.

    On CPU every forward pass runs on one thread (torch's, and onnxruntime's): convolution
    results depend (in the last bit) on the thread count, so parallelism comes from Dask
    task slots instead, which keeps the output bit-identical whatever the cluster layout.
    Two one-thread streams are also faster than one two-thread stream on these CPUs.
    """
    key = (info.path, info.weights, info.member, models.stamp(info.path), device, channels_last)
    model = _MODELS.get(key)
    if model is None:
        if device == "cpu":
            torch.set_num_threads(1)
        elif device == "cuda":  # "cuda" is then this worker's GPU, for the model and its tensors
            torch.cuda.set_device(worker_gpu())
        model = models.load(info, device, channels_last, threads=1 if device == "cpu" else None)
        _MODELS.clear()  # one model per process: a new model replaces the old one
        _MODELS[key] = model
    return model


_DESCRIBED: dict[tuple[Any, ...], models.ModelInfo] = {}


def model_geometry(path: str, dims: int = 2, channels: int = 1) -> models.ModelInfo:
    """The model's :class:`~pipeline.models.ModelInfo` (kind, geometry, normalisation, how it
    is tiled), described once per process and file: a study of many slides probes a foreign
    model once. ``dims`` and ``channels``: the image's, for a model whose file leaves them open."""
    key = (str(Path(path).resolve()), models.stamp(path), dims, channels)
    if key not in _DESCRIBED:
        _DESCRIBED.clear()
        _DESCRIBED[key] = models.describe(path, dims=dims, channels=channels)[0]
    return _DESCRIBED[key]


# A compiled forward pass pays for itself after this many blocks per task slot: on 2 CPU
# cores, 2048² blocks of 1212² tiles, 16-base net, compiling cost 12.7 s per worker and saved
# 0.12 s (2.6%) per block, a break-even of about 100 (bench/predict.py, bench/RESULTS.md).
# ``compile=None`` compiles above it on GPUs; on CPUs a later host measured no gain in a
# worker at all, so there it is off unless asked for.
COMPILE_BREAK_EVEN_BLOCKS = 100

_COMPILED: dict[int, tuple[torch.nn.Module, set[tuple[int, ...]]]] = {}
_COMPILE_FAILED: list[str] = []


def compiled_runner(model: torch.nn.Module, shape: tuple[int, ...], autocast: torch.dtype | None = None) -> tuple[Any, float, str]:
    """A runner (as :func:`run_tiles`) through ``torch.compile`` of the cached ``model``,
    compiled once per worker process and reused across blocks, and the seconds spent now
    compiling for this batch ``shape`` (0 once a shape is known; a new shape recompiles).

    Where compiling fails (no C++ compiler on a CPU worker, an unsupported GPU), the eager
    model runs instead and the third value says why.
    """
    if _COMPILE_FAILED:
        return run_tiles, 0.0, _COMPILE_FAILED[0]
    start = time.perf_counter()  # torch.compile itself loads the compiler: part of the cost
    entry = _COMPILED.get(id(model))
    if entry is None:
        _COMPILED.clear()  # one model per process, as in cached_model
        entry = _COMPILED[id(model)] = (torch.compile(model, dynamic=False), set())
    module, shapes = entry
    seconds = 0.0
    if shape not in shapes:
        device, fmt = tiling.model_device(model)
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                module(torch.zeros(shape, device=device).contiguous(memory_format=fmt))
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager
            _COMPILE_FAILED.append(f"torch.compile failed, eager instead ({type(exc).__name__}: {str(exc)[:200]})")
            return run_tiles, 0.0, _COMPILE_FAILED[0]
        seconds = time.perf_counter() - start
        shapes.add(shape)

    def runner(_: torch.nn.Module, batches: Sequence[np.ndarray], autocast: torch.dtype | None = None) -> list[np.ndarray]:
        return run_tiles(module, batches, autocast)

    return runner, seconds, ""


def run_tiles(model: torch.nn.Module, batches: Sequence[np.ndarray], autocast: torch.dtype | None = None) -> list[np.ndarray]:
    """Forward each batch ``(N, C, *tile)``; float32 logits back on the host. On CUDA the
    uploads and downloads overlap the compute (:func:`_run_tiles_cuda`), elsewhere this is
    :func:`pipeline.numerics.tiling.run_tiles`."""
    device, fmt = tiling.model_device(model)
    if device.type == "cuda" and batches and not isinstance(batches[0], torch.Tensor):
        return _run_tiles_cuda(model, batches, device, fmt, autocast)
    return tiling.run_tiles(model, batches, autocast)  # tensors cut on the device: the logits stay there


def on_device(
    model: torch.nn.Module,
    image: np.ndarray,
    compute: Callable[[torch.Tensor], torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """A block kept on the model's device: its input uploaded once (from pinned memory on a
    GPU), normalised there by ``normalize`` if it comes as stored (else it is already), then
    ``compute`` there (tiles cut, run and stitched, test-time transforms, activation, labels
    or the stored dtype), and only its result downloaded. The host is left reading and
    writing; on a fast GPU the host side is what bounds a worker (bench/gpu.py)."""
    device, _ = tiling.model_device(model)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(image))
        if device.type == "cuda":
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
        if normalize is not None:
            x = normalize(x)
        return compute(x).cpu().numpy()


def _run_tiles_cuda(
    model: torch.nn.Module,
    batches: Sequence[np.ndarray],
    device: torch.device,
    fmt: torch.memory_format,
    autocast: torch.dtype | None,
) -> list[np.ndarray]:
    """The GPU path: each batch is uploaded from pinned host memory on a side stream one batch
    ahead of the compute stream (the next upload overlaps this forward pass); results come
    back into pinned buffers without blocking; one synchronisation at the end."""
    copy, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def upload(batch: np.ndarray) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()
        with torch.cuda.stream(copy):
            x = host.to(device, non_blocking=True)  # the caching host allocator keeps `host` until done
            ready = torch.cuda.Event()
            ready.record(copy)
        return x, ready

    results = []
    with torch.inference_mode():
        pending = upload(batches[0])
        for i in range(len(batches)):
            x, ready = pending
            if i + 1 < len(batches):
                pending = upload(batches[i + 1])
            compute.wait_event(ready)
            x.record_stream(compute)
            with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
                y = model(x.contiguous(memory_format=fmt))
            host_out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
            host_out.copy_(y.float(), non_blocking=True)
            results.append(host_out)
    compute.synchronize()
    return [r.numpy() for r in results]
