"""The ``train`` flow: train a U-Net from Zarr images and labels, as the paper does.

Stages: validate and plan (every input check; nothing written), train (one long task that
updates a progress artifact and logs the running loss and validation scores; a retry resumes
from ``last.pt``, so no finished step is lost), report (the loss and validation curves and a
table of the best scores). The numerics are :mod:`pipeline.train`'s.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.common import png_markdown
from pipeline.jobs.train import (
    TrainJob,
    TrainSettings,
    TrainSummary,
    plan_training,
    train,
)
from pipeline.numerics.unet import num_parameters


@task(name="validate and plan", cache_policy=NO_CACHE)
def plan(settings: TrainSettings) -> TrainJob:
    """Every check, the model built (or read back to resume), one pass over the training
    labels; the job the training stage then runs (nothing is planned twice)."""
    job = plan_training(settings)
    get_run_logger().info(
        "train: a %d-D %s U-Net (depth %d, %d base channels, %s parameters) on %s, %d steps of %s from step %d; "
        "checkpoints and curves in %s", job.model.dims, settings.padding, settings.depth, settings.base_channels,
        f"{num_parameters(job.model):,}", settings.images, settings.steps, settings.optimizer, job.start, job.out)
    for warning in job.warnings:
        get_run_logger().warning("train: %s", warning)
    return job


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def fit(settings: TrainSettings, job: TrainJob) -> TrainSummary:
    """The training loop of the planned job; a retry plans again and resumes from
    ``OUT/last.pt`` (the same trajectory)."""
    logger = get_run_logger()
    if runtime.task_run.run_count > 1:
        job = None  # the planned model was trained in place: plan again
        if (Path(settings.out) / "last.pt").exists():
            logger.info("train: retry %d resumes from %s", runtime.task_run.run_count - 1, Path(settings.out) / "last.pt")
            settings = settings.model_copy(update={"resume": True, "overwrite": False})
    progress = create_progress_artifact(0.0, key="train-progress", description="overtile train: share of steps done")
    last = {"log": time.perf_counter(), "artifact": 0.0}

    def on_step(row: dict) -> None:
        now = time.perf_counter()
        if "rand_error" in row:
            logger.info("train: step %d, loss %.4f; validation: Rand error %.4f, pixel error %.4f, IoU %.4f",
                        row["step"], row["loss"], row["rand_error"], row["pixel_error"], row["iou"])
        elif now - last["log"] > 30:
            logger.info("train: step %d of %d, loss %.4f, %.0f s", row["step"], settings.steps, row["loss"], row["seconds"])
            last["log"] = now
        if now - last["artifact"] > 2 or "rand_error" in row:  # a few updates a second is plenty
            update_progress_artifact(progress, 100.0 * row["step"] / settings.steps)
            last["artifact"] = now

    summary = train(settings, on_step=on_step, job=job)
    update_progress_artifact(progress, 100.0 * summary.step / settings.steps)
    return summary


@task(name="report", cache_policy=NO_CACHE)
def summarise(settings: TrainSettings, summary: TrainSummary) -> dict:
    out = summary.out
    table = {
        "steps": f"{summary.start + 1}-{summary.step}" if summary.step > summary.start else "none (already finished)",
        "seconds": round(summary.seconds, 1),
        "last loss": None if summary.loss is None else round(summary.loss, 4),
        "best step (validation)": summary.best_step,
        **{f"best {k.replace('_', ' ')}": round(v, 4) for k, v in summary.best.items() if isinstance(v, float)},
        "images": settings.images,
        "labels": settings.labels,
        "last checkpoint": str(out / "last.pt"),
        "best checkpoint": str(out / "best.pt"),
        "log": str(out / "log.csv"),
    }
    create_table_artifact([{"what": k, "value": str(v)} for k, v in table.items()], key="train-summary",
                          description="overtile train: what this run did and its best validation scores")
    curves = out / "curves.png"
    if curves.exists():
        create_markdown_artifact(png_markdown("train: loss and validation curves", curves, f"`{curves}`"),
                                 key="train-curves", description="overtile train: loss and validation curves")
    get_run_logger().info("train: done at step %d; the model is %s (best: %s)", summary.step, out / "last.pt", out / "best.pt")
    return table


@flow(name="train", log_prints=True)
def train_flow(settings: TrainSettings) -> dict:
    """Train a U-Net on Zarr images and labels with the paper's weighted loss and elastic
    deformation; checkpoints, a CSV log and curves go to ``out``. Set ``resume`` to continue
    a run, ``overwrite`` to start over."""
    job = plan(settings)
    summary = fit(settings, job)
    return summarise(settings, summary)
