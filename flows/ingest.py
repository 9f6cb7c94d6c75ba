"""The ``ingest`` flow: a slide (SVS, NDPI, OME-TIFF, TIFF, PNG, JPEG) to OME-Zarr, blockwise.

Stages, each a Prefect task: validate and plan (the slide opened and checked, a truncated
file refused, the output created or reopened with every pyramid level, the ledger read),
copy the blocks on Dask (retried: the ledger makes a retry do only the missing blocks),
report (a summary table). The reading and writing are :mod:`pipeline.jobs.ingest`'s; the
stages are :mod:`flows.common`'s.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import Cluster, log_plan, report, run_job
from pipeline.jobs.blockwise import Pending, RunSummary
from pipeline.jobs.ingest import IngestJob, IngestSettings, copies_here, plan_ingest


@task(name="validate and plan", cache_policy=NO_CACHE)
def plan(settings: IngestSettings) -> tuple[IngestJob, Pending]:
    job, planned = plan_ingest(settings)
    shapes = ", ".join("×".join(map(str, lv.shape[1:])) for lv in job.levels)
    log_plan("ingest", len(planned.blocks), planned.skipped, f"{job.output} ({job.format} slide, {len(job.levels)} "
             f"level(s) of {shapes} px, blocks of {'×'.join(map(str, job.levels[0].chunks[1:]))})")
    return job, planned


@task(name="report", cache_policy=NO_CACHE)
def summarise(job: IngestJob, summary: RunSummary) -> dict:
    s = job.settings
    level0 = job.levels[0]
    size = ", ".join(f"{a} {v:g} {job.units[a]}" for a, v in zip(job.axes[1:], level0.scale[1:]) if a in job.units)
    return report("ingest", summary, {
        "slide": s.slide, "format": job.format, "output": s.output,
        "levels": "; ".join("×".join(map(str, lv.shape)) for lv in job.levels),
        "axes": job.axes, "dtype": job.dtype, "pixel size": size or "unknown",
        "failed blocks": "; ".join(summary.failed) or "none",
    })


@flow(name="ingest", log_prints=True)
def ingest_flow(settings: IngestSettings) -> dict:
    """Convert a whole-slide image (or a PNG / JPEG) to an OME-Zarr image with every pyramid
    level the file has, blockwise on Dask. A rerun with the same settings resumes from the
    output's ledger; set ``overwrite`` to start over."""
    job, planned = plan(settings)
    with Cluster(settings.scheduler, settings.workers, in_process=copies_here(settings)) as cluster:
        return run_job("ingest", job, planned, summarise, cluster)


if __name__ == "__main__":  # pragma: no cover - a quick way to try the flow by hand
    import sys

    ingest_flow(IngestSettings.model_validate_json(sys.argv[1]))
