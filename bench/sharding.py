"""Benchmark: outputs and slides on an object store (issue 13): sharded against unsharded
outputs, the bytes a tissue-masked run fetches from a slide, and listing a rerun's ledger.

Everything runs against a local S3-API server (moto's standalone server on 127.0.0.1,
started as the tests start it: ``tests/servers.py``), dummy credentials in the environment.
Requests are counted from the server's log (one line per request).

1. **layouts**: the same prediction (a generated image read from local disk, a 4-base valid
   U-Net, on a LocalCluster of 2 single-thread workers) written to S3 three ways: sharded
   (one object per block holding smaller chunks: the default on object stores); unsharded
   with the same chunks (16 objects per block); and unsharded with one chunk per block (the
   local default). Two scales: 256 blocks of 256² with chunks of 64² (many objects), and
   16 blocks of 2048² with chunks of 512² (the defaults). Per layout: objects stored, the
   blocks' write time and MB/s (uncompressed output over the summed write time of the
   block tasks), the pyramid's time, the run's wall time; then a viewer's read: 20 random
   regions of level 0 of two chunk edges, each through a freshly opened array (cold), with
   its requests and the bytes of the chunks it decodes (uncompressed).
2. **slide**: a 16384² RGB OME-TIFF on S3 (JPEG tiles of 256², sub-resolutions in SubIFDs),
   glass but for one 1500² blob of tissue, predicted with ``tissue="saturation"`` in this
   process: the bytes fetched from the file (the mask's level and the tissue blocks' tiles)
   against its size.
3. **ledger**: a 64×64-block ledger (4,096 blocks), all finished, read as planning a rerun
   reads it (``Ledger.done()``: one LIST per 1,000 keys) and by reading every chunk.

The block tasks run eager (``compile=False``) after a warm-up run, so that no layout pays
for loading or compiling the model.

    .venv/bin/python bench/sharding.py --json bench/out/sharding.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import S3_ENVIRONMENT, cells, make_model, write_zarr  # noqa: E402
from servers import S3Server, free_port  # noqa: E402

BUCKET = "overtile-bench"
SCALES = ((4096, 256, 64), (8192, 2048, 512))  # image edge, block edge, chunk edge
LAYOUTS = (("sharded", True, True), ("unsharded, same chunks", False, True), ("unsharded, chunk = block", False, False))


class Requests:
    """Requests the S3 server has answered, from its log."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def count(self) -> int:
        with open(self.log, "rb") as f:
            return sum(1 for line in f if b'" ' in line and b"HTTP/" in line)


