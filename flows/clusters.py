"""Dask clusters built from the specs in ``deploy/``: SLURM jobs through dask-jobqueue,
Kubernetes pods through the dask-kubernetes operator.

The specs are data (YAML) and this module only reads them and hands them on, so one file
serves a standalone scheduler (``python -m flows.clusters``), a Prefect
``DaskTaskRunner`` (its ``cluster_kwargs``) and, for Kubernetes, ``kubectl apply``. Neither
cluster library is a dependency of overtile: install the ``cluster`` extra
(``pip install 'overtile[cluster]'``).

Examples
--------
A scheduler on a login node, whose address ``overtile predict --scheduler`` (or a flow's
``scheduler`` setting) takes; GPU worker jobs are submitted while blocks wait:

    $ python -m flows.clusters slurm --profile overtile-gpu --jobs 8 --port 8786

The same spec as a Prefect task runner (one cluster per flow run, see deploy/slurm/on_slurm.py):

>>> from prefect_dask import DaskTaskRunner                          # doctest: +SKIP
>>> DaskTaskRunner(cluster_class="dask_jobqueue.SLURMCluster",       # doctest: +SKIP
...                cluster_kwargs=slurm_cluster_kwargs("overtile-gpu"),
...                adapt_kwargs={"minimum_jobs": 0, "maximum_jobs": 8})
"""

from __future__ import annotations

import argparse
import copy
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.errors import InputError

# The deploy/ folder beside this package (the repository's, or /opt/overtile/deploy in the
# container image), wherever the process was started; OVERTILE_DEPLOY names another.
DEPLOY = Path(os.environ.get("OVERTILE_DEPLOY") or Path(__file__).resolve().parents[1] / "deploy")
SLURM_SPEC = DEPLOY / "slurm" / "cluster.yaml"
KUBERNETES_MANIFEST = DEPLOY / "kubernetes" / "daskcluster.yaml"

# dask-jobqueue's configuration keys whose keyword argument is not the key with '_' for '-'.
_JOBQUEUE_KWARG = {"name": "job_name"}


def _read_yaml(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such cluster spec")
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None


def slurm_cluster_kwargs(profile: str = "overtile-gpu", spec: str | Path = SLURM_SPEC, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for one profile of a spec file.

    Parameters
    ----------
    profile : str
        A section under ``jobqueue:`` in ``spec`` (``overtile-gpu``, ``overtile-cpu``).
    spec : path
        A YAML file in dask-jobqueue's configuration keys (``job-extra-directives``,
        ``worker-extra-args``, ...); see ``deploy/slurm/cluster.yaml``.
    **overrides
        Keyword arguments that replace the file's (``queue="gpu-long"``, ``account=...``).

    Returns
    -------
    dict
        Keys as ``SLURMCluster`` takes them: ``-`` becomes ``_`` and ``name`` becomes
        ``job_name``. Keys the profile leaves out keep dask-jobqueue's defaults.
    """
    docs = _read_yaml(spec)
    profiles = docs[0].get("jobqueue") if len(docs) == 1 and isinstance(docs[0], dict) else None
    if not isinstance(profiles, dict) or not isinstance(profiles.get(profile), dict):
        known = ", ".join(profiles) if isinstance(profiles, dict) else "none"
        raise InputError(f"{spec}: no SLURM profile {profile!r} under 'jobqueue:' (profiles: {known})")
    kwargs = {_JOBQUEUE_KWARG.get(key, key.replace("-", "_")): value for key, value in profiles[profile].items()}
    kwargs.update(overrides)
    return kwargs


def slurm_cluster(profile: str = "overtile-gpu", spec: str | Path = SLURM_SPEC, **overrides: Any) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` from one profile of ``spec``; no job is submitted
    until the cluster is scaled (``cluster.scale(jobs=N)``) or made adaptive
    (``cluster.adapt(minimum_jobs=0, maximum_jobs=N)``).

    The scheduler starts here, in this process; ``cluster.job_script()`` shows what each job
    would run.
    """
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**slurm_cluster_kwargs(profile, spec, **overrides))


