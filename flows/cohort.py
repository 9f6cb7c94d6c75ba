"""The ``cohort`` flow: a study of slides through one model, each slide a sub-flow run.

The slides (a folder, glob or CSV manifest, local or on object storage) share one Dask
cluster, started when the first unfinished slide needs it; several slides are in flight at
once (:mod:`pipeline.jobs.cohort`). Each unfinished slide is a ``cohort-slide`` sub-flow run
named after it, with its own summary artifact; a failed slide fails its sub-flow run, not
the study. The study's run shows a progress artifact (slides and blocks) and the study table.
Finished slides are skipped without opening them; ``cohort-slide`` is a deployment of its
own, so one slide can be rerun alone from the UI with the study's settings.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.states import Failed, State

from flows.common import dask_client
from pipeline.errors import InputError
from pipeline.jobs.cohort import (
    COLUMNS,
    CohortSettings,
    SharedClient,
    Slide,
    SlideRun,
    finished_before,
    list_slides,
    read_record,
    run_cohort,
    run_slide,
    slide_key,
)
from pipeline.jobs.inference import resolve_device
from pipeline.storage import absolute


# The cohort run's client by its scheduler's address: its sub-flow runs (same process) use it
# rather than connecting anew (a SLURM cluster's TLS certificate is the client's alone); and
# what the study reports as blocks are planned and computed (its progress artifact).
_STUDY_CLIENTS: dict[str, Any] = {}
_STUDY_REPORTS: dict[str, SlideRun] = {}
_REGISTRY_LOCK = threading.Lock()


@flow(name="cohort-slide", flow_run_name="{name}", log_prints=True)
def cohort_slide(slide: str, name: str, settings: CohortSettings) -> dict[str, Any]:
    """One slide of a study into ``OUTPUT/NAME``: read in place or ingested, tissue mask,
    prediction, objects when asked. Runs on ``settings.scheduler`` (the study's cluster when
    the cohort flow calls it), else on a local cluster of its own. Fails when the slide does."""
    logger = get_run_logger()
    # paths as the study's run made them: a slide's key holds them, so a rerun of one slide from
    # the UI with relative paths finds what the study finished instead of making it again
    slide = absolute(slide)
    settings = settings.model_copy(update={"output": absolute(settings.output), "model": absolute(settings.model)})
    with _REGISTRY_LOCK:
        study = _STUDY_CLIENTS.get(settings.scheduler or "")  # the cohort run's own client, in this process
        report = _STUDY_REPORTS.get(settings.scheduler or "") or SlideRun()

    def on_plan(name: str, job: Any, pending: Any) -> None:
        _log_plan(name, job, pending)
        if report.on_plan is not None:
            report.on_plan(name, job, pending)

    with SharedClient(lambda: contextlib.nullcontext(study) if study is not None
                      else dask_client(settings.scheduler, settings.workers, _gpu(settings))) as client:
        row = run_slide(Slide(slide, name), settings, client, report=SlideRun(on_plan, report.on_block))
    create_table_artifact([{"what": k, "value": "" if row.get(k) is None else str(row[k])} for k in COLUMNS],
                          key="slide-summary", description=f"overtile cohort: slide {name}")
    if row["status"] == "failed":
        raise InputError(row["error"])
    logger.info("%s: %s in %.1f s; %s blocks computed, %s skipped (finished earlier), %s without tissue%s", name,
                row["status"], row["seconds"] or 0.0, row["blocks_computed"], row["blocks_skipped"],
                row["blocks_without_tissue"], "" if row["objects"] is None else f"; {row['objects']} objects")
    return row


def _gpu(settings: CohortSettings) -> bool:
    """Whether the slides' blocks run on GPU workers (a local cluster then has several per GPU)."""
    return resolve_device(settings.device, remote=bool(settings.scheduler)) == "cuda"


def _log_plan(name: str, job: Any, pending: Any) -> None:
    get_run_logger().info("%s: %s: %d blocks to compute, %d finished before, %d without tissue", name, job.kind,
                          len(pending.blocks), pending.skipped, pending.background)


