"""The ``weight-maps`` flow: the paper's training weight maps (eq. 2) blockwise on Dask.

Stages: validate and plan (the labels and the output, before any cluster starts), run the
blocks (the global class-frequency pass and the instance labelling of binary masks, each done
once and kept in the output, then one Dask task per block; retried, and the ledger makes a
retry do only the missing blocks), report (a picture like the paper's Figure 3 and a summary
table). The numerics are :mod:`pipeline.jobs.weights`'s; the stages are :mod:`flows.common`'s.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import log_plan, preview_path, report, run_job
from pipeline.jobs.blockwise import Pending, RunSummary
from pipeline.jobs.weights import WeightJob, WeightSettings, plan_weights
from pipeline.preview import weights_png


@task(name="validate and plan", cache_policy=NO_CACHE)
def plan(settings: WeightSettings) -> tuple[WeightJob, Pending]:
    job, planned = plan_weights(settings)
    s = job.settings
    log_plan("weight-maps", len(planned.blocks), planned.skipped,
             f"{job.output} ({'binary' if s.binary else 'instance'} labels {s.labels} of shape "
             f"{'×'.join(map(str, job.spatial_shape))}, w0 = {s.w0:g}, sigma = {s.sigma:g}, halo "
             f"{'×'.join(map(str, job.halo))} px)")
    if job.class_weights is not None:
        get_run_logger().info("weight-maps: class weights %.3f (background), %.3f (cells), from an earlier run",
                              *job.class_weights)
    return job, planned


@task(name="report", cache_policy=NO_CACHE)
def summarise(job: WeightJob, summary: RunSummary) -> dict:
    s = job.settings
    png = preview_path(s.output)
    if png is not None and not summary.failed:
        weights_png(job.labels_url, s.output, png, job.labels_axes)
        get_run_logger().info("weight-maps: picture written to %s", png)
    rows = {"labels": s.labels, "output": s.output, "w0": s.w0, "sigma": s.sigma,
            "binary mask": s.binary, "failed blocks": "; ".join(summary.failed) or "none"}
    if job.class_weights is not None:
        rows["class weights (background, cells)"] = ", ".join(f"{w:.3f}" for w in job.class_weights)
    return report("weight-maps", summary, rows, png)


@flow(name="weight-maps", log_prints=True)
def weight_maps_flow(settings: WeightSettings) -> dict:
    """Compute the U-Net paper's weight maps (class balance plus the border term that
    separates touching cells) for a label image, blockwise on Dask, as an OME-Zarr image.
    A rerun resumes from the output's ledger; set ``overwrite`` to start over."""
    job, planned = plan(settings)
    return run_job("weight-maps", job, planned, summarise)


if __name__ == "__main__":  # pragma: no cover - a quick way to try the flow by hand
    import sys

    weight_maps_flow(WeightSettings.model_validate_json(sys.argv[1]))
