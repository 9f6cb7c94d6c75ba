"""A study of slides through one model: every slide of a folder, glob or CSV manifest (local
paths or object-store URLs) to its own outputs, on one shared Dask cluster.

For each slide: read it in place (TIFF-based slides and Zarr images are read tile by tile;
a picture, or a TIFF stored in strips too large to read by region, is ingested to OME-Zarr
once), compute its tissue mask, predict the blocks with tissue, and optionally find the cells
as objects. Each slide gets a folder (or prefix) of its own under the output root::

    ROOT/NAME/prediction.zarr      probabilities (OME-Zarr, with its ledger and pyramid)
    ROOT/NAME/cells.zarr ...       the objects, when asked for (paths of ObjectOptions, relative)
    ROOT/NAME/image.zarr           the ingested image, when the slide cannot be read in place
    ROOT/NAME/slide.json           the slide's record: the row of the study table
    ROOT/study.parquet, study.csv  the study table, one row per slide

Several slides are in flight at once (:attr:`CohortSettings.slides_in_flight`), each in a
thread of this process that plans it and submits its blocks to the shared cluster, so the
workers go on with the next slides' blocks while one slide plans, builds its pyramid or
finishes its objects. Dask runs earlier submissions first: the slides finish in about the
order given, and the blocks in flight stay bounded by the slides in flight.

One slide's failure (a corrupt file, an unreadable level) is its row's status and error,
naming the file; the others go on. Every output has its own ledger: a rerun skips the slides
whose record says finished with the same settings and input, and resumes the others where
they stopped, to the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import storage
from pipeline.errors import BlocksFailed, InputError
from pipeline.jobs import blockwise
from pipeline.jobs.inference import file_digest, resolve_device
from pipeline.jobs.objects import ObjectOptions, ObjectSettings, find_objects
from pipeline.jobs.predict import TTA_HELP, PredictSettings, predict
from pipeline.jobs.tissue import TissueMethod
from pipeline.storage import files, slides
from pipeline.storage.sources import file_stamp, stamp

log = logging.getLogger("overtile")

PREDICTION, IMAGE, RECORD = "prediction.zarr", "image.zarr", "slide.json"
STUDY_TABLE = "study"  # ROOT/study.parquet and ROOT/study.csv
# A TIFF level stored in pieces larger than this (strips over the whole width of a big scan,
# or one strip) is ingested: every block would decode most of the file again.
MAX_IN_PLACE_CHUNK = 4096 * 4096
# ... or in strips longer than this: a 2048² block would decode strips many times its width.
MAX_IN_PLACE_EDGE = 8192
SLIDE_SUFFIXES = slides.TIFF_SUFFIXES + slides.PICTURE_SUFFIXES + (".zarr",)
# The study table's columns, in order (a slide's record holds these and nothing else).
COLUMNS = ("slide", "name", "status", "error", "read", "width_px", "height_px", "tissue_fraction",
           "tissue_area_mm2", "blocks_total", "blocks_computed", "blocks_skipped", "blocks_without_tissue",
           "objects", "seconds", "prediction", "labels", "table", "geojson")
INTEGER_COLUMNS = ("width_px", "height_px", "blocks_total", "blocks_computed", "blocks_skipped",
                   "blocks_without_tissue", "objects")
FLOAT_COLUMNS = ("tissue_fraction", "tissue_area_mm2", "seconds")


class SlideObjects(ObjectOptions):
    """The objects of every slide of a study: :class:`ObjectOptions` with paths relative to
    the slide's folder."""

    output: str = Field("cells.zarr", description="Label image of object ids, in each slide's folder")
    geojson: str | None = Field(None, description="Also write the outlines for QuPath, in each slide's folder "
                                "(e.g. cells.geojson.gz)")

    @field_validator("output", "table", "geojson")
    @classmethod
    def _relative(cls, path: str | None) -> str | None:
        if path and (path.startswith("/") or "://" in path or ".." in path.split("/")):
            raise ValueError(f"{path!r}: object outputs are named relative to each slide's folder, e.g. cells.zarr")
        return path


