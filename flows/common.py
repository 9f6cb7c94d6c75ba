"""What every overtile flow shares: its Dask client, the blockwise stages as Prefect tasks (one
run-blocks task, one pyramid task, one failure path), a block-progress artifact, the report.

Prefect sees coarse stages only (plan, run the blocks, pyramid, report). Blocks are plain Dask futures
submitted from the flow process, so no Dask worker ever talks to Prefect: in ephemeral mode
each such process would start a Prefect server of its own, and a thousand Prefect task runs
cost more than a thousand blocks' scheduling.
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from prefect import get_run_logger, runtime, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from pipeline.clusters import is_slurm, scheduler_setting
from pipeline.errors import BlocksFailed
from pipeline.jobs import blockwise
from pipeline.jobs.blockwise import BlockwiseJob, Pending, RunSummary

J = TypeVar("J", bound=BlockwiseJob)


def on_task_runner_cluster() -> bool:
    """Whether this flow run's blocks go to its ``prefect_dask.DaskTaskRunner`` cluster."""
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, DaskTaskRunner)


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int | None, gpu: bool = False) -> Iterator[Any]:
    """The Dask client a flow's blocks run on.

    In order: ``scheduler`` (an address, or ``slurm[:PROFILE]`` for SLURM worker jobs; by
    default ``OVERTILE_SCHEDULER``, e.g. from a deployment's job variables); else the cluster of the flow's
    ``prefect_dask.DaskTaskRunner`` when the flow runs with one (a deployment may configure
    one, e.g. on SLURM through dask-jobqueue: see deploy/), reached with a plain client of
    its scheduler; else a LocalCluster on this machine, started for the run and closed after.
    """
    import logging

    from distributed import Client

    logging.getLogger("distributed").setLevel(logging.WARNING)  # Prefect's console shows INFO: keep it to ours
    logger = get_run_logger()
    if not scheduler and on_task_runner_cluster():
        runner = FlowRunContext.get().task_runner.client  # its security too: a SLURM profile's cluster speaks TLS
        address = runner.scheduler.address
        with Client(address, security=runner.security) as client:
            logger.info("Blocks run on the flow's DaskTaskRunner cluster at %s", address)
            yield client
        return
    scheduler = scheduler_setting(scheduler)
    with blockwise.dask_client(scheduler, workers, gpu=gpu) as client:
        info = client.scheduler_info()
        where = (f"SLURM worker jobs ({scheduler}, scheduler {client.scheduler.address})" if is_slurm(scheduler)
                 else f"the Dask cluster at {scheduler}" if scheduler else "a local Dask cluster")
        logger.info("Blocks run on %s: %d workers, %d task slots; dashboard %s", where, len(info.get("workers", {})),
                    sum(w.get("nthreads", 0) for w in info.get("workers", {}).values()), client.dashboard_link)
        yield client


class Cluster:
    """The Dask client a flow's tasks share, started on first use (a rerun with nothing left
    to compute starts no cluster) and closed when the flow leaves the ``with`` block. With
    ``in_process`` there is none: blocks run one after another in the flow's process."""

    def __init__(self, scheduler: str | None, workers: int | None, gpu: bool = False, in_process: bool = False):
        self.args = (scheduler, workers, gpu)
        self.in_process = in_process
        self._stack = contextlib.ExitStack()
        self._client: Any = None

    def client(self) -> Any:
        if self.in_process:
            return None
        if self._client is None:
            self._client = self._stack.enter_context(dask_client(*self.args))
        return self._client

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


