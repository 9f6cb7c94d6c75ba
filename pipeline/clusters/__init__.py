"""Where the blocks run: what every Dask worker of overtile starts with, and the clusters
made from the specs in ``deploy/`` (SLURM jobs through dask-jobqueue:
:mod:`pipeline.clusters.slurm`; Kubernetes pods through the dask-kubernetes operator:
:mod:`pipeline.clusters.kubernetes`). The local cluster is :mod:`pipeline.jobs.blockwise`'s.

A job's ``scheduler`` setting picks the cluster (:func:`scheduler_setting`): an address
(``tcp://10.0.0.5:8786``) for a running one, ``slurm`` or ``slurm:PROFILE`` for SLURM worker
jobs from a profile of the SLURM spec, or nothing for a local cluster. ``OVERTILE_SCHEDULER``
in the environment gives the default (e.g. in a Prefect deployment's job variables), then
Dask's own ``scheduler-address`` (``DASK_SCHEDULER_ADDRESS`` in a pod).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

# The deploy/ folder beside the package (the repository's, or /opt/overtile/deploy in the
# container image), wherever the process was started; OVERTILE_DEPLOY names another.
DEPLOY = Path(os.environ.get("OVERTILE_DEPLOY") or Path(__file__).resolve().parents[2] / "deploy")

# What a worker process's allocator should keep. Dask's Nanny starts workers with
# MALLOC_TRIM_THRESHOLD_=65536, and glibc then hands every forward pass's freed activations
# back to the kernel, to fault them in again on the next pass (280k page faults and ~0.5 s
# of kernel time per 1212² pass of a 16-base U-Net). Never trim, never mmap, and one arena:
# a task runs in a pool thread whose own arena glibc shrinks whatever the trim threshold.
# glibc reads these at process start: they go into the worker's environment before it starts
# (Nanny's pre-spawn-environ for a local cluster; the job script of a SLURM job; the pod spec
# on Kubernetes). bench/allocator.py measures it: 0 page faults per pass in a worker, for
# ~120 MiB more resident memory.
WORKER_ENVIRONMENT: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}

SLURM = "slurm"  # the scheduler setting's word for SLURM worker jobs (slurm or slurm:PROFILE)


def scheduler_setting(value: str | None) -> str | None:
    """The cluster a job's blocks go to: ``value`` (a job's ``scheduler`` setting), else
    ``OVERTILE_SCHEDULER``, else Dask's ``scheduler-address``; None for a local cluster."""
    import dask

    return value or os.environ.get("OVERTILE_SCHEDULER") or dask.config.get("scheduler-address", None) or None


def is_slurm(scheduler: str | None) -> bool:
    return bool(scheduler) and (scheduler == SLURM or str(scheduler).startswith(SLURM + ":"))


def read_yaml(path: str | Path) -> list[Any]:
    """The documents of a YAML spec file; a missing or malformed one is an :class:`InputError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such cluster spec")
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