class CohortSettings(BaseModel):
    """A study through one model; shared by the CLI, the Python API and the cohort flow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slides: str = Field(description="The slides: a folder (its TIFF / SVS / NDPI / OME-TIFF files, pictures and "
                        "OME-Zarr images), a glob (slides/*.svs), or a CSV manifest with a 'slide' column; local "
                        "paths or URLs such as s3://bucket/study/")
    output: str = Field(description="Output root: one folder (or prefix) per slide, and the study table "
                        "(study.parquet, study.csv)")
    model: str = Field(description="U-Net checkpoint file written by overtile")
    tissue: TissueMethod = Field("auto", description="Which blocks to compute: those with tissue in a low-resolution "
                                 "mask (auto: saturation for 8-bit RGB, dark for one 8-bit "
                                 "channel on a bright border, else bright), or all")
    tissue_threshold: float | None = Field(None, description="A fixed threshold on the tissue feature instead of Otsu's")
    dtype: Literal["float32", "float16", "uint8"] = Field("uint8", description="Probability dtype; uint8 stores "
                                                          "round(255·p), a quarter of float32's bytes")
    objects: SlideObjects | None = Field(None, description="Also find the cells as objects (paths relative to each "
                                         "slide's folder)")
    block_size: blockwise.BlockSize = None
    tile_size: int | None = Field(None, ge=8, description="Largest tile input edge for one forward pass "
                                  "(default 1212 in 2D)")
    tta: str = Field("none", description=TTA_HELP)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs")
    slides_in_flight: int = Field(3, ge=1, le=64, description="Slides planned and computed at once on the shared "
                                  "cluster, so workers never wait at a slide's end")
    workers: blockwise.Workers = None
    scheduler: blockwise.Scheduler = None
    overwrite: blockwise.Overwrite = False


@dataclass(frozen=True)
class Slide:
    """One slide of the study: where it is and the name of its output folder."""

    url: str
    name: str

    def folder(self, root: str) -> str:
        return f"{root.rstrip('/')}/{self.name}"


# --- the slides of a study ---------------------------------------------------------------------


def list_slides(where: str) -> list[Slide]:
    """The slides ``where`` names (a folder, a glob, a CSV manifest or one file), in order,
    each with a unique output name (its file name without suffixes; a name two slides share
    gets a short hash of the full path)."""
    import fsspec

    where = storage.absolute(str(where))
    fs, path = fsspec.core.url_to_fs(where)
    remote = storage.is_url(where)

    def full(p: str) -> str:
        return fs.unstrip_protocol(p) if remote else p

    if path.lower().endswith(".csv"):
        urls = _manifest(fs, path, full)
    elif any(c in path for c in "*?[") and not fs.exists(path):  # "batch [1]/" is a folder, not a pattern
        urls = [full(p) for p in sorted(fs.glob(path)) if _is_slide(p)]
    elif fs.isdir(path) and not path.rstrip("/").endswith(".zarr"):
        urls = [full(p) for p in sorted(fs.ls(path, detail=False)) if _is_slide(p)]
    elif fs.exists(path):
        urls = [where]
    else:
        raise InputError(f"{where}: no such file, folder or manifest")
    if not urls:
        raise InputError(f"{where}: no slides in it ({', '.join(SLIDE_SUFFIXES)})")
    urls = [storage.absolute(u) for u in urls]  # one spelling: "x.zarr/" and "x.zarr" are one slide
    unique = list(dict.fromkeys(urls))  # one run per slide: two would write one folder at once
    if len(unique) < len(urls):
        twice = sorted({u for u in urls if urls.count(u) > 1})
        log.warning("%s lists %s more than once; each runs once", where, ", ".join(twice))
    urls = unique
    names = [_stem(u) for u in urls]
    counts = {n: names.count(n) for n in names}
    return [Slide(u, n if counts[n] == 1 else f"{n}-{hashlib.sha256(u.encode()).hexdigest()[:8]}")
            for u, n in zip(urls, names)]


def _manifest(fs: Any, path: str, full: Callable[[str], str]) -> list[str]:
    """The 'slide' column of a CSV manifest (or its only column, with or without a header
    line); relative paths are taken from the manifest's folder. Commas, semicolons (a
    European spreadsheet's CSV) or tabs separate the columns; a spreadsheet's byte-order
    mark is not part of the first name."""
    with fs.open(path, "rt", encoding="utf-8-sig") as f:
        text = f.read()
    first = text.lstrip().partition("\n")[0]
    delimiter = next((d for d in ",;\t" if d in first), ",")
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text), delimiter=delimiter)]
    rows = [row for row in rows if any(row)]
    if not rows:
        raise InputError(f"{full(path)}: an empty manifest")
    header = [cell.lower() for cell in rows[0]]
    if "slide" in header:
        column, rows = header.index("slide"), rows[1:]
    elif len(header) == 1:  # one column: a header line unless its first entry is a slide already
        column, rows = 0, rows if _is_slide(rows[0][0]) or "/" in rows[0][0] else rows[1:]
    else:
        raise InputError(f"{full(path)}: a manifest needs a 'slide' column (it has {', '.join(rows[0])})")
    folder = path.rpartition("/")[0]
    urls = []
    for row in rows:
        value = row[column] if column < len(row) else ""
        if value:
            urls.append(value if "://" in value or value.startswith("/") else full(f"{folder}/{value}"))
    return urls


def _is_slide(path: str) -> bool:
    name = path.rstrip("/").lower()
    return name.endswith(SLIDE_SUFFIXES) and not name.rsplit("/", 1)[-1].startswith(".")


def _stem(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", *SLIDE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


# --- one slide ------------------------------------------------------------------------------


def in_place(url: str) -> tuple[storage.ImageSource | None, str]:
    """The slide opened for reading in place, block by block; or None and why it cannot be
    (only pictures and TIFFs are ingested: a Zarr image is read as it is stored)."""
    if slides.is_picture(url):
        return None, "a picture (PNG / JPEG) is read whole"
    source = storage.open_image(url)
    chunks = getattr(source.array, "chunks", None) or source.array.shape
    spatial = [c for c, a in zip(chunks, source.axes) if a in "zyx"]
    if slides.is_tiff(url) and (math.prod(spatial) > MAX_IN_PLACE_CHUNK or max(spatial) > MAX_IN_PLACE_EDGE):
        return None, f"stored in pieces of {'×'.join(map(str, spatial))} px"
    return source, ""


class SlideRun:
    """What :func:`run_slide` reports as it goes: ``on_plan(name, job, pending)`` once per
    job (prediction, objects), ``on_block(name, record)`` per finished block."""

    def __init__(self, on_plan: Callable[[str, Any, Any], None] | None = None,
                 on_block: Callable[[str, dict[str, Any]], None] | None = None):
        self.on_plan, self.on_block = on_plan, on_block

    def hooks(self, name: str) -> dict[str, Any]:
        return {"on_plan": (lambda job, pending: self.on_plan(name, job, pending)) if self.on_plan else None,
                "on_result": (lambda record: self.on_block(name, record)) if self.on_block else None}


def run_slide(slide: Slide, settings: CohortSettings, client: Callable[[], Any], model_digest: str | None = None,
              report: SlideRun | None = None) -> dict[str, Any]:
    """One slide through the study's steps, on the shared cluster (``client()`` gives it,
    started on first use): its record, also written to ``FOLDER/slide.json``. A slide
    finished before with the same settings and input is not opened again (status
    ``finished before``). A failure is the record's status and error, never raised."""
    folder = slide.folder(settings.output)
    report = report or SlideRun()
    started = time.perf_counter()
    row: dict[str, Any] = {c: None for c in COLUMNS} | {"slide": slide.url, "name": slide.name}
    key = found = None
    try:  # even the slide's stamp may fail (a 403, a path through a file): its row, not the study's end
        found = slide_stamp(slide)
        key = slide_key(slide, settings, model_digest or file_digest(storage.absolute(settings.model)), found)
        if (earlier := finished_before(slide, settings, key)) is not None:
            return earlier
        record = read_record(folder)
        # the slide's file changed since (rescanned): its outputs are made again. Other changes
        # (settings, model) are each job's to judge: it resumes what its fingerprint still fits,
        # or refuses, naming --overwrite
        stale = record is not None and "stamp" in record and record["stamp"] != json.loads(json.dumps(found))
        if stale and not settings.overwrite:
            log.info("%s: changed since its outputs in %s were made; they are made again", slide.url, folder)
        row.update(_compute(slide, settings.model_copy(update={"overwrite": settings.overwrite or stale}), folder,
                            client, report))
        row["status"] = "finished"
    except NoCluster:
        raise
    except Exception as exc:  # noqa: BLE001 - one slide's failure is its row, the study goes on
        row["status"], row["error"] = "failed", _error(slide.url, exc)
    row["seconds"] = round(time.perf_counter() - started, 2)
    try:
        files.put_text(f"{folder}/{RECORD}", json.dumps({**row, "key": key, "stamp": found}, indent=1))
    except Exception as exc:  # noqa: BLE001 - an unwritable output root is this slide's error too
        row["status"], row["error"] = "failed", _error(folder, exc)
    return row