def kubernetes_specs(manifest: str | Path = KUBERNETES_MANIFEST, name: str | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The ``DaskCluster`` resource of ``manifest`` and the worker specs of its extra
    ``DaskWorkerGroup`` resources, keyed by group name without the cluster's prefix.

    With ``name`` the cluster is renamed, its scheduler service's selector included, so
    several can run side by side (the operator adopts a worker group into the cluster it
    is added to, and deletes it with that cluster).
    """
    docs = _read_yaml(manifest)
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "DaskCluster"]
    if len(found) != 1:
        raise InputError(f"{manifest}: expected one DaskCluster resource, found {len(found)}")
    cluster = copy.deepcopy(found[0])
    old = cluster["metadata"]["name"]
    new = name or old
    cluster["metadata"]["name"] = new
    selector = cluster["spec"]["scheduler"].get("service", {}).get("selector", {})
    if "dask.org/cluster-name" in selector:
        selector["dask.org/cluster-name"] = new
    groups = {}
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "DaskWorkerGroup":
            if doc["spec"].get("cluster") != old:
                raise InputError(f"{manifest}: DaskWorkerGroup {doc['metadata']['name']} belongs to "
                                 f"cluster {doc['spec'].get('cluster')!r}, not {old!r}")
            group = doc["metadata"]["name"].removeprefix(f"{old}-")
            groups[group] = copy.deepcopy(doc["spec"]["worker"])
    return cluster, groups


def kubernetes_cluster(manifest: str | Path = KUBERNETES_MANIFEST, name: str | None = None, **kwargs: Any) -> Any:
    """A ``dask_kubernetes.operator.KubeCluster`` made from ``manifest``: its ``DaskCluster``
    (scheduler and default CPU worker group) plus every ``DaskWorkerGroup`` (the GPU
    workers). Deleted again when the cluster is closed.

    ``name`` defaults to the manifest's name plus a random suffix, so concurrent flow runs
    (``DaskTaskRunner(cluster_class="flows.clusters.kubernetes_cluster")``) each get their
    own. Needs the dask-kubernetes operator in the cluster and RBAC to create its resources
    (``deploy/kubernetes/rbac.yaml``). ``kwargs`` go to ``KubeCluster`` (``namespace``, ...).
    """
    from dask_kubernetes.operator import KubeCluster

    if name is None:
        name = f"{kubernetes_specs(manifest)[0]['metadata']['name']}-{secrets.token_hex(3)}"
    spec, groups = kubernetes_specs(manifest, name)
    cluster = KubeCluster(custom_cluster_spec=spec, **kwargs)
    for group, worker in groups.items():
        cluster.add_worker_group(group, custom_spec=worker)
    return cluster


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.clusters slurm ...``: a standalone scheduler that submits SLURM
    worker jobs on demand, printing the address to give ``overtile predict --scheduler``."""
    parser = argparse.ArgumentParser(prog="python -m flows.clusters", description=main.__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    slurm = sub.add_parser("slurm", help="a scheduler here, Dask workers as SLURM jobs (dask-jobqueue)")
    slurm.add_argument("--spec", default=SLURM_SPEC, help=f"the spec file (default {SLURM_SPEC})")
    slurm.add_argument("--profile", default="overtile-gpu", help="a section under 'jobqueue:' (default overtile-gpu)")
    slurm.add_argument("--jobs", type=int, default=4, help="at most this many worker jobs at once (default 4)")
    slurm.add_argument("--min-jobs", type=int, default=0, help="keep at least this many while idle (default 0)")
    slurm.add_argument("--port", type=int, default=8786, help="the scheduler's port (default 8786; 0 for any)")
    slurm.add_argument("--print-job-script", action="store_true", help="print the job script and exit; submits nothing")
    args = parser.parse_args(argv)
    try:
        kwargs = slurm_cluster_kwargs(args.profile, args.spec)
    except InputError as exc:
        print(f"overtile: {exc}", file=sys.stderr)
        return 2
    options = {**(kwargs.get("scheduler_options") or {}), "port": args.port}
    if args.print_job_script:  # a throwaway scheduler on loopback: the interface may not exist here
        options.update(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0")
    kwargs["scheduler_options"] = options
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(**kwargs) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            print("(the scheduler address in it is a throwaway one; real jobs get the scheduler's)", file=sys.stderr)
            return 0
        # Adaptive rather than a fixed scale: jobs that reach their --lifetime (before the
        # walltime) are replaced, and idle GPUs go back to the queue.
        cluster.adapt(minimum_jobs=args.min_jobs, maximum_jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}  (overtile predict ... --scheduler {cluster.scheduler_address})")
        dashboard = cluster.scheduler_info.get("services", {}).get("dashboard")
        print(f"dashboard on port {dashboard} of this machine, bound as {options.get('dashboard_address')!r} "
              f"(from elsewhere: ssh -L {dashboard}:127.0.0.1:{dashboard} THIS-HOST)")
        print(f"up to {args.jobs} {args.profile} jobs on demand; Ctrl-C cancels them and stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
