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

from flows.common import Cluster, log_plan, on_task_runner_cluster, preview_path, report, run_job
from pipeline.errors import InputError
from pipeline.jobs.blockwise import Pending, RunSummary
from pipeline.jobs.objects import ObjectJob, ObjectOptions, ObjectSettings, plan_objects
from pipeline.jobs.predict import (
    PredictJob,
    PredictSettings,
    compile_report,
    plan_prediction,
)
from pipeline.preview import objects_png, preview_png
from pipeline.storage import files


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
                                       "model kind": job.model.summary(), "tiles": job.model.tiling,
                                       "test-time augmentation": job.augmentation or "none",
                                       "output kind": s.output_kind, "device": job.device,
                                       "compiled model": compile_report(summary.records) if job.compile and summary.records
                                       else "no (eager)",
                                       "tissue mask": job.tissue or "none (every block computed)",
                                       "failed blocks": "; ".join(summary.failed) or "none"}, png)


@task(name="plan the objects", cache_policy=NO_CACHE)
def plan_cells(settings: ObjectSettings) -> tuple[ObjectJob, Pending]:
    job, planned = plan_objects(settings)
    log_plan("objects", len(planned.blocks), planned.skipped, f"{job.output} (objects of class "
             f"{settings.object_class} in {settings.probabilities})")
    return job, planned


@task(name="report the objects", cache_policy=NO_CACHE)
def summarise_objects(job: ObjectJob, summary: RunSummary) -> dict:
    s = job.settings
    png = preview_path(s.output)
    if png is not None and not summary.failed:  # a finished run always has a table, empty or not
        areas = files.read_parquet(job.table)["area_px"]
        objects_png(s.image, s.output, areas, png, s.axes)
        get_run_logger().info("objects: outlines and sizes drawn in %s", png)
    return report("objects", summary, {"objects": job.objects, "labels": s.output, "object table (Parquet)": job.table,
                                       "QuPath outlines (GeoJSON)": s.geojson or "not asked for",
                                       "rule": f"seeds: P(class {s.object_class}) > {s.threshold}; grown "
                                               f"{s.grow_distance} px over "
                                               f"{'any pixel' if s.grow_threshold is None else f'P > {s.grow_threshold}'}"
                                               f"; min size {s.min_size} px",
                                       "failed blocks": "; ".join(summary.failed) or "none"}, png)


@flow(name="segment", log_prints=True)
def segment(settings: PredictSettings, objects: ObjectOptions | None = None) -> dict:
    """Segment a Zarr / OME-Zarr image with a U-Net: overlap-tile inference blockwise on Dask,
    written as an OME-Zarr image. With ``objects``, then the cells as objects: instance labels,
    an object table and (optionally) QuPath outlines, on the same cluster. A rerun with the
    same settings resumes from the outputs' ledgers; set ``overwrite`` to start over."""
    if objects is not None and settings.output_kind != "probabilities":
        raise InputError("objects are found in probabilities: run the segment flow with output_kind 'probabilities'")
    job, planned = plan(settings)
    with Cluster(settings.scheduler, settings.workers, job.gpu) as cluster:
        result = run_job("segment", job, planned, summarise, cluster)
        if objects is not None:
            cells, todo = plan_cells(ObjectSettings.after_prediction(objects, settings))
            result["objects"] = run_job("objects", cells, todo, summarise_objects, cluster)
    return result


if __name__ == "__main__":  # pragma: no cover - a quick way to try the flow by hand
    import sys

    segment(PredictSettings.model_validate_json(sys.argv[1]))