class BlockProgress:
    """A Prefect progress artifact advanced as blocks finish, and a log line every ~10%."""

    def __init__(self, kind: str, total: int, skipped: int):
        self.kind, self.total, self.done = kind, max(total, 1), skipped
        self.step = max(1, total // 100)
        self.log_step = max(1, total // 10)
        self.id = create_progress_artifact(  # nothing to compute (a blank slide's tissue mask): done
            progress=100.0 * skipped / self.total if total else 100.0, key=f"{kind}-progress",
            description=f"overtile {kind}: share of blocks finished (the ledger's count, this run and earlier ones)",
        )
        self.logger = get_run_logger()

    def __call__(self, record: dict[str, Any]) -> None:
        self.done += 1
        if self.done % self.step == 0 or self.done == self.total:
            update_progress_artifact(self.id, progress=100.0 * self.done / self.total)
        if self.done % self.log_step == 0 or self.done == self.total:
            self.logger.info("%s: %d of %d blocks finished", self.kind, self.done, self.total)


def log_plan(kind: str, todo: int, skipped: int, what: str) -> None:
    """The words a user reads first: how much there is to do and how much is already done."""
    logger = get_run_logger()
    total = todo + skipped
    if skipped and not todo:
        logger.info("%s: all %d blocks of %s are already finished (ledger); nothing to compute", kind, total, what)
    elif skipped:
        logger.info("%s: resuming %s: %d of %d blocks already finished (ledger), %d to do", kind, what, skipped, total, todo)
    else:
        logger.info("%s: %d blocks to compute for %s", kind, total, what)


def png_markdown(title: str, png: Path, note: str = "", max_width: int = 1200) -> str:
    """Markdown that shows ``png`` inline, as a data URI (the UI needs no access to the file),
    scaled to ``max_width`` and JPEG-encoded so the artifact stays well under the server's
    event size limit (a full preview PNG of noisy EM is several MB)."""
    import io

    from PIL import Image

    with Image.open(png) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"### {title}\n\n![{title}](data:image/jpeg;base64,{data})\n\n{note}"


def report(kind: str, summary: RunSummary, rows: dict[str, Any], preview: Path | None = None) -> dict[str, Any]:
    """Table artifact of what the run did and, when given, a markdown artifact with its picture.

    Returns the table as a dict (the flow's return value).
    """
    table = {
        "blocks computed in this run": summary.done,
        "blocks skipped (finished earlier, per the ledger)": summary.skipped,
        "blocks failed": len(summary.failed),
        "blocks without tissue (not computed)": summary.background,
        "blocks in total": summary.total,
        "megapixels computed": round(summary.pixels / 1e6, 2),
        "seconds": round(summary.seconds, 1),
        "megapixels per second": round(summary.megapixels_per_second, 3),
        **rows,
    }
    create_table_artifact(
        [{"what": k, "value": str(v)} for k, v in table.items()], key=f"{kind}-summary",
        description=f"overtile {kind}: what this run did",
    )
    if preview is not None and preview.exists():
        create_markdown_artifact(png_markdown(f"{kind}: a look at the result", preview, f"`{preview}`"),
                                 key=f"{kind}-preview", description=f"overtile {kind}: a look at the result")
    logger = get_run_logger()
    if summary.skipped and not summary.done:
        logger.info("%s: nothing to do, all %d blocks were finished before", kind, summary.total)
    else:
        logger.info("%s: %d blocks computed, %d skipped as finished before; %.1f megapixels in %.1f s (%.2f MP/s)",
                    kind, summary.done, summary.skipped, summary.pixels / 1e6, summary.seconds,
                    summary.megapixels_per_second)
    return table


def preview_path(output: str) -> Path | None:
    """Where a local output's preview PNG goes: beside it, or beside the Zarr image it is a
    label image of (``a/slide.zarr/labels/cells`` -> ``a/slide.cells.preview.png``: a Zarr
    hierarchy holds only Zarr nodes); None for remote outputs."""
    if "://" in output and not output.startswith("file://"):
        return None
    path = output.removeprefix("file://").rstrip("/")
    head, sep, rest = path.partition(".zarr/")
    if sep:
        return Path(f"{head}.{rest.rsplit('/', 1)[-1]}.preview.png")
    return Path(path + ".preview.png")


# --- the blockwise stages, the same for every job ---------------------------------------------


# What the failed attempts of a block stage did, by (job kind, output), for its retry's summary:
# the retry sees their blocks in the ledger as finished, but this run computed them.
_EARLIER: dict[tuple[str, str], RunSummary] = {}


def with_earlier(summary: RunSummary, earlier: RunSummary | None) -> RunSummary:
    """``summary`` of a retried stage with what its earlier attempts did counted in: their
    blocks as computed (not as skipped), their pixels and their time."""
    if earlier is None:
        return summary
    stages = {k: earlier.stages.get(k, 0.0) + summary.stages.get(k, 0.0) for k in {*earlier.stages, *summary.stages}}
    return RunSummary(summary.total, summary.skipped - earlier.done, earlier.records + summary.records,
                      earlier.seconds + summary.seconds, summary.failed, summary.background, stages)


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """A retry of the block stage redoes the failed blocks: worth it for a lost worker or a
    network error, not when every failure is the input's (a tile that does not decode)."""
    exc = getattr(state, "data", None)
    return not (isinstance(exc, BlocksFailed) and exc.input_only)


@task(name="run blocks on Dask", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=worth_retrying)
def run_blocks(kind: str, job: J, planned: Pending, cluster: Cluster) -> tuple[J, RunSummary]:
    """The job's global passes, then every planned block the ledger does not mark finished,
    one Dask task each. Safe to retry: the ledger is read again, so a retry does only what is
    still missing, and its summary counts what the earlier attempts did. Failed blocks are
    tried to the end, then raised together (:class:`~pipeline.errors.BlocksFailed`, which
    carries the summary)."""
    if runtime.task_run.run_count == 1:
        _EARLIER.pop((kind, job.output), None)  # a stale entry of a run that stopped uncleanly
    earlier = _EARLIER.get((kind, job.output))  # kept until a retry ends: it may fail in any way
    pending = planned.remaining(job.ledger)
    if not pending.blocks and not job.wants_prepare():  # a finished output needs no cluster
        BlockProgress(kind, pending.skipped, pending.skipped)
        _EARLIER.pop((kind, job.output), None)
        return job, with_earlier(RunSummary(pending.total, pending.skipped, [], 0.0, [], pending.background), earlier)
    progress: list[BlockProgress] = []

    def on_start(job: BlockwiseJob, pending: Pending) -> None:
        progress.append(BlockProgress(kind, len(pending.blocks) + pending.skipped, pending.skipped))

    failures: list[str] = []
    job, summary = blockwise.run_pending(job, planned, cluster.client(), lambda record: progress[0](record),
                                         failures, on_start)
    summary = with_earlier(summary, earlier)
    if failures:
        _EARLIER[(kind, job.output)] = summary  # for a retry, if there is one
        raise BlocksFailed(summary)
    _EARLIER.pop((kind, job.output), None)
    return job, summary


@task(name="build the pyramid", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def pyramid(kind: str, job: BlockwiseJob, summary: RunSummary, cluster: Cluster) -> int:
    """Downsampled levels under the finished blocks, when the job has them to build (blocks
    computed now, or no pyramid yet); rewriting a level is safe, so is a retry."""
    if not job.wants_finish(summary.done):
        return 0
    levels = job.finish(cluster.client())
    get_run_logger().info("%s: wrote %d downsampled levels into the multiscales of %s", kind, levels, job.output)
    return levels


def run_job(kind: str, job: J, planned: Pending, summarise: Callable[[J, RunSummary], dict],
            cluster: Cluster | None = None) -> dict:
    """A planned blockwise job through its stages on one Dask cluster (``cluster``, shared
    with the flow's other jobs, or one of its own), started only when there is something to
    compute: run the blocks, build the pyramid, report. When blocks fail, the report still
    runs (it says which) before the flow fails."""
    settings = getattr(job, "settings")
    with contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(Cluster(settings.scheduler, settings.workers, job.gpu))
        try:
            job, summary = run_blocks(kind, job, planned, cluster)
        except BlocksFailed as exc:
            _EARLIER.pop((kind, job.output), None)  # no retry is left
            summarise(job, exc.summary)
            raise
        pyramid(kind, job, summary, cluster)
    return summarise(job, summary)