class StudyProgress:
    """Two progress artifacts of the study's run: slides ended, and blocks computed of those
    planned so far (slides plan as they start, so the blocks' total grows)."""

    def __init__(self, slides: int):
        self.slides, self.ended, self.planned, self.computed = max(1, slides), 0, 0, 0
        self._lock = threading.Lock()  # the slides in flight report from their own threads
        self.slide_id = create_progress_artifact(0.0, key="cohort-slides",
                                                 description="overtile cohort: share of the study's slides ended")
        self.block_id = create_progress_artifact(0.0, key="cohort-blocks",
                                                 description="overtile cohort: blocks computed of those planned so far")

    def slide_ended(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.ended += 1
            share = 100.0 * self.ended / self.slides
        update_progress_artifact(self.slide_id, share)
        get_run_logger().info("cohort: [%d/%d] %s: %s%s", self.ended, self.slides, row["name"], row["status"],
                              f" ({row['error']})" if row.get("error") else "")

    def planned_blocks(self, name: str, job: Any, pending: Any) -> None:
        with self._lock:
            self.planned += len(pending.blocks)

    def block_done(self, name: str, record: dict[str, Any]) -> None:
        with self._lock:
            self.computed += 1
            share = 100.0 * self.computed / max(1, self.planned)
            due = self.computed % max(1, self.planned // 50) == 0
        if due:
            update_progress_artifact(self.block_id, share)


@flow(name="cohort", log_prints=True)
def cohort(settings: CohortSettings) -> list[dict[str, Any]] | State:
    """A study of slides through one model: every slide of ``settings.slides`` into its own
    folder under ``settings.output``, on one shared Dask cluster, several slides in flight;
    the study table at ``OUTPUT/study.parquet`` and ``OUTPUT/study.csv``. A rerun skips the
    finished slides and resumes the others; a failed slide is reported and the others go on."""
    logger = get_run_logger()
    settings = settings.model_copy(update={"output": absolute(settings.output), "model": absolute(settings.model)})
    total = len(list_slides(settings.slides))
    logger.info("cohort: %d slides in %s, %d in flight at once, into %s", total, settings.slides,
                settings.slides_in_flight, settings.output)
    progress = StudyProgress(total)
    registered: set[str] = set()  # what this run put into _STUDY_CLIENTS

    def one(slide: Slide, settings: CohortSettings, client: Any, digest: str, report: Any) -> dict[str, Any]:
        try:
            earlier = finished_before(slide, settings, slide_key(slide, settings, digest))
        except Exception:  # noqa: BLE001 - an unreadable stamp: the sub-flow's run_slide makes it the row
            earlier = None
        if earlier is not None:
            return earlier
        address = client().scheduler.address
        with _REGISTRY_LOCK:  # client and report together: a slide starting meanwhile sees both
            if _STUDY_CLIENTS.setdefault(address, client()) is client():
                registered.add(address)
                _STUDY_REPORTS[address] = report
        shared = settings.model_copy(update={"scheduler": address})
        state = cohort_slide(slide.url, slide.name, shared, return_state=True)
        return state.result() if state.is_completed() else _failed_row(slide, settings.output, state)

    with SharedClient(lambda: dask_client(settings.scheduler, settings.workers, _gpu(settings))) as client:
        try:
            rows = run_cohort(settings, client, SlideRun(progress.planned_blocks, progress.block_done),
                              on_slide=progress.slide_ended, run_one=one)
        finally:
            for address in registered:
                _STUDY_CLIENTS.pop(address, None)
                _STUDY_REPORTS.pop(address, None)
    update_progress_artifact(progress.block_id, 100.0)
    create_table_artifact([{c: "" if r.get(c) is None else r[c] for c in COLUMNS} for r in rows], key="study-table",
                          description=f"overtile cohort: the study table ({settings.output}/study.csv)")
    failed = [r for r in rows if r["status"] == "failed"]
    if len(failed) == len(rows):  # a study with nothing to show is no success (some failed: the table says)
        return Failed(message=f"cohort: none of the {len(rows)} slides finished; the first: {failed[0]['error']}")
    logger.info("cohort: %d of %d slides finished (%d before this run), %d failed; %d blocks computed of %d "
                "planned this run; study table %s/study.csv", len(rows) - len(failed), len(rows),
                sum(r["status"] == "finished before" for r in rows), len(failed), progress.computed, progress.planned,
                settings.output)
    return rows


def _failed_row(slide: Slide, root: str, state: Any) -> dict[str, Any]:
    """The row of a slide whose sub-flow run failed: its record (written as it failed), else
    the failure's message (the sub-flow failed before it could write one)."""
    record = read_record(slide.folder(root))
    if record is not None and record.get("status") == "failed":
        return {c: record.get(c) for c in COLUMNS}
    return {c: None for c in COLUMNS} | {"slide": slide.url, "name": slide.name, "status": "failed",
                                         "error": f"{slide.url}: {state.message or 'the sub-flow run failed'}"}
