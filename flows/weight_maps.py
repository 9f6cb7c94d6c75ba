"""The ``weight-maps`` flow: the paper's training weight maps (eq. 2) blockwise on Dask.

Stages: validate (the labels and the output, before any cluster starts), run the blocks
(the global class-frequency pass, instance labelling of binary masks, then one Dask task per
block; retried, and the ledger makes a retry do only the missing blocks), report (a picture
like the paper's Figure 3 and a summary table). The numerics are :mod:`pipeline.weightmaps`'s.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import BlockProgress, dask_client, log_plan, preview_path, report
from pipeline import execute, storage
from pipeline.errors import BlocksFailed
from pipeline.preview import weights_png
from pipeline.weightmaps import WeightJob, WeightSettings, open_labels, weight_maps


@task(name="validate", cache_policy=NO_CACHE)
def validate(settings: WeightSettings) -> WeightSettings:
    settings = settings.model_copy(update={"labels": storage.absolute(settings.labels),
                                           "output": storage.absolute(settings.output)})
    source = open_labels(settings)  # an empty array is refused here already
    storage.check_output(settings.output, source.spatial_shape, "float32", settings.overwrite)
    get_run_logger().info("weight-maps: %s, %s labels of shape %s -> %s (w0 = %g, sigma = %g)", settings.labels,
                          "binary" if settings.binary else "instance", "×".join(map(str, source.spatial_shape)),
                          settings.output, settings.w0, settings.sigma)
    return settings


@task(name="run blocks on Dask", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def run_blocks(settings: WeightSettings) -> tuple[WeightJob, execute.RunSummary]:
    """Global pass, then every block the ledger does not mark finished; safe to retry."""
    progress: list[BlockProgress] = []

    def on_plan(job: WeightJob, todo: int, skipped: int) -> None:
        log_plan("weight-maps", todo, skipped, job.settings.output)
        get_run_logger().info("weight-maps: class weights %.3f (background), %.3f (cells); halo %s px",
                              *job.class_weights, "×".join(map(str, job.halo)))
        progress.append(BlockProgress("weight-maps", todo + skipped, skipped))

    failures: list[str] = []
    with dask_client(settings.scheduler, settings.workers) as client:
        job, summary = weight_maps(settings, client, on_result=lambda r: progress[0](r), on_plan=on_plan, failures=failures)
    if failures:
        raise BlocksFailed(summary)
    return job, summary


@task(name="report", cache_policy=NO_CACHE)
def summarise(settings: WeightSettings, job: WeightJob | None, summary: execute.RunSummary) -> dict:
    png = preview_path(settings.output)
    if png is not None and job is not None and not summary.failed:
        weights_png(job.labels_url, settings.output, png, job.labels_axes)
        get_run_logger().info("weight-maps: picture written to %s", png)
    rows = {"labels": settings.labels, "output": settings.output, "w0": settings.w0, "sigma": settings.sigma,
            "binary mask": settings.binary, "failed blocks": "; ".join(summary.failed) or "none"}
    if job is not None:
        rows["class weights (background, cells)"] = ", ".join(f"{w:.3f}" for w in job.class_weights)
    return report("weight-maps", summary, rows, png)


@flow(name="weight-maps", log_prints=True)
def weight_maps_flow(settings: WeightSettings) -> dict:
    """Compute the U-Net paper's weight maps (class balance plus the border term that
    separates touching cells) for a label image, blockwise on Dask, as an OME-Zarr image.
    A rerun resumes from the output's ledger; set ``overwrite`` to start over."""
    settings = validate(settings)
    try:
        job, summary = run_blocks(settings)
    except BlocksFailed as exc:
        summarise(settings, None, exc.summary)
        raise
    return summarise(settings, job, summary)
