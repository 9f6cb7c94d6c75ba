"""The ``segment`` flow: overlap-tile U-Net inference over a Zarr image, blockwise on Dask.

Stages, each a Prefect task: validate and plan (every input check, the output created or
reopened, the ledger read), run the blocks on Dask (retried: the ledger makes a retry do only
the missing blocks), build the pyramid, report (preview image, summary table). The blocks and
the pyramid share one Dask cluster, started only when there is something to compute. The numerics are
:mod:`pipeline.predict`'s; this module only orchestrates and reports.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import BlockProgress, Cluster, log_plan, on_task_runner_cluster, preview_path, report
from pipeline import execute
from pipeline.errors import BlocksFailed
from pipeline.geometry import Block
from pipeline.predict import PredictJob, PredictSettings, plan_prediction, run_job_blocks, wants_pyramid, write_pyramid
from pipeline.preview import preview_png


@task(name="validate and plan", cache_policy=NO_CACHE)
def plan(settings: PredictSettings) -> tuple[PredictJob, list[Block]]:
    job, blocks, skipped = plan_prediction(settings, remote=on_task_runner_cluster())
    shape = "×".join(map(str, job.spatial_shape))
    log_plan("segment", len(blocks), skipped, f"{job.settings.output} ({shape} px, blocks of "
             f"{'×'.join(map(str, job.block_shape))}, tiles of {job.tile_size} px, device {job.device})")
    if job.tissue:
        get_run_logger().info("segment: tissue mask %s; %d blocks without tissue are not computed", job.tissue, job.background)
    return job, blocks


@task(name="run blocks on Dask", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def run_blocks(job: PredictJob, blocks: list[Block], cluster: Cluster) -> execute.RunSummary:
    """Every planned block the ledger does not mark finished, as one Dask task each. Safe to
    retry: the ledger is read again, so a retry does only what is still missing."""
    start = time.perf_counter()
    done = job.ledger.done()
    todo = [b for b in blocks if not done[b.index]]
    skipped = int(done.sum())
    records: list = []
    failures: list[str] = []
    progress = BlockProgress("segment", len(todo) + skipped, skipped)
    if todo:
        records = run_job_blocks(cluster.client(), job, todo, progress, failures)
    summary = execute.RunSummary(len(todo) + skipped + job.background, skipped, records, time.perf_counter() - start,
                                 failures, job.background)
    if failures:
        raise BlocksFailed(summary)
    return summary


@task(name="build the pyramid", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def pyramid(job: PredictJob, summary: execute.RunSummary, cluster: Cluster) -> int:
    """Downsampled levels under the finished blocks, when blocks were computed now or no
    pyramid exists yet; rewriting a level is safe, so is a retry."""
    if not wants_pyramid(job, summary.done):
        return 0
    levels = write_pyramid(cluster.client(), job)
    get_run_logger().info("segment: wrote %d downsampled levels into the multiscales of %s", levels, job.settings.output)
    return levels


@task(name="report", cache_policy=NO_CACHE)
def summarise(job: PredictJob, summary: execute.RunSummary) -> dict:
    s = job.settings
    png = preview_path(s.output)
    if png is not None and not summary.failed:
        preview_png(s.input, s.output, png, s.axes)
        get_run_logger().info("segment: preview written to %s", png)
    return report("segment", summary, {"input": s.input, "output": s.output, "model": s.model,
                                       "output kind": s.output_kind, "device": job.device,
                                       "tissue mask": job.tissue or "none (every block computed)",
                                       "failed blocks": "; ".join(summary.failed) or "none"}, png)


@flow(name="segment", log_prints=True)
def segment(settings: PredictSettings) -> dict:
    """Segment a Zarr / OME-Zarr image with a U-Net: overlap-tile inference blockwise on Dask,
    written as an OME-Zarr image. A rerun with the same settings resumes from the output's
    ledger; set ``overwrite`` to start over."""
    job, blocks = plan(settings)
    with Cluster(job.settings.scheduler, job.settings.workers, job.device == "cuda") as cluster:
        try:
            summary = run_blocks(job, blocks, cluster)
        except BlocksFailed as exc:
            summarise(job, exc.summary)
            raise
        pyramid(job, summary, cluster)
    return summarise(job, summary)


if __name__ == "__main__":  # pragma: no cover - a quick way to try the flow by hand
    import sys

    segment(PredictSettings.model_validate_json(sys.argv[1]))
