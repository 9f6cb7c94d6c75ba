"""The ``segment`` flow: overlap-tile U-Net inference over a Zarr image, blockwise on Dask.

Stages, each a Prefect task: validate and plan (every input check, the output created or
reopened, the ledger read), run the blocks on Dask (retried: the ledger makes a retry do only
the missing blocks), build the pyramid, report (preview image, summary table). The blocks and
the pyramid share one Dask cluster, started only when there is something to compute. The
numerics are :mod:`pipeline.jobs.predict`'s; the stages are :mod:`flows.common`'s.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import log_plan, on_task_runner_cluster, preview_path, report, run_job
from pipeline.jobs.blockwise import Pending, RunSummary
from pipeline.jobs.predict import (
    PredictJob,
    PredictSettings,
    compile_report,
    plan_prediction,
)
from pipeline.preview import preview_png


@task(name="validate and plan", cache_policy=NO_CACHE)
def plan(settings: PredictSettings) -> tuple[PredictJob, Pending]:
    job, planned = plan_prediction(settings, remote=on_task_runner_cluster())
    shape = "×".join(map(str, job.spatial_shape))
    log_plan("segment", len(planned.blocks), planned.skipped, f"{job.output} ({shape} px, blocks of "
             f"{'×'.join(map(str, job.block_shape))}, tiles of {job.tile_size} px, device {job.device})")
    if job.tissue:
        get_run_logger().info("segment: tissue mask %s; %d blocks without tissue are not computed", job.tissue,
                              planned.background)
    return job, planned


@task(name="report", cache_policy=NO_CACHE)
def summarise(job: PredictJob, summary: RunSummary) -> dict:
    s = job.settings
    png = preview_path(s.output)
    if png is not None and not summary.failed:
        preview_png(s.input, s.output, png, s.axes)
        get_run_logger().info("segment: preview written to %s", png)
    return report("segment", summary, {"input": s.input, "output": s.output, "model": s.model,
                                       "output kind": s.output_kind, "device": job.device,
                                       "compiled model": compile_report(summary.records) if job.compile and summary.records
                                       else "no (eager)",
                                       "tissue mask": job.tissue or "none (every block computed)",
                                       "failed blocks": "; ".join(summary.failed) or "none"}, png)


@flow(name="segment", log_prints=True)
def segment(settings: PredictSettings) -> dict:
    """Segment a Zarr / OME-Zarr image with a U-Net: overlap-tile inference blockwise on Dask,
    written as an OME-Zarr image. A rerun with the same settings resumes from the output's
    ledger; set ``overwrite`` to start over."""
    job, planned = plan(settings)
    return run_job("segment", job, planned, summarise)


if __name__ == "__main__":  # pragma: no cover - a quick way to try the flow by hand
    import sys

    segment(PredictSettings.model_validate_json(sys.argv[1]))
