"""What ``torch.compile`` buys a CPU forward pass, in a plain process and in a Dask worker.

Issue 11 asked why compiling in overtile's workers saved 2.6% per block when the plain
process of ``bench/predict.py`` gained 15-35%. This script isolates the forward pass: the
16-base valid 2-D U-Net (depth 5) on one 1212² tile, ``channels_last``, one torch thread,
``torch.inference_mode``, overtile's worker allocator setting in every process
(:data:`pipeline.clusters.WORKER_ENVIRONMENT`), in each of

* eager;
* ``torch.compile(dynamic=False)``, as overtile's workers compile (inductor, default mode);
* the same with inductor's ``freezing`` (weights folded as constants, oneDNN prepacking);

and each of those in a fresh plain subprocess (main thread) and in a task of a fresh
``LocalCluster`` worker (processes, 1 worker, 1 thread, started as overtile starts its own).
Per configuration: the first call's seconds (compiling included), the median of ``--passes``
timed passes after two warm-up passes, and the largest difference from the eager output.

Usage::

    python bench/compile.py --json bench/out/compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.clusters import WORKER_ENVIRONMENT  # noqa: E402
from pipeline.numerics.unet import UNet  # noqa: E402

MODES = ("eager", "compiled", "compiled+freezing")


def forward_pass(mode: str, tile: int = 1212, passes: int = 5) -> dict[str, Any]:
    """One configuration in this process: first call (compiling), timed passes, difference."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = UNet(base_channels=16).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 1, tile, tile).contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    if mode == "compiled+freezing":
        import torch._inductor.config as inductor

        inductor.freezing = True
    run = net if mode == "eager" else torch.compile(net, dynamic=False)
    with torch.inference_mode():
        y = run(x)
        first = time.perf_counter() - start
        reference = net(x)
        for _ in range(2):
            run(x)
        seconds = []
        for _ in range(passes):
            t = time.perf_counter()
            run(x).numpy()
            seconds.append(time.perf_counter() - t)
    return {"mode": mode, "first_s": round(first, 1), "pass_s": round(statistics.median(seconds), 3),
            "passes_s": [round(s, 3) for s in seconds], "max_abs_diff": float((y - reference).abs().max()),
            "threads": torch.get_num_threads(), "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def in_plain_process(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, **WORKER_ENVIRONMENT}
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); from compile import forward_pass; "
            f"print(json.dumps(forward_pass({mode!r}, {args.tile}, {args.passes})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return {"where": "plain process", **json.loads(out.stdout.strip().splitlines()[-1])}


def in_dask_worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.jobs.blockwise import dask_client

    with dask_client(workers=1) as client:
        client.run(sys.path.insert, 0, str(HERE))
        from compile import forward_pass as remote  # the module by name, importable on the worker

        result = client.submit(remote, mode, args.tile, args.passes, pure=False).result()
    return {"where": "Dask worker", **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tile", type=int, default=1212, help="tile input edge (default 1212)")
    p.add_argument("--passes", type=int, default=5, help="timed passes per configuration (default 5)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for where in (in_plain_process, in_dask_worker):
        for mode in MODES:
            row = where(mode, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    eager = {r["where"]: r["pass_s"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        r["speedup_vs_eager_here"] = round(eager[r["where"]] / r["pass_s"], 3)
    table = ["| where | mode | first call s | pass s (median) | speed-up over eager there | max abs diff |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['where']} | {r['mode']} | {r['first_s']} | {r['pass_s']} | {r['speedup_vs_eager_here']:.3f} | "
              f"{r['max_abs_diff']:.1e} |" for r in rows]
    print("\n".join(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "cpu": _cpu(), "torch": torch.__version__}, indent=1))


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


if __name__ == "__main__":
    main()