def _compute(slide: Slide, settings: CohortSettings, folder: str, client: Callable[[], Any],
             report: SlideRun) -> dict[str, Any]:
    from pipeline.jobs.ingest import IngestSettings, ingest

    row: dict[str, Any] = {}
    source, why = in_place(slide.url)
    image = slide.url
    if source is not None:
        row["read"] = "in place"
    else:
        image = f"{folder}/{IMAGE}"
        ingest(IngestSettings(slide=slide.url, output=image, block_size=settings.block_size,
                              overwrite=settings.overwrite), client=client(), **report.hooks(slide.name))
        row["read"] = f"ingested ({why})"
        source = storage.open_image(image)
    row["height_px"], row["width_px"] = (int(n) for n in source.spatial_shape[-2:])
    predict_settings = PredictSettings(
        input=image, output=f"{folder}/{PREDICTION}", model=settings.model, tissue=settings.tissue,
        tissue_threshold=settings.tissue_threshold, dtype=settings.dtype, block_size=settings.block_size,
        tile_size=settings.tile_size, tta=settings.tta, device=settings.device, overwrite=settings.overwrite,
        scheduler=settings.scheduler, workers=settings.workers)
    failures: list[str] = []
    job, summary = predict(predict_settings, client=client(), failures=failures, **report.hooks(slide.name))
    if failures:
        raise BlocksFailed(summary)
    pixels = float(math.prod(source.spatial_shape))
    row.update(prediction=job.output, tissue_fraction=round(job.tissue_fraction, 6),
               tissue_area_mm2=_area_mm2(source, job.tissue_fraction * pixels), blocks_total=summary.total,
               blocks_computed=summary.done, blocks_skipped=summary.skipped, blocks_without_tissue=summary.background)
    if settings.objects is not None:
        o = settings.objects
        options = o.model_copy(update={"output": f"{folder}/{o.output}",
                                       "table": o.table and f"{folder}/{o.table}",
                                       "geojson": o.geojson and f"{folder}/{o.geojson}"})
        cells, found = find_objects(ObjectSettings.after_prediction(options, predict_settings), client=client(),
                                    failures=failures, **report.hooks(slide.name))
        if failures:
            raise BlocksFailed(found)
        row.update(objects=cells.objects, labels=cells.output, table=cells.table, geojson=cells.settings.geojson)
    return row


