"""Terabyte slides: planning, memory and time follow the tissue, not the slide's area.

One run builds two virtual RGB uint8 slides as OME-Zarr (c, y, x): a 600,000 × 600,000 px
slide (1.08 TB) and one with 4× its area (1,200,000² px, 4.3 TB), each holding the same
"tissue" (about 36 megapixels of stained cells near the top-left corner) and nothing else:
only the tissue's chunks are written, the rest of the slide is the fill value, as a scanner's
sparse pyramid would be. Each slide gets a low-resolution level (1/256) for the tissue mask.

Each slide is then segmented by ``overtile predict`` (the Python API) in its own child
process, with a 16-base-channel valid U-Net (depth 5, random weights), ``tissue="saturation"``
(Otsu on the saturation of the low-resolution level), uint8 probabilities, on a fresh local
Dask cluster of 2 single-thread workers. Reported per slide: planning time (inputs checked,
tissue mask, ledger read, blocks chosen), the number of block tasks, background blocks, the
wall time, the peak resident memory of the client process and of the Dask workers (and
scheduler), and the Dask scheduling overhead: the time worker threads sat idle between
their block tasks while work was waiting, over the time they spent in block tasks (from
Dask's task stream).

Targets: memory and time within 20% between the two slides; scheduling overhead < 5%.

Usage::

    .venv/bin/python bench/terabyte.py                 # both slides (~6 min on 2 cores)
    .venv/bin/python bench/terabyte.py --edge 60000    # a smaller pair, for a quick look
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


def idle_overhead(stream: list[dict], prefix: str) -> tuple[float, float]:
    """(idle seconds between consecutive block tasks per worker thread, busy seconds)."""
    by_thread: dict[tuple, list[tuple[float, float]]] = {}
    for event in stream:
        if not str(event["key"]).startswith(prefix):
            continue
        spans = [(s["start"], s["stop"]) for s in event["startstops"] if s["action"] == "compute"]
        if spans:
            by_thread.setdefault((event["worker"], event.get("thread")), []).extend(spans)
    idle = busy = 0.0
    for spans in by_thread.values():
        spans.sort()
        busy += sum(b - a for a, b in spans)
        idle += sum(max(0.0, nxt[0] - cur[1]) for cur, nxt in zip(spans, spans[1:]))
    return idle, busy


def child(args: argparse.Namespace) -> None:
    """One slide, in its own process: plan, segment, measure."""
    from distributed import Client, LocalCluster, get_task_stream

    from pipeline.jobs.predict import PredictSettings, plan_prediction, predict

    slide = json.loads(args.slide)
    settings = PredictSettings(input=slide["url"], output=str(Path(args.workdir) / f"pred-{slide['edge']}.zarr"),
                               model=args.model, tissue="saturation", dtype="uint8", block_size=args.block,
                               overwrite=True)
    result: dict = dict(slide)
    with PeakMemory() as memory:
        start = time.perf_counter()
        job, blocks, skipped = plan_prediction(settings)
        result["plan_s"] = time.perf_counter() - start
        result["tasks"], result["background_blocks"] = len(blocks), job.background
        result["grid_blocks"] = len(blocks) + skipped + job.background
        result["tissue"] = job.tissue
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(lambda: None)
            start = time.perf_counter()
            with get_task_stream(client) as stream:
                _, summary = predict(settings.model_copy(update={"overwrite": False}), client=client)
            result["run_s"] = time.perf_counter() - start
            idle, busy = idle_overhead(stream.data, job.name)
    result.update(
        computed_megapixels=summary.pixels / 1e6, blocks_done=summary.done, blocks_skipped=summary.skipped,
        megapixels_per_s=summary.pixels / 1e6 / result["run_s"], client_peak_mib=memory.client / MiB,
        workers_peak_mib=memory.children / MiB, idle_s=idle, busy_s=busy,
        scheduling_overhead=idle / busy if busy else float("nan"),
        block_compute_s=float(np.median([r["compute_s"] for r in summary.records])),
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
        ("wall s (blocks + pyramid)", lambda r: f"{r['run_s']:.1f}"),
        ("computed MP", lambda r: f"{r['computed_megapixels']:.1f}"),
        ("MP/s", lambda r: f"{r['megapixels_per_s']:.2f}"),
        ("median block compute s", lambda r: f"{r['block_compute_s']:.2f}"),
        ("peak RSS client MiB", lambda r: f"{r['client_peak_mib']:.0f}"),
        ("peak RSS workers+scheduler MiB", lambda r: f"{r['workers_peak_mib']:.0f}"),
        ("Dask scheduling overhead", lambda r: f"{100 * r['scheduling_overhead']:.2f}%"),
    ]
    lines = [f"model: 2-D valid U-Net, depth 5, {args.base} base channels, {num_parameters(model):,} parameters; "
             f"blocks {args.block}², tissue mask: {small['tissue']}",
             "", "| | slide | 4× area |", "| --- | --- | --- |"]
    lines += [f"| {name} | {f(small)} | {f(large)} |" for name, f in rows]
    ratio = lambda k: large[k] / small[k]  # noqa: E731
    lines += ["", f"4×-area / 1× ratios: wall {ratio('run_s'):.3f}, planning {ratio('plan_s'):.3f}, "
                  f"client memory {ratio('client_peak_mib'):.3f}, worker memory {ratio('workers_peak_mib'):.3f} "
                  f"(targets: within 1 ± 0.2); scheduling overhead {100 * small['scheduling_overhead']:.2f}% and "
                  f"{100 * large['scheduling_overhead']:.2f}% (target < 5%)",
              f"command: python bench/terabyte.py {' '.join(sys.argv[1:])}".rstrip()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
