"""Terabyte slides: planning, memory and time follow the tissue, not the slide's area.

One run builds two virtual RGB uint8 slides as OME-Zarr (c, y, x): a 600,000 × 600,000 px
slide (1.08 TB) and one with 4× its area (1,200,000² px, 4.3 TB), each holding the same
"tissue" (about 36 megapixels of stained cells near the top-left corner) and nothing else:
only the tissue's chunks are written, the rest of the slide is the fill value, as a scanner's
sparse pyramid would be. Each slide gets a low-resolution level (1/256) for the tissue mask.

Each slide is then segmented by ``overtile predict`` (the Python API) in its own child
process, with a 16-base-channel valid U-Net (depth 5, random weights), ``tissue="saturation"``
(Otsu on the saturation of the low-resolution level), uint8 probabilities and the output
pyramid, as a user runs it: ``predict(settings)`` with no client, so it plans, starts its own
local Dask cluster (:func:`pipeline.jobs.blockwise.local_cluster`: one single-thread worker per
core, one task slot each; started while it plans, its workers importing the job's module as
they start), runs the blocks, builds the pyramid and closes the cluster.
Reported per slide: planning time (inputs checked, tissue mask, ledger read, blocks chosen),
the number of block tasks, background blocks, the wall time of the whole call, the peak
resident memory of the client process (with the scheduler) and of the Dask workers, and
the overhead:

    overhead = 1 − (sum of block task seconds) / (task slots × wall)

with a block's task seconds ``finished − started`` from its record, and where the rest of
the slots' time went, in slot-seconds that add up to it: planning, cluster start (what is left
of it once planning is done), global
passes, the first block's start latency, the ramp until every slot runs a block, idle gaps
between blocks while all slots run, the tail (after the last moment all slots ran), the
pyramid, cluster close (from ``summary.stages``, the records' timestamps and the moments the
client saw the plan and the last block). The old figure (a worker's idle time between its
block tasks over its busy time) is kept beside it.

Targets: memory and time within 20% between the two slides; overhead < 10% for the 16-block
job.

Usage::

    .venv/bin/python bench/terabyte.py --json bench/out/terabyte.json   # both slides (~6 min on 2 cores)
    .venv/bin/python bench/terabyte.py --edge 60000 --tissue 2500      # a smaller pair (4 blocks), for a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MiB = 2**20
MASK_FACTOR = 256


def write_slide(root: Path, edge: int, tissue_edge: int, chunk: int, seed: int = 0) -> dict:
    """A virtual slide: only the tissue's chunks (and its low-resolution level) are written."""
    import zarr

    from pipeline import storage

    url = str(root / f"slide-{edge}.zarr")
    group = zarr.open_group(store=url, mode="w", zarr_format=3)
    shape = (3, edge, edge)
    level0 = group.create_array("0", shape=shape, chunks=(3, chunk, chunk), dtype="uint8", fill_value=0,
                                dimension_names=["c", "y", "x"], compressors=[storage.OUTPUT_CODEC])
    low_edge = math.ceil(edge / MASK_FACTOR)
    low = group.create_array("1", shape=(3, low_edge, low_edge), chunks=(3, 2048, 2048), dtype="uint8", fill_value=0,
                             dimension_names=["c", "y", "x"], compressors=[storage.OUTPUT_CODEC])
    group.attrs["ome"] = {"version": "0.5", "multiscales": [storage.multiscales(
        "cyx", [[1.0, 0.25, 0.25], [1.0, 0.25 * MASK_FACTOR, 0.25 * MASK_FACTOR]], "virtual slide",
        {"y": "micrometer", "x": "micrometer"})]}
    origin = 3 * chunk + chunk // 3  # not aligned to the block grid, as real tissue is not
    rng = np.random.default_rng(seed)
    end = origin + tissue_edge

    def spans(start: int) -> list[tuple[int, int]]:  # chunk-aligned pieces of [start, end)
        cuts = [start, *range((start // chunk + 1) * chunk, end, chunk), end]
        return list(zip(cuts, cuts[1:]))

    for y0, y1 in spans(origin):
        for x0, x1 in spans(origin):
            yy, xx = np.mgrid[y0:y1, x0:x1]
            nuclei = np.sin(yy / 9.0) * np.cos(xx / 11.0) > 0.6
            tile = np.where(nuclei[None], np.array([110.0, 60.0, 160.0])[:, None, None],
                            np.array([225.0, 150.0, 200.0])[:, None, None]) + rng.normal(0, 10, (3, y1 - y0, x1 - x0))
            level0[:, y0:y1, x0:x1] = np.clip(tile, 0, 255).astype(np.uint8)
    a, b = origin // MASK_FACTOR, math.ceil((origin + tissue_edge) / MASK_FACTOR)
    low[:, a:b, a:b] = np.array([200, 120, 190], np.uint8)[:, None, None]
    return {"url": url, "edge": edge, "terabytes": 3 * edge * edge / 1e12, "tissue_megapixels": tissue_edge ** 2 / 1e6}


class PeakMemory:
    """Samples the resident memory of this process and, separately, of its children."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.client = self.children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.client = max(self.client, self.me.memory_info().rss)
                total = 0
                for child in self.me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.children = max(self.children, total)
            except psutil.Error:
                pass
            self._stop.wait(interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def idle_overhead(records: list[dict]) -> tuple[float, float]:
    """(idle seconds between consecutive block tasks per worker, busy seconds): the old figure,
    from the records' ``started``/``finished`` (one task slot per worker process here)."""
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        by_worker.setdefault(r["worker_pid"], []).append((r["started"], r["finished"]))
    idle = busy = 0.0
    for spans in by_worker.values():
        spans.sort()
        busy += sum(b - a for a, b in spans)
        idle += sum(max(0.0, nxt[0] - cur[1]) for cur, nxt in zip(spans, spans[1:]))
    return idle, busy


def full_span(records: list[dict], slots: int) -> tuple[float, float] | None:
    """The first and the last moment at which all ``slots`` task slots ran a block (None if
    they never all did)."""
    events = sorted([(r["started"], 1) for r in records] + [(r["finished"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))  # at a tie an end comes first: no false overlap
    busy, first, last = 0, None, None
    for t, step in events:
        if step < 0 and busy == slots:
            last = t
        busy += step
        if busy == slots and first is None:
            first = t
    return (first, last) if first is not None else None


def where_time_goes(records: list[dict], stages: dict, t0: float, t_plan: float, t_blocks_end: float,
                    t_end: float, slots: int) -> dict:
    """Split the task slots' time over the whole ``predict()`` call, ``slots × wall``, into
    the blocks' own time and the rest, in slot-seconds that add up to it.

    The moments, on the one clock all processes share (``time.time``): ``t0`` the call,
    ``t_plan`` the end of planning (``on_plan``), ``t_blocks_end`` the last block's record
    received, ``t_end`` the return. The blocks stage began ``stages['blocks']`` before its end
    and ``stages['prepare']`` after the cluster was ready; the cluster's start is the rest
    since planning, its close the rest of ``stages['cluster']``. Within the blocks stage:
    the start latency (to the first block's start), the ramp (until every slot runs a block),
    idle gaps while some slot is between blocks inside the span in which all ran (scheduling),
    and the tail (after the last moment all slots ran: the last blocks finishing alone).
    """
    wall = t_end - t0
    busy = sum(r["finished"] - r["started"] for r in records)
    blocks_start = t_blocks_end - stages.get("blocks", 0.0)
    ready = blocks_start - stages.get("prepare", 0.0)
    cluster_start = max(0.0, ready - t_plan)
    span = full_span(records, slots)
    first_start = min(r["started"] for r in records)
    if span is None:  # never all slots busy (fewer blocks than slots): all of it is tail
        span = (first_start, first_start)
    lo, hi = span
    in_span = sum(max(0.0, min(r["finished"], hi) - max(r["started"], lo)) for r in records)
    in_head = sum(max(0.0, min(r["finished"], lo) - max(r["started"], blocks_start)) for r in records)
    in_tail = sum(max(0.0, min(r["finished"], t_blocks_end) - max(r["started"], hi)) for r in records)
    parts = {
        "plan": slots * (t_plan - t0),
        "cluster start": slots * cluster_start,
        "prepare": slots * stages.get("prepare", 0.0),
        "first-block start latency": slots * (first_start - blocks_start),
        "ramp (until all slots run)": slots * (lo - first_start) - in_head,
        "idle gaps (all-busy span)": slots * (hi - lo) - in_span,
        "tail (after the last all-busy moment)": slots * (t_blocks_end - hi) - in_tail,
        "pyramid": slots * stages.get("finish", 0.0),
        "cluster close": slots * max(0.0, stages.get("cluster", 0.0) - cluster_start),
    }
    parts["other (client between stages)"] = slots * wall - busy - sum(parts.values())
    return {"wall_s": wall, "slots": slots, "busy_s": busy, "overhead": 1 - busy / (slots * wall),
            "lost_slot_s": parts, "all_busy_span_s": hi - lo, "blocks_stage_s": stages.get("blocks", 0.0),
            "cluster_start_s": cluster_start, "first_block_latency_s": first_start - blocks_start}


def task_slots(settings) -> int:
    """Task slots of the LocalCluster ``predict()`` starts (as :func:`pipeline.jobs.blockwise.local_cluster`):
    ``workers`` processes (default one per core) of ``cores // workers`` threads each."""
    from pipeline.jobs.blockwise import default_workers

    n = settings.workers or default_workers()
    return n * max(1, default_workers() // n)


def child(args: argparse.Namespace) -> None:
    """One slide, in its own process: ``predict()`` as a user runs it (it plans, starts its own
    local cluster, runs the blocks, builds the pyramid, closes the cluster), measured."""
    from pipeline.jobs.predict import PredictSettings, predict

    slide = json.loads(args.slide)
    settings = PredictSettings(input=slide["url"], output=str(Path(args.workdir) / f"pred-{slide['edge']}.zarr"),
                               model=args.model, tissue="saturation", dtype="uint8", block_size=args.block,
                               overwrite=True)
    result: dict = dict(slide)
    marks: dict = {}

    def on_plan(job, pending) -> None:
        marks["plan"] = time.time()
        result["tasks"], result["background_blocks"] = len(pending.blocks), pending.background
        result["grid_blocks"], result["tissue"], result["compile"] = pending.total, job.tissue, job.compile

    def on_result(record: dict) -> None:
        marks["last_result"] = time.time()

    with PeakMemory() as memory:
        t0 = time.time()
        _, summary = predict(settings, on_plan=on_plan, on_result=on_result)
        t_end = time.time()
    records = summary.records
    slots = task_slots(settings)
    split = where_time_goes(records, summary.stages, t0, marks["plan"], marks["last_result"], t_end, slots)
    idle, busy = idle_overhead(records)
    result.update(
        plan_s=summary.stages.get("plan", 0.0), run_s=t_end - t0, stages=summary.stages, time_split=split,
        computed_megapixels=summary.pixels / 1e6, blocks_done=summary.done, blocks_skipped=summary.skipped,
        megapixels_per_s=summary.pixels / 1e6 / (t_end - t0), client_peak_mib=memory.client / MiB,
        workers_peak_mib=memory.children / MiB, idle_s=idle, busy_s=busy,
        overhead=split["overhead"], gap_overhead=idle / busy if busy else float("nan"),
        block_compute_s=float(np.median([r["compute_s"] for r in records])),
        block_task_s=float(np.median([r["finished"] - r["started"] for r in records])),
    )
    Path(args.result).write_text(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edge", type=int, default=600_000, help="edge of the smaller slide in px (default 600000: 1.08 TB RGB)")
    p.add_argument("--tissue", type=int, default=6000, help="edge of the square of tissue in px (default 6000: 36 MP)")
    p.add_argument("--block", type=int, default=2048, help="block edge (default 2048)")
    p.add_argument("--base", type=int, default=16, help="U-Net base channels (default 16)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slide", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    import torch

    from pipeline.numerics.unet import UNet, num_parameters, save_model

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="overtile-terabyte-"))
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = UNet(in_channels=3, num_classes=2, base_channels=args.base)
    save_model(model, workdir / "model.pt")
    results = []
    try:
        for edge in (args.edge, 2 * args.edge):
            start = time.perf_counter()
            slide = write_slide(workdir, edge, args.tissue, args.block)
            print(f"terabyte: wrote a {edge:,}² px slide ({slide['terabytes']:.2f} TB virtual, "
                  f"{slide['tissue_megapixels']:.0f} MP of tissue) in {time.perf_counter() - start:.1f} s", flush=True)
            out = workdir / f"result-{edge}.json"
            subprocess.run([sys.executable, __file__, "--child", "--slide", json.dumps(slide), "--model",
                            str(workdir / "model.pt"), "--result", str(out), "--workdir", str(workdir),
                            "--block", str(args.block)], check=True)
            results.append(json.loads(out.read_text()))
            shutil.rmtree(slide["url"])
            shutil.rmtree(workdir / f"pred-{edge}.zarr", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    small, large = results
    rows = [
        ("slide", lambda r: f"{r['edge']:,}² px, {r['terabytes']:.2f} TB"),
        ("grid blocks", lambda r: f"{r['grid_blocks']:,}"),
        ("block tasks (tissue)", lambda r: f"{r['tasks']}"),
        ("background blocks (not computed)", lambda r: f"{r['background_blocks']:,}"),
        ("planning s", lambda r: f"{r['plan_s']:.2f}"),
        ("wall s: predict() as a user runs it", lambda r: f"{r['run_s']:.1f}"),
        ("computed MP", lambda r: f"{r['computed_megapixels']:.1f}"),
        ("MP/s (over the whole call)", lambda r: f"{r['megapixels_per_s']:.2f}"),
        ("median block compute s / task s", lambda r: f"{r['block_compute_s']:.2f} / {r['block_task_s']:.2f}"),
        ("peak RSS client (and scheduler) MiB", lambda r: f"{r['client_peak_mib']:.0f}"),
        ("peak RSS workers MiB", lambda r: f"{r['workers_peak_mib']:.0f}"),
        ("**overhead**: 1 − block task s / (slots × wall)", lambda r: f"**{100 * r['overhead']:.1f}%** "
         f"(1 − {r['time_split']['busy_s']:.1f} / ({r['time_split']['slots']} × {r['run_s']:.1f}))"),
    ]

    def part(r: dict, name: str) -> str:
        split = r["time_split"]
        lost = split["lost_slot_s"][name]
        return f"{100 * lost / (split['slots'] * split['wall_s']):.1f}% ({lost / split['slots']:.2f} s)"

    rows += [(f"  of which {name}", lambda r, name=name: part(r, name)) for name in small["time_split"]["lost_slot_s"]]
    rows += [("idle between a worker's blocks / busy (old figure)", lambda r: f"{100 * r['gap_overhead']:.2f}%")]
    header = (f"model: 2-D valid U-Net, depth 5, {args.base} base channels, {num_parameters(model):,} parameters; "
              f"blocks {args.block}², {small['time_split']['slots']} task slots, compile {small['compile']}, "
              f"tissue mask: {small['tissue']}")
    lines = [header, "", "| | slide | 4× area |", "| --- | --- | --- |"]
    lines += [f"| {name} | {f(small)} | {f(large)} |" for name, f in rows]

    def ratio(k: str) -> float:
        return large[k] / small[k]

    stages = "; ".join(f"{k} {small['stages'][k]:.2f}/{large['stages'][k]:.2f}" for k in small["stages"])
    lines += ["", ("the overhead's parts: slot-seconds lost over slots × wall (the seconds are per slot); stages "
                   f"(plan, cluster start + close, prepare, blocks, finish = pyramid) s: {stages}"),
              (f"4×-area / 1× ratios: wall {ratio('run_s'):.3f}, planning {ratio('plan_s'):.3f}, "
               f"client memory {ratio('client_peak_mib'):.3f}, worker memory {ratio('workers_peak_mib'):.3f} "
               f"(targets: within 1 ± 0.2); overhead {100 * small['overhead']:.1f}% and "
               f"{100 * large['overhead']:.1f}% for {small['tasks']} and {large['tasks']} blocks "
               "(target < 10% for a 16-block job)"),
              f"command: python bench/terabyte.py {' '.join(sys.argv[1:])}".rstrip()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