def _area_mm2(source: storage.ImageSource, pixels: float) -> float | None:
    """``pixels`` of the image's level 0 in mm², when its pixel size is known in a length unit."""
    to_mm = {"micrometer": 1e-3, "nanometer": 1e-6, "millimeter": 1.0, "centimeter": 10.0, "meter": 1e3}
    units = source.units or {}
    factors = [source.scale.get(a, 0.0) * to_mm.get(units.get(a, ""), 0.0) for a in "yx"]
    return round(pixels * factors[0] * factors[1], 6) if all(factors) else None


def _error(url: str, exc: BaseException) -> str:
    """One line naming the file: an :class:`InputError` says what is wrong with it; anything
    else also gets its type and where it was raised."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not isinstance(exc, (InputError, BlocksFailed)):
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        text = f"{type(exc).__name__}: {text}" + (f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else "")
    return text if url in text else f"{url}: {text}"


def finished_before(slide: Slide, settings: CohortSettings, key: str) -> dict[str, Any] | None:
    """The row of a slide finished before with the same ``key`` (:func:`slide_key`), status
    ``finished before``; None when it must run (or ``overwrite`` is set)."""
    earlier = None if settings.overwrite else read_record(slide.folder(settings.output))
    if earlier and earlier.get("status") == "finished" and earlier.get("key") == key:
        return {**{c: earlier.get(c) for c in COLUMNS}, "status": "finished before"}
    return None


def slide_stamp(slide: Slide) -> Any:
    """What identifies the slide's contents without reading its pixels: a file's size and time
    (one request); a Zarr image's shape, dtype and metadata files, as predict stamps its input."""
    if slides.is_tiff(slide.url) or slides.is_picture(slide.url):
        return file_stamp(slide.url)
    try:
        return stamp(storage.open_image(slide.url))
    except InputError:  # missing or unreadable: the run says why
        return None


