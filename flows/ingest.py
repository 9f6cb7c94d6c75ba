"""The ``ingest`` flow: a slide (SVS, NDPI, OME-TIFF, TIFF, PNG, JPEG) to OME-Zarr, blockwise.

Stages, each a Prefect task: validate and plan (the slide opened and checked, a truncated
file refused, the output created or reopened with every pyramid level, the ledger read),
copy the blocks on Dask (retried: the ledger makes a retry do only the missing blocks),
report (a summary table). The reading and writing are :mod:`pipeline.slides`'s; this module
only orchestrates and reports.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import BlockProgress, dask_client, log_plan, report
from pipeline import execute
from pipeline.errors import BlocksFailed
from pipeline.slides import IngestJob, IngestSettings, ingest_block, plan_ingest


@task(name="validate and plan", cache_policy=NO_CACHE)
def plan(settings: IngestSettings) -> IngestJob:
    job, blocks, skipped = plan_ingest(settings)
    shapes = ", ".join("×".join(map(str, lv.shape[1:])) for lv in job.levels)
    log_plan("ingest", len(blocks), skipped, f"{job.settings.output} ({job.kind} slide, {len(job.levels)} "
             f"level(s) of {shapes} px, blocks of {'×'.join(map(str, job.levels[0].chunks[1:]))})")
    return job


@task(name="run blocks on Dask", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def run_blocks(job: IngestJob) -> execute.RunSummary:
    """Every block (of every level) the ledger does not mark finished, as one Dask task each.

    Safe to retry: it reads the ledger again, so a retry does only what is still missing.
    """
    start = time.perf_counter()
    s = job.settings
    blocks, skipped = job.pending()
    records: list = []
    failures: list[str] = []
    if blocks:
        progress = BlockProgress("ingest", len(blocks) + skipped, skipped)
        with dask_client(s.scheduler, s.workers) as client:
            records = execute.run_blocks(client, ingest_block, blocks, job, name=job.name, on_result=progress,
                                         failures=failures)
    summary = execute.RunSummary(total=len(blocks) + skipped, skipped=skipped, records=records,
                                 seconds=time.perf_counter() - start, failed=failures)
    if failures:
        raise BlocksFailed(summary)
    return summary


@task(name="report", cache_policy=NO_CACHE)
def summarise(job: IngestJob, summary: execute.RunSummary) -> dict:
    s = job.settings
    level0 = job.levels[0]
    size = ", ".join(f"{a} {v:g} {job.units[a]}" for a, v in zip(job.axes[1:], level0.scale[1:]) if a in job.units)
    return report("ingest", summary, {
        "slide": s.slide, "format": job.kind, "output": s.output,
        "levels": "; ".join("×".join(map(str, lv.shape)) for lv in job.levels),
        "axes": job.axes, "dtype": job.dtype, "pixel size": size or "unknown",
        "failed blocks": "; ".join(summary.failed) or "none",
    })


@flow(name="ingest", log_prints=True)
def ingest_flow(settings: IngestSettings) -> dict:
    """Convert a whole-slide image (or a PNG / JPEG) to an OME-Zarr image with every pyramid
    level the file has, blockwise on Dask. A rerun with the same settings resumes from the
    output's ledger; set ``overwrite`` to start over."""
    job = plan(settings)
    try:
        summary = run_blocks(job)
    except BlocksFailed as exc:
        summarise(job, exc.summary)
        raise
    return summarise(job, summary)


if __name__ == "__main__":  # pragma: no cover - a quick way to try the flow by hand
    import sys

    ingest_flow(IngestSettings.model_validate_json(sys.argv[1]))
