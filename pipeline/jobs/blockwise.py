"""The one shape of every blockwise job: plan -> run the pending blocks on Dask -> summary
-> pyramid.

- **plan** (``plan_*`` of each job, no cluster): normalise the settings, validate every input
  and the output, create or reopen the output with its :class:`~pipeline.storage.Ledger`
  (keyed by the run's :func:`fingerprint`), and return a :class:`BlockwiseJob`: small,
  frozen, sent with every block task.
- **prepare** (:meth:`BlockwiseJob.prepare`, on the cluster, optional): global passes the
  blocks need (the weight map's class counts and instance labelling). Idempotent: what it
  finds it writes into the output, so a retry or rerun does not redo it.
- **run** (:func:`run_blocks`): every block the ledger does not mark finished, one Dask task
  each. A task reads its own input, writes its own (chunk-aligned) output and marks its
  block, then returns a small record: only block descriptions and records cross the
  scheduler, never pixels. A killed worker's blocks are redone by Dask; a killed client
  loses only the blocks in flight. A block whose input is at fault (a tile that does not
  decode) is not retried: its :class:`InputError` comes back as one line naming the block.
- **finish** (:meth:`BlockwiseJob.finish`): the output pyramid under the finished blocks.

:func:`execute` strings these together for the CLI and the Python API; ``flows/`` calls the
same stages as Prefect tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Annotated,
    Any,
    Callable,
    ClassVar,
    Iterable,
    Iterator,
    Sequence,
    TypeVar,
)

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline import storage
from pipeline.clusters import WORKER_ENVIRONMENT, is_slurm, scheduler_setting
from pipeline.errors import InputError, InputFailure

DEFAULT_BLOCK = {2: 2048, 3: 256}  # px per edge: a terabyte is tens of thousands of blocks

# WORKER_ENVIRONMENT (pipeline.clusters): the allocator setting every worker starts with.


# The settings every blockwise job has, declared once: each job's settings model uses these
# (so the CLI, the Python API and the flows name, default and describe them alike).
BlockSize = Annotated[int | None, Field(ge=16, description="Block edge in pixels: the unit of distributed work and "
                                        "the output chunk, or shard when sharded (default 2048 in 2-D, 256 in 3-D)")]
Workers = Annotated[int | None, Field(ge=1, description="Worker processes of the local Dask cluster (default: one per "
                                      "core; on GPUs one per two cores and 12 GiB of GPU memory)")]
Scheduler = Annotated[str | None, Field(description="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786, "
                                        "or slurm / slurm:PROFILE for SLURM worker jobs from the SLURM spec "
                                        "(default: $OVERTILE_SCHEDULER, else a local cluster)")]
Overwrite = Annotated[bool, Field(description="Replace an existing output instead of resuming it")]
Shards = Annotated[bool | None, Field(description="Zarr v3 sharding: each block is stored as one object (a shard) of "
                                      "smaller chunks, so a store holds one object per block while a viewer reads "
                                      "small chunks (default: on for object stores such as s3://, off for local paths)")]
ChunkSize = Annotated[int | None, Field(ge=16, description="Chunk edge of the output, a divisor of the block edge: what "
                                        "a viewer reads at once (default: 512 in 2-D, 64 in 3-D when sharded, else "
                                        "the block edge)")]
# Axes letters as a user may type them (YX, Cyx): stored lower case, as overtile names axes.
Axes = Annotated[str | None, AfterValidator(lambda v: v.lower() if v else v)]


class BlockwiseSettings(BaseModel):
    """Base of every blockwise job's settings: frozen, no unknown fields. Each job declares
    ``block_size``, ``workers``, ``scheduler`` and ``overwrite`` with the types above, where
    they fit its form (a base class's fields would come first in every form; a test checks
    that each job has them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def block_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The block edge (given or the default for 2-D / 3-D), clipped to the image."""
        edge = getattr(self, "block_size", None) or DEFAULT_BLOCK[len(spatial_shape)]
        return tuple(min(edge, int(n)) for n in spatial_shape)

    def output_layout(self, shape: Sequence[int], block: Sequence[int], spatial: int) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """The output's chunks and shards (:func:`~pipeline.storage.output_layout`) for
        ``block`` (leading axes included): sharded as ``shards`` says, by default where the
        output is on an object store, with chunks of ``chunk_size``."""
        shards = getattr(self, "shards", None)
        sharded = storage.is_object_store(getattr(self, "output")) if shards is None else shards
        return storage.output_layout(shape, block, spatial, sharded, getattr(self, "chunk_size", None))


def absolute_paths(settings: BlockwiseSettings, *fields: str) -> Any:
    """``settings`` with the named path fields made absolute (workers may run elsewhere)."""
    return settings.model_copy(update={f: storage.absolute(getattr(settings, f)) for f in fields
                                       if getattr(settings, f) is not None})


def fingerprint(**parts: Any) -> str:
    """What determines an output's values, as a hash: a rerun with another fingerprint must
    not resume into the output (its ledger refuses it)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Pending:
    """What is left of a job: the blocks to compute, how many the ledger marks finished, and
    how many are not wanted (no tissue)."""

    blocks: list[Any]
    skipped: int
    background: int = 0

    @property
    def total(self) -> int:
        return len(self.blocks) + self.skipped + self.background

    def remaining(self, ledger: storage.Ledger) -> "Pending":
        """These blocks less those the ledger now marks finished (a retried stage sees what
        the failed attempt finished)."""
        done = ledger.done()
        return Pending([b for b in self.blocks if not done[b.index]], int(done.sum()), self.background)


@dataclass(frozen=True)
class BlockwiseJob:
    """A planned job: what every block task needs, small enough to send with each task.

    Subclasses (one per job) add their fields and implement :meth:`blocks` and
    :meth:`run_block`; the rest has defaults.
    """

    kind: ClassVar[str] = "blocks"

    output: str
    ledger: storage.Ledger
    fingerprint: str

    @property
    def name(self) -> str:
        """Prefix of the run's Dask keys: one per fingerprint *and* output, so two runs of the
        same settings into different outputs on a shared scheduler never share a task."""
        return f"{self.kind}-{hashlib.sha256((self.fingerprint + self.output).encode()).hexdigest()[:12]}"

    @property
    def gpu(self) -> bool:
        """Whether the blocks need a GPU worker (they then ask for the ``GPU`` resource)."""
        return False

    def blocks(self) -> Iterable[Any]:
        """Every block of the job, in order."""
        raise NotImplementedError

    def pending(self) -> Pending:
        """Every block the ledger does not mark finished (a job that skips blocks, as
        prediction with a tissue mask does, makes its own :class:`Pending` when it plans)."""
        done = self.ledger.done()
        return Pending([b for b in self.blocks() if not done[b.index]], int(done.sum()))

    def read_block(self, block: Any) -> Any:
        """With read-ahead (:attr:`prefetch`), the block's input, read in a task of its own."""
        raise NotImplementedError

    @property
    def prefetch(self) -> bool:
        """Read each block in a task of its own (no GPU needed), so a worker reads the next
        block while it computes this one."""
        return False

    def run_block(self, block: Any, *prefetched: Any) -> dict[str, Any]:
        """The block's work, in a worker: read, compute, write, mark the ledger; a record back."""
        raise NotImplementedError

    def prepare(self, client: Any) -> "BlockwiseJob":
        """Global passes the blocks need, on the cluster, before them; returns the job the
        blocks run with (this one, or one that holds what the passes found)."""
        return self

    def wants_prepare(self) -> bool:
        """Whether :meth:`prepare` has work left (so a cluster must start for it)."""
        return False

    def before_blocks(self) -> None:
        """Called in the client once a run is about to compute blocks (some are pending),
        before any is written: e.g. levels derived from the output go out of date."""

    def wants_finish(self, computing: int) -> bool:
        """Whether :meth:`finish` has work (e.g. a pyramid to build) after ``computing`` blocks."""
        return False

    def finish(self, client: Any) -> int:
        """After the blocks (the pyramid under the finished ones); returns levels written."""
        return 0


J = TypeVar("J", bound=BlockwiseJob)


@dataclass
class RunSummary:
    """What a blockwise run did; ``records`` are the block tasks' return values."""

    total: int
    skipped: int
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)  # "block key: error" of blocks that failed
    background: int = 0  # blocks without tissue, not computed (left at the fill value)
    stages: dict[str, float] = field(default_factory=dict)  # seconds: plan, cluster, prepare, blocks, finish

    @property
    def done(self) -> int:
        return len(self.records)

    @property
    def pixels(self) -> int:
        return sum(r.get("pixels", 0) for r in self.records)

    @property
    def megapixels_per_second(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0


# --- Dask ------------------------------------------------------------------------------------


def default_workers() -> int:
    """The cores this process may use, as Dask counts them: affinity, and cgroup CPU quotas
    (a Kubernetes pod's limit, a SLURM job's cgroup), not the host's core count."""
    from dask.system import CPU_COUNT

    return max(1, int(CPU_COUNT))


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None, gpu: bool = False,
                warm: str | None = None) -> Iterator[Any]:
    """A Dask client: of SLURM worker jobs when ``scheduler`` is ``slurm`` or ``slurm:PROFILE``
    (:func:`pipeline.clusters.slurm.adaptive_cluster`), of an existing cluster at an address,
    else of a LocalCluster (:func:`local_cluster`; ``warm``: a module its workers import as
    they start). Without ``scheduler``: ``OVERTILE_SCHEDULER``, then Dask's
    ``scheduler-address`` (:func:`pipeline.clusters.scheduler_setting`).
    """
    from distributed import Client

    scheduler = scheduler_setting(scheduler)
    if is_slurm(scheduler):
        from pipeline.clusters.slurm import adaptive_cluster

        with _client_of(adaptive_cluster(scheduler, gpu)) as client:
            yield client
        return
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise InputError(f"{scheduler}: cannot reach a Dask scheduler ({exc})") from None
        with client:
            yield client
        return
    with _client_of(local_cluster(workers, gpu, warm)) as client:
        yield client