def slide_key(slide: Slide, settings: CohortSettings, model_digest: str, found: Any = None) -> str:
    """What a finished slide's outputs depend on: the slide (``found``, its
    :func:`slide_stamp`, read when not given), the model's bytes (not its path) and the
    settings that change values (not the cluster's)."""
    values = settings.model_dump(exclude={"slides", "output", "slides_in_flight", "workers", "scheduler",
                                          "overwrite", "model"})
    found = slide_stamp(slide) if found is None else found
    return blockwise.fingerprint(slide=slide.url, stamp=found, model=model_digest, settings=values)


def read_record(folder: str) -> dict[str, Any] | None:
    """A slide's record (``FOLDER/slide.json``), or None when it has none (or an unreadable one)."""
    url = f"{folder}/{RECORD}"
    try:
        return json.loads("".join(files.iter_lines(url))) if files.exists(url) else None
    except (OSError, ValueError):
        return None


# --- the study -------------------------------------------------------------------------------


class NoCluster(RuntimeError):
    """The shared cluster did not start: the study stops (no slide could run), not a slide."""


class SharedClient:
    """The study's Dask client, started on first use (a rerun with every slide finished
    starts nothing) by whichever slide's thread needs it first; closed on leaving the
    ``with`` block. ``open()`` gives a context manager of a client (e.g.
    :func:`~pipeline.jobs.blockwise.dask_client`); it is entered and left in one context of
    its own, a copy of the creator's (a Client keeps its "current client" in a context
    variable, which must be reset in the context that set it)."""

    def __init__(self, open: Callable[[], contextlib.AbstractContextManager[Any]]):
        self._open, self._lock, self._client = open, threading.Lock(), None
        self._context = contextvars.copy_context()
        self._stack = contextlib.ExitStack()

    def __call__(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._context.run(self._stack.enter_context, self._open())
                except Exception as exc:
                    raise NoCluster(f"the study's Dask cluster did not start: {exc}") from exc
            return self._client

    def __enter__(self) -> "SharedClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._context.run(self._stack.close)
            self._client = None


def run_cohort(settings: CohortSettings, client: Callable[[], Any] | None = None,
               report: SlideRun | None = None, on_slide: Callable[[dict[str, Any]], None] | None = None,
               run_one: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every slide of the study, :attr:`~CohortSettings.slides_in_flight` at a time on one
    shared cluster (``client()``, else a cluster of ``settings``' started on first use);
    returns the rows of the study table, also written to ``ROOT/study.parquet`` and
    ``ROOT/study.csv``. ``on_slide`` sees each row as its slide ends; ``run_one`` replaces
    :func:`run_slide` (the flow runs each slide as a sub-flow)."""
    settings = settings.model_copy(update={"output": storage.absolute(settings.output),
                                           "model": storage.absolute(settings.model)})
    found = list_slides(settings.slides)
    digest = file_digest(settings.model)
    with contextlib.ExitStack() as stack:
        if client is None:
            gpu = resolve_device(settings.device, remote=bool(settings.scheduler)) == "cuda"
            client = stack.enter_context(SharedClient(lambda: blockwise.dask_client(
                settings.scheduler, settings.workers, gpu=gpu, warm="pipeline.jobs.predict")))
        one = run_one or run_slide

        def go(slide: Slide) -> dict[str, Any]:
            row = one(slide, settings, client, digest, report)
            if on_slide is not None:
                on_slide(row)
            return row

        # each slide in a copy of the caller's context (a flow's sub-flows find their parent in it)
        with ThreadPoolExecutor(settings.slides_in_flight, thread_name_prefix="overtile-slide") as pool:
            futures = [pool.submit(contextvars.copy_context().run, go, slide) for slide in found]
            try:
                rows = [f.result() for f in futures]
            except BaseException:  # cancelled or killed: the slides not yet started do not start
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    write_study_table(settings.output, rows)
    return rows


def write_study_table(root: str, rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The study table as ``ROOT/study.parquet`` and ``ROOT/study.csv`` (URLs returned)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = f"{root.rstrip('/')}/{STUDY_TABLE}"
    types = {c: pa.int64() for c in INTEGER_COLUMNS} | {c: pa.float64() for c in FLOAT_COLUMNS}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])
    buffer = io.BytesIO()
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in COLUMNS}, schema=schema), buffer)
    fs, path = fsspec.core.url_to_fs(base + ".parquet")
    files.make_parents(fs, base, path)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{c: "" if r.get(c) is None else r.get(c) for c in COLUMNS} for r in rows])
    files.put_text(base + ".csv", text.getvalue())
    return base + ".parquet", base + ".csv"
