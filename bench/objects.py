"""Benchmark: cells as objects over a generated slide of millions of touching cells (issue 12).

A probability map (uint8, 255·p, as ``overtile predict --dtype uint8`` writes it) of cells on
a jittered grid, touching, each separated from its neighbours by a thin border of low
probability: the shape a U-Net trained with the paper's weight maps draws. The object job
runs on it as a user runs it (``find_objects``: its own LocalCluster of 2 single-thread
workers, QuPath GeoJSON on, the label pyramid on), in a process of its own, for the slide and
for 4× its area. Measured: wall time, the merge's and each pass's share, peak resident memory
of the client (which runs the scheduler) and of the largest worker process, and the ratios
of the 4× slide to the 1× one (targets: time within 4.5×, memory within 1.2×).

    .venv/bin/python bench/objects.py --json bench/out/objects.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MiB = 2**20
SPACING = 11  # px between cell centres: ~100 px cells


def _hash(i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per grid cell, the same whichever block asks."""
    h = (i.astype(np.uint64) * np.uint64(73856093)) ^ (j.astype(np.uint64) * np.uint64(19349663)) ^ np.uint64(salt)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)


def cell_block(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Class probabilities ``(2, h, w)`` as uint8 for the block at ``(y0, x0)``: p = how far a
    pixel is from the border between its nearest and second-nearest centre."""
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
    gi, gj = np.floor(yy / SPACING).astype(np.int64), np.floor(xx / SPACING).astype(np.int64)
    d1 = np.full((h, w), np.inf, np.float32)
    d2 = np.full((h, w), np.inf, np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i, j = gi + di, gj + dj
            cy = (i + 0.2 + 0.6 * _hash(i, j, 1)) * SPACING
            cx = (j + 0.2 + 0.6 * _hash(i, j, 2)) * SPACING
            d = np.hypot(yy - cy, xx - cx).astype(np.float32)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
    p = np.clip((d2 - d1) / 4.0, 0.0, 1.0)
    q = np.rint(p * 255).astype(np.uint8)
    return np.stack([255 - q, q])


def write_block(url: str, offset: tuple[int, int], shape: tuple[int, int]) -> None:
    import zarr

    zarr.open_array(store=url, mode="r+")[:, offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]] = \
        cell_block(*offset, *shape)


def write_slide(root: Path, edge: int, block: int) -> str:
    """The probability map of an ``edge``² slide, written blockwise on a local cluster."""
    from distributed import Client, LocalCluster

    from pipeline import storage

    url = str(root / f"cells-{edge}.zarr")
    storage.create_image(url, (2, edge, edge), (2, block, block), "uint8", "cyx", name="probabilities",
                         scale=[1.0, 0.25, 0.25], units={"y": "micrometer", "x": "micrometer"}, overwrite=True,
                         attrs={"overtile": {"output_kind": "probabilities"}})
    offsets = [(y, x) for y in range(0, edge, block) for x in range(0, edge, block)]
    shapes = [(min(block, edge - y), min(block, edge - x)) for y, x in offsets]
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.gather(client.map(write_block, [url + "/0"] * len(offsets), offsets, shapes, pure=False))
    return url


class PeakMemory:
    """Peak resident memory of this process and of its largest descendant (a worker)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.client = 0
        self.per_child: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.client = max(self.client, self.me.memory_info().rss)
                for child in self.me.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                        self.per_child[child.pid] = max(self.per_child.get(child.pid, 0), rss)
                        self.names.setdefault(child.pid, " ".join(child.cmdline()[-2:]))
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self._stop.wait(interval)

    @property
    def worker(self) -> int:
        return max(self.per_child.values(), default=0)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> None:
    """One slide in a process of its own: ``find_objects`` as a user runs it, measured."""
    from pipeline.jobs.objects import ObjectSettings, find_objects

    out = Path(args.workdir) / f"objects-{args.edge}.zarr"
    settings = ObjectSettings(probabilities=args.url, output=str(out), threshold=0.5, grow_distance=2,
                              grow_threshold=0.1, geojson=str(out) + ".geojson.gz", overwrite=True)
    with PeakMemory() as memory:
        t0 = time.time()
        job, summary = find_objects(settings)
        wall = time.time() - t0
    records = summary.records
    result = dict(
        edge=args.edge, objects=job.objects, wall_s=wall, stages=summary.stages, passes=dict(job.passes),
        blocks=summary.done, client_peak_mib=memory.client / MiB, worker_peak_mib=memory.worker / MiB,
        block_s=float(np.median([r["read_s"] + r["compute_s"] + r["write_s"] + r["measure_s"] for r in records])),
        geojson_mib=Path(settings.geojson).stat().st_size / MiB,
    )
    Path(args.result).write_text(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edge", type=int, default=15_600, help="edge of the smaller slide (default 15600: ~2 million cells)")
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="overtile-objects-"))
    results = []
    for edge in (args.edge, 2 * args.edge):
        t = time.time()
        url = write_slide(workdir, edge, args.block)
        print(f"generated {edge}² px of cells in {time.time() - t:.0f} s: {url}", flush=True)
        result_file = workdir / f"result-{edge}.json"
        subprocess.run([sys.executable, __file__, "--child", "--url", url, "--edge", str(edge),
                        "--workdir", str(workdir), "--result", str(result_file)], check=True)
        results.append(json.loads(result_file.read_text()))
        r = results[-1]
        print(f"  {r['objects']:,} objects in {r['wall_s']:.1f} s; client {r['client_peak_mib']:.0f} MiB, "
              f"largest worker {r['worker_peak_mib']:.0f} MiB", flush=True)

    small, large = results
    rows = [
        ("slide", lambda r: f"{r['edge']:,}² px ({r['edge'] ** 2 / 1e9:.2f} GP)"),
        ("objects", lambda r: f"{r['objects']:,}"),
        ("blocks", lambda r: f"{r['blocks']}"),
        ("wall s (find_objects as a user calls it)", lambda r: f"{r['wall_s']:.1f}"),
        ("objects per second", lambda r: f"{r['objects'] / r['wall_s']:,.0f}"),
        ("  seeds pass s", lambda r: f"{r['passes']['seeds']:.1f}"),
        ("  faces pass s", lambda r: f"{r['passes']['faces']:.1f}"),
        ("  merge s (share of wall)", lambda r: f"{r['passes']['merge']:.2f} ({100 * r['passes']['merge'] / r['wall_s']:.1f}%)"),
        ("  blocks (label, measure, outline) s", lambda r: f"{r['stages'].get('blocks', 0):.1f}"),
        ("  finish (spanning objects, GeoJSON, pyramid) s", lambda r: f"{r['stages'].get('finish', 0):.1f}"),
        ("  cluster start + close s", lambda r: f"{r['stages'].get('cluster', 0):.1f}"),
        ("median block s", lambda r: f"{r['block_s']:.2f}"),
        ("peak RSS client (and scheduler) MiB", lambda r: f"{r['client_peak_mib']:.0f}"),
        ("peak RSS largest worker MiB", lambda r: f"{r['worker_peak_mib']:.0f}"),
        ("GeoJSON (gzip) MiB", lambda r: f"{r['geojson_mib']:.0f}"),
    ]
    print("\n| | slide | 4× area |\n| --- | --- | --- |")
    for name, f in rows:
        print(f"| {name} | {f(small)} | {f(large)} |")
    time_ratio = large["wall_s"] / small["wall_s"]
    client_ratio = large["client_peak_mib"] / small["client_peak_mib"]
    worker_ratio = large["worker_peak_mib"] / small["worker_peak_mib"]
    print(f"\n4× area / 1×: objects {large['objects'] / small['objects']:.2f}×, time {time_ratio:.2f}× (target ≤ 4.5), "
          f"client memory {client_ratio:.3f}× and worker memory {worker_ratio:.3f}× (target ≤ 1.2)")
    print(f"command: python bench/objects.py{' --json ' + str(args.json) if args.json else ''}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "time_ratio": time_ratio, "client_ratio": client_ratio,
                                         "worker_ratio": worker_ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