# A worker's share of a GPU's memory in a local cluster: the paper-width (64-base) net held
# about 10 GiB per worker process for batches of four 1212² tiles (bench/gpu.py on an H200).
GPU_WORKER_MEMORY_GIB = 12


def gpu_workers(cores: int, memory_gib: Sequence[float]) -> int:
    """Worker processes of a local cluster on GPUs of ``memory_gib`` each: per GPU, one for
    every two cores (a block's host side: reading, cutting tiles, stitching, softmax, encoding
    and writing, runs on the CPU while the GPU runs other workers' tiles) and every
    :data:`GPU_WORKER_MEMORY_GIB` of its memory; at least one per GPU.

    Measured on an H200 with 16 cores (bench/gpu.py, bench/RESULTS.md): one worker reached
    0.31× the raw model with the paper-width net, eight 0.82×.
    """
    if not memory_gib:
        return 1
    per_core = max(1, cores // (2 * len(memory_gib)))  # torch reports a "24 GB" card as 23.6 GiB: rounded
    return sum(max(1, min(per_core, round(m) // GPU_WORKER_MEMORY_GIB)) for m in memory_gib)


def default_gpu_workers() -> int:
    """:func:`gpu_workers` for this machine's cores and GPUs (one when it has none)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    memory = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(count)]
    return gpu_workers(default_workers(), memory)


def local_cluster(workers: int | None = None, gpu: bool = False, warm: str | None = None) -> Any:
    """A started LocalCluster of worker processes (close it, or use it as a context manager).

    On CPU it has one task slot per core, spread over ``workers`` processes (default: one per
    core); each task computes on one thread. With ``gpu`` it has several workers per GPU
    (:func:`gpu_workers`, or ``workers``), each offering the Dask resource ``GPU=1`` and
    using the GPU :func:`pipeline.jobs.inference.worker_gpu` gives it. Workers start with
    :data:`WORKER_ENVIRONMENT` (an allocator that keeps freed memory). The dashboard is served
    on 127.0.0.1 only. ``warm``: a module each worker imports in a thread of its own from its
    start (see :func:`warm_preload`).
    """
    import dask
    from distributed import LocalCluster

    if gpu:
        n = workers or default_gpu_workers()
        slots, resources = 2, {"GPU": 1}  # GPU=1: one block computes; the other slot reads the next
    else:
        n = workers or default_workers()
        slots, resources = max(1, default_workers() // n), None
    configured = dask.config.get("distributed.worker.preload", None) or []  # kept, ours added
    preload = [configured] if isinstance(configured, str) else list(configured)
    preload.append(QUICK_EXIT_PRELOAD)
    if warm:
        preload.append(warm_preload(warm))
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENVIRONMENT}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _environment(WORKER_ENVIRONMENT):
        return LocalCluster(
            n_workers=n,
            threads_per_worker=slots,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            resources=resources,
            silence_logs=logging.ERROR,
            preload=preload,
        )


# A worker preload (Python source, as Dask takes it). A worker process that has imported torch
# takes ~0.5 s to exit after its worker closed (the interpreter's teardown of torch's modules
# and libraries), and closing a local cluster waits for it: the end of every job. Once the
# worker has closed (its preloads' teardown is the last of it), nothing is left to finish
# but that teardown: the process then exits at once, its output flushed.
# Ctrl-C in a terminal interrupts the whole process group: a local cluster's worker processes
# printed a KeyboardInterrupt traceback each above overtile's one line. They ignore it; the
# process that started them handles it and closes the cluster, which ends them.
QUICK_EXIT_PRELOAD = """\
import atexit, os, signal, sys, threading


def dask_setup(worker):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def dask_teardown(worker):
    def quick_exit():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(quick_exit)
"""


def warm_preload(module: str) -> str:
    """A worker preload (Python source, as Dask takes it) that imports ``module`` as the
    worker starts. A job's first block task would otherwise import it when it unpickles the
    job (torch, for prediction: about 2 s before the first block computes); with the cluster
    started while the job plans, the import runs during planning. It runs in the worker's
    start, not in a thread beside it: a thread importing the job's modules while the worker
    unpickles a task that imports them too deadlocked on Python's import locks (a weight-map
    run hung in the full suite). A module that does not import (a plan defined in a script)
    is the first task's to report."""
    return (
        "import importlib\n"
        "try:\n"
        f"    importlib.import_module({module!r})\n"
        "except Exception:\n"
        "    pass\n"
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for a while. A Nanny takes a variable already
    in its environment over its pre-spawn config (and writes that config into its process's
    environment, so a first LocalCluster leaves MALLOC_TRIM_THRESHOLD_=65536 here for the next)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def client_or_cluster(client: Any | None, scheduler: str | None, workers: int | None, gpu: bool = False,
                      warm: str | None = None) -> Iterator[Any]:
    """``client`` if one is given, else one of :func:`dask_client`, closed on exit."""
    if client is not None:
        yield client
        return
    with dask_client(scheduler, workers, gpu=gpu, warm=warm) as own:
        yield own


def _block_task(block: Any, job: BlockwiseJob, *prefetched: Any) -> dict[str, Any]:
    """The Dask task: the job's block work. A bad input is the input's fault, not the
    worker's: it comes back as a record (no retries, no traceback in the worker's log), as
    it does when the block's read-ahead task found it."""
    try:
        if prefetched and isinstance(prefetched[0], InputError):
            raise prefetched[0]
        return job.run_block(block, *prefetched)
    except InputError as exc:
        return {"block": block.key, "input_error": str(exc)}


def _read_task(block: Any, job: BlockwiseJob) -> Any:
    try:
        return job.read_block(block)
    except InputError as exc:
        return InputError(str(exc))  # handed to the block task, which reports it


Outcome = tuple[str, "dict[str, Any] | BaseException"]


def _collect(outcomes: Iterable[Outcome], on_result: Callable[[dict[str, Any]], None] | None,
             failures: list[str] | None) -> list[dict[str, Any]]:
    """The records of finished blocks, ``on_result`` called on each. A failure (an exception,
    or a record of the input's fault) is raised, or with a ``failures`` list appended to it as
    ``"key: error"`` while the others go on."""
    records = []
    for key, outcome in outcomes:
        if isinstance(outcome, BaseException):
            if failures is None:
                raise outcome
            failures.append(f"{key}: {outcome!r}")
        elif "input_error" in outcome:
            if failures is None:
                raise InputError(f"{outcome['input_error']} (block {outcome['block']})")
            failures.append(InputFailure(f"{outcome['block']}: {outcome['input_error']}"))
        else:
            records.append(outcome)
            if on_result is not None:
                on_result(outcome)
    return records


def _here(job: BlockwiseJob, blocks: Sequence[Any]) -> Iterator[Outcome]:
    """The blocks one after another in this process (no cluster): small jobs, and ingest by default."""
    for block in blocks:
        try:
            yield block.key, _block_task(block, job)
        except Exception as exc:  # noqa: BLE001 - a failed block is reported, as Dask reports it
            yield block.key, exc


def run_blocks(
    client: Any,
    job: BlockwiseJob,
    blocks: Sequence[Any],
    on_result: Callable[[dict[str, Any]], None] | None = None,
    failures: list[str] | None = None,
    retries: int = 2,
) -> list[dict[str, Any]]:
    """Run ``job.run_block`` for every block as one Dask task each (in this process, one after
    another, when ``client`` is None); return their records.

    ``on_result`` is called in this process for every finished block (progress bars, Prefect
    artifacts). By default the first failure cancels the remaining tasks and is raised here
    (an :class:`InputError` naming the block when the input is at fault); with a ``failures``
    list every block is tried and each failure is appended as ``"key: error"``. Either way
    finished blocks stay in the ledger. CUDA jobs' blocks ask for the ``GPU`` resource; with
    ``job.prefetch`` each block's read is a task of its own, run beside the GPU's block on a
    worker that offers the resource (it asks for none of it): on a CPU-only worker of a mixed
    cluster the reads would run ahead of the GPU without bound, and every block's input would
    wait in the GPU worker's memory.
    """
    if not blocks:
        return []
    if client is None:
        return _collect(_here(job, blocks), on_result, failures)
    from distributed import as_completed

    resources = {"GPU": 1} if job.gpu else None
    keys = [f"{job.name}-{b.key}" for b in blocks]
    reads = client.map(_read_task, blocks, [job] * len(blocks), key=[f"read-{k}" for k in keys],
                       resources={"GPU": 0} if job.gpu else None, retries=retries, pure=False) if job.prefetch else []
    futures = client.map(_block_task, blocks, [job] * len(blocks), *([reads] if reads else []), key=keys,
                         resources=resources, retries=retries, pure=False)
    outcomes = ((str(f.key).removeprefix(job.name + "-"), f.exception() if f.status == "error" else f.result())
                for f in as_completed(futures))
    try:
        return _collect(outcomes, on_result, failures)
    except BaseException:
        client.cancel(futures + reads)
        raise


def run_pending(
    job: J,
    planned: Pending,
    client: Any,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    failures: list[str] | None = None,
    on_start: Callable[[J, Pending], None] | None = None,
    watch: "Stopwatch | None" = None,
) -> tuple[J, RunSummary]:
    """The run stage: global passes (:meth:`~BlockwiseJob.prepare`), then the planned
    blocks the ledger still lacks (read afresh, so a retried stage does only what is missing).
    ``on_start`` sees what is left just before the blocks start."""
    watch = watch or Stopwatch()
    start = time.perf_counter()
    with watch("prepare"):
        job = job.prepare(client)
        pending = planned.remaining(job.ledger)
    if on_start is not None:
        on_start(job, pending)
    if pending.blocks:
        job.before_blocks()
    with watch("blocks"):
        records = run_blocks(client, job, pending.blocks, on_result, failures)
    return job, RunSummary(pending.total, pending.skipped, records, time.perf_counter() - start,
                           list(failures or []), pending.background,
                           {k: watch.seconds[k] for k in ("prepare", "blocks")})


def execute(
    plan: Callable[[Any], tuple[J, Pending]],
    settings: BlockwiseSettings,
    client: Any | None = None,
    on_plan: Callable[[J, Pending], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    failures: list[str] | None = None,
    in_process: bool = False,
) -> tuple[J, RunSummary]:
    """A blockwise job end to end, the shape behind every job's Python entry point:
    ``plan(settings)`` (every check), then a cluster (``client``, or one of ``settings``) only
    when there is something to compute, the pending blocks and :meth:`~BlockwiseJob.finish`.

    A local cluster for a fresh output starts while the job plans (:class:`EarlyCluster`);
    its workers, as any local cluster's here, import the job's module as they start
    (:func:`warm_preload`). ``on_plan(job, pending)`` is called once before the blocks;
    ``on_result`` with each finished block's record; ``failures``: see :func:`run_blocks`.
    ``in_process``: no cluster; the blocks run one after another in this process.
    """
    watch = Stopwatch()
    # overtile's job modules only: a plan defined in a test or a script is not imported into workers
    warm = plan.__module__ if getattr(plan, "__module__", "").startswith("pipeline.") else None
    with contextlib.ExitStack() as early_start:
        early = None
        if client is None and not in_process and EarlyCluster.wanted(settings):
            early = early_start.enter_context(EarlyCluster(settings, warm))
        with watch("plan"):
            job, planned = plan(settings)
        if on_plan is not None:
            on_plan(job, planned)
        summary = RunSummary(planned.total, planned.skipped, [], 0.0, [], planned.background)
        if in_process or planned.blocks or job.wants_prepare() or job.wants_finish(len(planned.blocks)):
            with watch("cluster"):  # its start (what is left of it) here, its close below
                stack = contextlib.ExitStack()
                started = early.take(job.gpu) if early is not None else None
                client = None if in_process else stack.enter_context(
                    _client_of(started) if started is not None
                    else client_or_cluster(client, settings.scheduler, settings.workers, job.gpu, warm))
            try:
                job, summary = run_pending(job, planned, client, on_result, failures, watch=watch)
                if not summary.failed and job.wants_finish(summary.done):
                    with watch("finish"):
                        job.finish(client)
            finally:
                with watch("cluster"):
                    stack.close()
    summary.stages = dict(watch.seconds)
    summary.seconds = sum(watch.seconds.values())
    return job, summary


EARLY_START_S = 0.25  # plans that fail on bad input fail sooner (a missing input, a bad checkpoint: < 0.05 s)


class EarlyCluster:
    """A job's local cluster, started in a thread of its own while the job plans.

    Before a job's first block a local cluster costs seconds: the client imports
    ``distributed``, the scheduler starts, worker processes start and import their
    libraries. Started while the job plans, it costs the plan's time less. The thread
    imports ``distributed`` at once (unused, it costs nothing to leave) and starts the
    cluster once the plan has run for :data:`EARLY_START_S` or is done: a plan that fails
    on bad input fails sooner, and fails as fast as it did, with no cluster to close.

    Only a fresh output (none yet, or ``overwrite``) starts early: it has blocks to compute
    unless its plan fails. A rerun into an existing output may find every block finished and
    then needs no cluster, so it starts one after planning, as before. With a scheduler
    (:func:`~pipeline.clusters.scheduler_setting`) nothing starts early. Leaving
    the ``with`` block closes a cluster :meth:`take` did not hand over, after waiting for its
    start (a plan that fails later than :data:`EARLY_START_S` pays that).
    """

    def __init__(self, settings: BlockwiseSettings, warm: str | None = None):
        self._settings, self._warm = settings, warm
        self._since = time.perf_counter()
        # The workers' environment, set here before the thread starts and kept until it is done:
        # the thread's own setting (local_cluster) then changes no variable's place in the C
        # environment while this thread reads it (glibc's setenv is not safe beside getenv).
        self._environ = contextlib.ExitStack()
        self._environ.enter_context(_environment(WORKER_ENVIRONMENT))
        self._go = threading.Event()
        self._lock = threading.Lock()
        self._cancelled = self._starting = False
        self._cluster: Any = None
        self._gpu = False
        self._error: BaseException | None = None
        # A daemon: a process that ends on a failed plan does not wait for its import of
        # distributed (a start under way is always waited for and closed, in __exit__).
        self._thread = threading.Thread(target=self._start, name="overtile-early-cluster", daemon=True)
        self._thread.start()

    @staticmethod
    def wanted(settings: BlockwiseSettings) -> bool:
        """Whether ``settings`` plan a fresh output on a local cluster (cheap checks only)."""
        output = getattr(settings, "output", None)
        if scheduler_setting(getattr(settings, "scheduler", None)) or not output:
            return False
        return bool(getattr(settings, "overwrite", False)) or not (storage.is_url(output) or os.path.exists(output))

    def _start(self) -> None:
        try:
            import distributed  # noqa: F401 - the client's own import, behind the plan

            if scheduler_setting(None):
                return
            device = getattr(self._settings, "device", "cpu")
            if device == "auto":
                import torch

                gpu = torch.cuda.is_available()
            else:
                gpu = device == "cuda"
            self._go.wait(max(0.0, self._since + EARLY_START_S - time.perf_counter()))
            with self._lock:
                if self._cancelled:
                    return
                self._starting = True
            self._gpu = gpu
            self._cluster = local_cluster(getattr(self._settings, "workers", None), gpu, self._warm)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by take()
            self._error = exc

    def take(self, gpu: bool) -> Any | None:
        """The started cluster, handed over (the caller closes it), or None when it did not
        start (a scheduler is configured) or has the wrong shape for the job (``gpu``)."""
        self._go.set()
        self._thread.join()
        self._environ.close()
        if self._error is not None:
            raise self._error
        cluster, self._cluster = self._cluster, None
        if cluster is not None and self._gpu != gpu:
            cluster.close()
            return None
        return cluster

    def __enter__(self) -> "EarlyCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._cancelled = True
            starting = self._starting
        self._go.set()
        if starting:
            self._thread.join()
        self._environ.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None


@contextlib.contextmanager
def _client_of(cluster: Any) -> Iterator[Any]:
    """A client of ``cluster``; both closed on exit."""
    from distributed import Client

    with cluster, Client(cluster) as client:
        yield client


class Stopwatch:
    """Accumulates named durations: ``with watch("read"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
