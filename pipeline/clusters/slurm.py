"""Dask on SLURM through dask-jobqueue, from a profile of the SLURM spec
(``deploy/slurm/cluster.yaml``, or the file ``OVERTILE_SLURM_SPEC`` names).

A profile is one section under ``jobqueue:`` in dask-jobqueue's own configuration keys, plus
overtile's ``adapt`` (the fewest and most worker jobs at once). Each worker job starts as a
local cluster's workers do: the profile's threads per process and resources (``GPU=1`` on
GPU profiles), and overtile's allocator setting (:data:`pipeline.clusters.WORKER_ENVIRONMENT`)
exported in the job script before the worker starts, whatever the profile's prologue says.

Secure by default: the scheduler and workers speak TLS with certificates made for this
cluster alone (dask-jobqueue's ``security=True``: a temporary CA, its worker files in the
profile's ``shared-temp-directory``), so another user of the site's network who reaches the
scheduler's port is refused, not handed a Python interpreter on the workers. A profile turns
it off only with ``security: false``, and then the log says so.

A job's blocks go to SLURM when its ``scheduler`` setting is ``slurm`` (the profile
``overtile-gpu`` on CUDA, ``overtile-cpu`` otherwise) or ``slurm:PROFILE``;
:func:`adaptive_cluster` starts the scheduler in this process and lets Dask submit jobs
while blocks wait, up to the profile's ``maximum-jobs``, and cancel them when idle.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

from pipeline.clusters import DEPLOY, SLURM, WORKER_ENVIRONMENT, read_yaml
from pipeline.errors import InputError

log = logging.getLogger("overtile")

# dask-jobqueue's configuration keys whose keyword argument is not the key with '_' for '-'.
_JOBQUEUE_KWARG = {"name": "job_name"}
DEFAULT_ADAPT = {"minimum_jobs": 0, "maximum_jobs": 4}


def default_spec() -> Path:
    """The SLURM spec: ``OVERTILE_SLURM_SPEC`` (a site's copy with its SITE lines filled in),
    else the one in ``deploy/slurm/``."""
    return Path(os.environ.get("OVERTILE_SLURM_SPEC") or DEPLOY / "slurm" / "cluster.yaml")


def profile_of(scheduler: str, gpu: bool) -> str:
    """``slurm:PROFILE`` -> PROFILE; plain ``slurm`` -> the GPU or CPU profile."""
    named = str(scheduler).removeprefix(SLURM).removeprefix(":")
    return named or ("overtile-gpu" if gpu else "overtile-cpu")


def _profile(profile: str, spec: str | Path | None) -> tuple[dict[str, Any], Path]:
    spec = Path(spec or default_spec())
    docs = read_yaml(spec)
    profiles = docs[0].get("jobqueue") if len(docs) == 1 and isinstance(docs[0], dict) else None
    if not isinstance(profiles, dict) or not isinstance(profiles.get(profile), dict):
        known = ", ".join(profiles) if isinstance(profiles, dict) else "none"
        raise InputError(f"{spec}: no SLURM profile {profile!r} under 'jobqueue:' (profiles: {known})")
    return dict(profiles[profile]), spec


def slurm_cluster_kwargs(profile: str = "overtile-gpu", spec: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for one profile of a spec file.

    Keys as ``SLURMCluster`` takes them (``-`` becomes ``_``, ``name`` becomes ``job_name``);
    keys the profile leaves out keep dask-jobqueue's defaults, except ``security``, which is
    True (TLS) unless the profile says ``false``. The allocator setting is the job script's
    first prologue line. ``overrides`` replace the file's (``queue="gpu-long"``, ...).
    """
    raw, _ = _profile(profile, spec)
    raw.pop("adapt", None)
    kwargs = {_JOBQUEUE_KWARG.get(key, key.replace("-", "_")): value for key, value in raw.items()}
    kwargs.setdefault("security", True)
    allocator = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in WORKER_ENVIRONMENT.items())
    kwargs["job_script_prologue"] = [allocator] + [line for line in kwargs.get("job_script_prologue") or []
                                                   if line != allocator]
    kwargs.update(overrides)
    return kwargs


def adapt_limits(profile: str, spec: str | Path | None = None) -> dict[str, int]:
    """The profile's ``adapt`` section as ``cluster.adapt`` keywords (default 0 to 4 jobs)."""
    raw, path = _profile(profile, spec)
    given = raw.get("adapt") or {}
    if not isinstance(given, dict) or set(given) - {"minimum-jobs", "maximum-jobs"}:
        raise InputError(f"{path}: profile {profile!r}: 'adapt' takes minimum-jobs and maximum-jobs")
    limits = {**DEFAULT_ADAPT, **{k.replace("-", "_"): int(v) for k, v in given.items()}}
    if not 0 <= limits["minimum_jobs"] <= limits["maximum_jobs"] or limits["maximum_jobs"] < 1:
        raise InputError(f"{path}: profile {profile!r}: adapt needs 0 <= minimum-jobs <= maximum-jobs, maximum-jobs >= 1")
    return limits


def slurm_cluster(profile: str = "overtile-gpu", spec: str | Path | None = None, **overrides: Any) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` from one profile of ``spec``; no job is submitted
    until the cluster is scaled (``cluster.scale(jobs=N)``) or made adaptive
    (``cluster.adapt(...)``, see :func:`adaptive_cluster`). Its scheduler starts here, in this
    process; ``cluster.job_script()`` shows what each job would run."""
    from dask_jobqueue import SLURMCluster

    kwargs = slurm_cluster_kwargs(profile, spec, **overrides)
    if kwargs.get("security") is True and kwargs.get("shared_temp_directory"):
        # the workers' certificate files go here: made for this user alone
        folder = Path(os.path.expandvars(os.path.expanduser(str(kwargs["shared_temp_directory"]))))
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        kwargs["shared_temp_directory"] = str(folder)
    if not kwargs.get("security"):
        kwargs["security"] = None  # dask-jobqueue's word for no TLS
        log.warning("SLURM profile %r: TLS is off (security: false): anyone who reaches the scheduler's port on "
                    "this network can run code on the workers; turn it on unless the network is yours alone", profile)
    return SLURMCluster(**kwargs)


def adaptive_cluster(scheduler: str, gpu: bool) -> Any:
    """The SLURM cluster a job's ``scheduler`` setting (``slurm`` or ``slurm:PROFILE``) asks
    for: started, adaptive within the profile's limits (jobs are submitted while blocks wait
    and cancelled when idle); close it when the job ends."""
    profile = profile_of(scheduler, gpu)
    cluster = slurm_cluster(profile)
    limits = adapt_limits(profile)
    try:
        cluster.adapt(**limits)
    except BaseException:
        cluster.close()
        raise
    log.info("SLURM: scheduler %s; %s jobs of profile %s (%s) while blocks wait", cluster.scheduler_address,
             f"{limits['minimum_jobs']} to {limits['maximum_jobs']}", profile, default_spec())
    return cluster