def objects(prefix: str) -> tuple[int, int]:
    """Objects under ``s3://BUCKET/prefix`` and their bytes."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    found = fs.find(f"{BUCKET}/{prefix}", detail=True)
    return len(found), sum(int(v["size"]) for v in found.values())


def touched(corner: tuple[int, int], edge: int, chunks: tuple[int, ...], itemsize: int = 4) -> int:
    """Uncompressed bytes of the chunks a region of ``edge``² at ``corner`` touches."""
    per_axis = [len(range(o // c, -(-(o + edge) // c))) for o, c in zip(corner, chunks[1:])]
    return int(np.prod(per_axis)) * int(np.prod(chunks)) * itemsize


def layouts(workdir: Path, requests: Requests, client, edge: int, block: int, chunk: int, regions: int) -> list[dict]:
    import zarr

    from pipeline.jobs.predict import PredictSettings, predict

    image = write_zarr(workdir / f"image-{edge}.zarr", cells((edge, edge), seed=1), chunks=(block, block))
    model = make_model(workdir / "unet.pt")
    rng = np.random.default_rng(0)
    view = 2 * chunk  # a viewer's region: two chunk edges
    corners = [tuple(int(v) for v in rng.integers(0, edge - view, 2)) for _ in range(regions)]
    # a warm-up run to local disk: every layout then finds the model loaded in the workers
    predict(PredictSettings(input=image, output=str(workdir / f"warm-{block}.zarr"), model=str(model), block_size=block,
                            compile=False, pyramid=False), client=client)
    rows = []
    for n, (name, shards, small_chunks) in enumerate(LAYOUTS):
        i = f"{block}-{n}"
        output = f"s3://{BUCKET}/layout-{i}.zarr"
        settings = PredictSettings(input=image, output=output, model=str(model), block_size=block, shards=shards,
                                   chunk_size=chunk if small_chunks else None, compile=False)
        before = requests.count()
        start = time.perf_counter()
        _, summary = predict(settings, client=client)
        wall = time.perf_counter() - start
        written = requests.count() - before
        stored, stored_bytes = objects(f"layout-{i}.zarr/0/c")
        total, _ = objects(f"layout-{i}.zarr")
        write_s = sum(r["write_s"] for r in summary.records)
        out_bytes = 2 * edge * edge * 4  # float32 probabilities of 2 classes
        reads = []
        for y, x in corners:
            before = requests.count()
            t = time.perf_counter()
            region = zarr.open_array(f"{output}/0", mode="r", zarr_format=3)[:, y:y + view, x:x + view]
            reads.append((time.perf_counter() - t, requests.count() - before))
            assert region.shape == (2, view, view)
        array = zarr.open_array(f"{output}/0", mode="r", zarr_format=3)
        rows.append({
            "layout": name, "edge": edge, "block": block, "view": view,
            "chunks": list(array.chunks), "shards": list(array.shards) if array.shards else None,
            "blocks": summary.done, "level0_objects": stored, "level0_mb": stored_bytes / 1e6, "objects": total,
            "requests": written, "wall_s": wall, "blocks_s": summary.stages.get("blocks", 0.0),
            "pyramid_s": summary.stages.get("finish", 0.0), "write_s": write_s,
            "write_block_ms": 1000 * statistics.median(r["write_s"] for r in summary.records),
            "write_mb_s": out_bytes / 1e6 / write_s,
            "read_ms": 1000 * statistics.median(t for t, _ in reads),
            "read_requests": statistics.median(n for _, n in reads),
            "read_mb": statistics.median(touched(c, view, tuple(array.chunks)) for c in corners) / 1e6,
        })
        r = rows[-1]
        print(f"blocks {block}², {name}: {r['level0_objects']} objects at level 0 ({r['objects']} in all), wall {wall:.1f} s, "
              f"write {r['write_block_ms']:.0f} ms/block ({r['write_mb_s']:.0f} MB/s), pyramid {r['pyramid_s']:.1f} s, "
              f"viewer read of {view}²: {r['read_ms']:.1f} ms / {r['read_requests']:.0f} requests / "
              f"{r['read_mb']:.1f} MB decoded", flush=True)
    return rows


def ome_tiff(edge: int, blob: int, tile: int = 256, sublevels: int = 4) -> bytes:
    """A pyramidal RGB OME-TIFF: noisy white glass in JPEG tiles, one square of pink tissue."""
    import tifffile

    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(235, 4, (tile, tile, 3)), 0, 255).astype(np.uint8)
    image = np.tile(glass, (edge // tile, edge // tile, 1))
    y0, x0 = edge * 5 // 16, edge * 9 // 16
    tissue = np.array([200, 110, 170]) + rng.normal(0, 15, (blob, blob, 3))
    image[y0:y0 + blob, x0:x0 + blob] = np.clip(tissue, 0, 255).astype(np.uint8)
    opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 90})
    out = io.BytesIO()
    with tifffile.TiffWriter(out, ome=True, bigtiff=True) as tw:
        tw.write(image, subifds=sublevels, metadata={"axes": "YXS"}, **opts)
        for k in range(1, sublevels + 1):
            tw.write(image[:: 2**k, :: 2**k], subfiletype=1, **opts)
    return out.getvalue()


def slide(workdir: Path, requests: Requests, edge: int, blob: int) -> dict:
    import s3fs
    import tifffile

    from pipeline.jobs import blockwise
    from pipeline.jobs.predict import PredictSettings, plan_prediction
    from pipeline.storage import slides

    data = ome_tiff(edge, blob)
    url = f"s3://{BUCKET}/slide.ome.tif"
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(url, data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        level_bytes = [int(sum(lv.pages[0].databytecounts)) for lv in tif.series[0].levels]
    model = make_model(workdir / "rgb.pt", in_channels=3, base_channels=2)
    settings = PredictSettings(input=url, output=f"s3://{BUCKET}/slide.zarr", model=str(model), block_size=2048,
                               tissue="saturation")
    planned = {}

    def on_plan(job, pending):
        planned.update(bytes=slides.bytes_read(url), requests=requests.count(), seconds=time.perf_counter() - start)

    before = requests.count()
    start = time.perf_counter()
    job, summary = blockwise.execute(plan_prediction, settings, in_process=True, on_plan=on_plan)
    wall = time.perf_counter() - start
    fetched = slides.bytes_read(url)
    result = {"edge": edge, "file_mb": len(data) / 1e6, "level_mb": [b / 1e6 for b in level_bytes],
              "tissue": job.tissue, "blocks": summary.done, "background": summary.background,
              "fetched_mb": fetched / 1e6, "plan_fetched_mb": planned["bytes"] / 1e6,
              "blocks_fetched_mb": (fetched - planned["bytes"]) / 1e6, "fraction": fetched / len(data),
              "requests": requests.count() - before, "plan_s": planned["seconds"], "wall_s": wall}
    print(f"slide {edge}² px, {result['file_mb']:.1f} MB: fetched {result['fetched_mb']:.2f} MB "
          f"({100 * result['fraction']:.1f}%; plan {result['plan_fetched_mb']:.2f} MB, {summary.done} blocks "
          f"{result['blocks_fetched_mb']:.2f} MB) in {wall:.1f} s; {job.tissue}", flush=True)
    return result


def ledger(requests: Requests, grid: tuple[int, int], repeats: int = 3) -> dict:
    import zarr

    from pipeline import storage

    import s3fs

    # a bucket of its own: moto answers a LIST by scanning every key of the bucket, S3 does not
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(f"{BUCKET}-ledger")
    group = f"s3://{BUCKET}-ledger/ledger.zarr"
    zarr.open_group(store=group, mode="w", zarr_format=3)
    book = storage.Ledger.prepare(group, grid, "bench", overwrite=True)
    start = time.perf_counter()
    zarr.open_array(store=book.url, mode="r+")[...] = 1  # every block finished
    marked = time.perf_counter() - start
    listed, read = [], []
    for _ in range(repeats):
        before = requests.count()
        t = time.perf_counter()
        assert book.done().all()
        listed.append((time.perf_counter() - t, requests.count() - before))
    for _ in range(repeats):
        before = requests.count()
        t = time.perf_counter()
        assert (zarr.open_array(store=book.url, mode="r")[...] > 0).all()
        read.append((time.perf_counter() - t, requests.count() - before))
    result = {"blocks": int(np.prod(grid)), "mark_all_s": marked,
              "list_s": statistics.median(t for t, _ in listed), "list_requests": listed[0][1],
              "read_s": statistics.median(t for t, _ in read), "read_requests": read[0][1]}
    print(f"ledger of {result['blocks']} blocks: listed in {result['list_s']:.2f} s ({result['list_requests']} requests), "
          f"read chunk by chunk in {result['read_s']:.2f} s ({result['read_requests']} requests)", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default=",".join(":".join(map(str, s)) for s in SCALES),
                   help="layout comparisons as EDGE:BLOCK:CHUNK, comma-separated")
    p.add_argument("--regions", type=int, default=20, help="viewer reads per layout")
    p.add_argument("--slide-edge", type=int, default=16384)
    p.add_argument("--blob", type=int, default=1500, help="edge of the slide's tissue")
    p.add_argument("--ledger", type=int, default=64, help="ledger grid edge (64: 4,096 blocks)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="overtile-sharding-"))
    server = S3Server(workdir / "moto.log", free_port())
    server.start()
    try:
        os.environ.update(S3_ENVIRONMENT, AWS_ENDPOINT_URL=server.endpoint)  # before any cluster: workers inherit it
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        requests = Requests(server.log)
        from pipeline.jobs.blockwise import dask_client

        rows = []
        with dask_client(workers=2) as client:
            for scale in args.scales.split(","):
                edge, block, chunk = map(int, scale.split(":"))
                rows += layouts(workdir, requests, client, edge, block, chunk, args.regions)
        results = {"layouts": rows, "slide": slide(workdir, requests, args.slide_edge, args.blob),
                   "ledger": ledger(requests, (args.ledger, args.ledger))}
    finally:
        server.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
