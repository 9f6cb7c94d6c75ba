"""Slide ingest: a slide (SVS, NDPI, OME-TIFF, TIFF, PNG, JPEG) to an OME-Zarr 0.5 image with
every pyramid level the file has, block by block.

The shape of :mod:`pipeline.jobs.blockwise`: plan (the slide opened and checked, the output
created with every level, the ledger read), then one task per chunk-aligned block of every
level. Memory is bounded by the block size, not by the slide, and the ledger makes reruns
resume. Blocks are copied in this process one at a time unless a cluster is asked for.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterator, Literal

import zarr
from pydantic import Field, field_validator

from pipeline import storage
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.numerics.geometry import Box, block_grid, iter_blocks
from pipeline.storage.slides import Slide, open_slide
from pipeline.storage.sources import file_stamp


class IngestSettings(blockwise.BlockwiseSettings):
    """What a conversion of a slide to OME-Zarr needs; shared by the CLI, the API and the flow."""

    slide: str = Field(description="Slide or picture to convert: SVS, NDPI, OME-TIFF or another (pyramidal) TIFF, PNG or JPEG")
    output: str = Field(description="OME-Zarr image to write (path or URL)")
    levels: Literal["all"] | Annotated[int, Field(ge=1)] = Field("all", description="Pyramid levels to write: all the file has, or the first N")
    axes: blockwise.Axes = Field(None, description="Axes of a TIFF stack whose axes tifffile cannot name, e.g. zyx")
    block_size: blockwise.BlockSize = None
    workers: int | None = Field(None, ge=1, description="Copy blocks on a local Dask cluster of this many processes (default: in this process, one block at a time)")
    scheduler: blockwise.Scheduler = None
    overwrite: blockwise.Overwrite = False


    @field_validator("levels", mode="before")
    @classmethod
    def _all_or_count(cls, v: Any) -> Any:
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        if isinstance(v, str) and v.isdigit() and int(v) >= 1:
            return int(v)
        raise ValueError(f"{v!r}: expected 'all' or a number of levels from 1 up")


@dataclass(frozen=True)
class IngestLevel:
    """One output level: array ``str(level)`` of the OME-Zarr group, axes ``c`` + spatial."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]  # a pixel of a lower level averages level-0 pixels: their centre


@dataclass(frozen=True)
class LevelBlock:
    """One chunk-aligned block of one pyramid level; ``index`` is its place in the ledger
    (one flat ledger over the blocks of all levels, level 0's first)."""

    level: int
    write: Box
    index: tuple[int]
    grid_key: str

    @property
    def key(self) -> str:
        return f"{self.level}-{self.grid_key}"


@dataclass(frozen=True)
class IngestJob(blockwise.BlockwiseJob):
    """A planned conversion: what every block task needs, small enough to send with each."""

    kind: ClassVar[str] = "ingest"

    settings: IngestSettings
    format: str
    axes: str
    dtype: str
    levels: tuple[IngestLevel, ...]
    units: dict[str, str]

    def blocks(self) -> Iterator[LevelBlock]:
        number = 0
        for i, level in enumerate(self.levels):
            for b in iter_blocks(level.shape[1:], level.chunks[1:]):
                yield LevelBlock(i, b.write, (number,), b.key)
                number += 1

    def run_block(self, block: LevelBlock) -> dict[str, Any]:
        """Copy one block with the slide opened once per worker process."""
        return copy_block(cached_slide(self.settings.slide, self.settings.axes), block, self)


def plan_ingest(settings: IngestSettings) -> tuple[IngestJob, blockwise.Pending]:
    """Check the slide and the output, create or reopen the output, read the ledger.

    Returns the job and what is pending. Every check that can fail on user input happens
    before the output is touched.
    """
    settings = blockwise.absolute_paths(settings, "slide", "output")
    with open_slide(settings.slide, settings.axes) as slide:
        storage.checked_source(settings.slide, slide.levels[0], slide.axes, slide.pixel_size, slide.units)
        n = len(slide.levels) if settings.levels == "all" else settings.levels
        if n > len(slide.levels):
            raise InputError(f"--levels {n}: {settings.slide} has {len(slide.levels)} pyramid level(s)")
        spatial = slide.spatial_axes
        block = settings.block_size or (2048 if len(spatial) == 2 else 256)
        levels = []
        for i in range(n):
            shape = (slide.channels, *slide.spatial_shape(i))
            chunks = (slide.channels, *(min(block, s) for s in shape[1:]))
            scale = (1.0, *slide.scale(i).values())
            centre = storage.level_translation(levels[0].scale if levels else scale, [0.0] * len(scale),
                                               (1.0, *slide.downsample(i)), "mean")
            levels.append(IngestLevel(shape, chunks, scale, tuple(centre)))
        kind, units, stored_axes = slide.kind, dict(slide.units), slide.axes
        dtype = slide.dtype.newbyteorder("=").name  # stored native, whatever the TIFF's byte order
    axes = "c" + spatial
    existed = storage.check_output(settings.output, levels[0].shape, dtype, settings.overwrite, reads=(settings.slide,))
    run = blockwise.fingerprint(slide=settings.slide, stamp=file_stamp(settings.slide), axes=stored_axes,
                      levels=[(lv.shape, lv.chunks) for lv in levels], dtype=dtype)
    name = Path(settings.slide.rstrip("/")).name
    storage.create_image(
        settings.output, levels[0].shape, levels[0].chunks, dtype, axes, name=name, scale=levels[0].scale,
        units=units, overwrite=settings.overwrite,
        attrs={"overtile": {"slide": settings.slide, "format": kind, "levels": n}},
    )
    total = sum(math.prod(block_grid(lv.shape[1:], lv.chunks[1:])) for lv in levels)
    ledger = storage.Ledger.prepare(settings.output, (total,), run, overwrite=settings.overwrite or not existed)
    group = zarr.open_group(store=settings.output, mode="r+")
    fill = group["0"].fill_value  # as create_image chose for level 0
    for i, lv in enumerate(levels[1:], start=1):
        if str(i) not in group:
            group.create_array(str(i), shape=lv.shape, chunks=lv.chunks, dtype=dtype, fill_value=fill,
                               dimension_names=list(axes), compressors=[storage.OUTPUT_CODEC])
    group.attrs["ome"] = {"version": storage.OME_VERSION,
                          "multiscales": [storage.multiscales(axes, [lv.scale for lv in levels], name, units,
                                                                [lv.translation for lv in levels])]}
    job = IngestJob(output=settings.output, ledger=ledger, fingerprint=run, settings=settings, format=kind, axes=axes,
                    dtype=dtype, levels=tuple(levels), units=units)
    return job, job.pending()


_OUTPUTS: dict[tuple[str, str], zarr.Array] = {}


def _output(url: str, fingerprint: str) -> zarr.Array:
    """An output array opened once per process and run. Keyed by the run's fingerprint as
    well as the URL: an array object keeps the metadata it was opened with, so after an
    ``overwrite`` with other blocks in the same process it would write the old chunk grid."""
    key = (url, fingerprint)
    if key not in _OUTPUTS:
        _OUTPUTS[key] = zarr.open_array(store=url, mode="r+")
    return _OUTPUTS[key]


def copy_block(slide: Slide, block: LevelBlock, job: IngestJob) -> dict[str, Any]:
    """Read one block of one level from the slide, write it to the output, mark it done."""
    watch = blockwise.Stopwatch()
    with watch("read"):
        data = slide.read(block.write, block.level)
    with watch("write"):
        _output(f"{job.settings.output.rstrip('/')}/{block.level}", job.fingerprint)[
            (slice(None), *block.write.slices())] = data
        _output(job.ledger.url, job.fingerprint)[block.index] = 1  # Ledger.mark, minus its per-URL cache
    return {"block": block.key, "level": block.level, "pixels": block.write.size, "worker_pid": os.getpid(),
            **{f"{k}_s": v for k, v in watch.seconds.items()}}


_SLIDES: dict[tuple[Any, ...], Slide] = {}
_SLIDES_LOCK = threading.Lock()


def cached_slide(url: str, axes: str | None) -> Slide:
    """The slide, opened once per worker process and kept (one at a time); the task slots of
    a worker share it (tifffile locks its file handle around reads)."""
    key = (url, axes, *file_stamp(url))
    with _SLIDES_LOCK:
        slide = _SLIDES.get(key)
        if slide is None:
            slide = open_slide(url, axes)
            for old in _SLIDES.values():
                old.close()
            _SLIDES.clear()
            _SLIDES[key] = slide
        return slide


def ingest(
    settings: IngestSettings,
    client: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_plan: Callable[[IngestJob, blockwise.Pending], None] | None = None,
) -> tuple[IngestJob, blockwise.RunSummary]:
    """Convert a slide to an OME-Zarr image with all its pyramid levels; the Python entry
    point behind ``overtile ingest``.

    Blocks are copied in this process one at a time (memory: one block plus the tiles it
    touches), or as Dask tasks when a ``client``, ``settings.scheduler``
    or ``settings.workers`` is given. A rerun resumes from the ledger.

    Examples
    --------
    >>> job, summary = ingest(IngestSettings(slide="CMU-1.svs", output="CMU-1.zarr"))  # doctest: +SKIP
    >>> [lv.shape for lv in job.levels]  # doctest: +SKIP
    [(3, 32914, 46000), (3, 8228, 11500), (3, 2057, 2875)]
    """
    return blockwise.execute(plan_ingest, settings, client, on_plan, on_result,
                             in_process=client is None and copies_here(settings))


def copies_here(settings: IngestSettings) -> bool:
    """Whether a slide is copied in the calling process: unless its run names a scheduler or
    workers (a slide is often readable only here; OVERTILE_SCHEDULER does not send it away)."""
    return settings.scheduler is None and settings.workers is None
