"""Dask clusters built from the specs in ``deploy/`` (:mod:`pipeline.clusters`), for Prefect
and from a shell: SLURM jobs through dask-jobqueue, Kubernetes pods through the
dask-kubernetes operator.

The specs are data (YAML) and the library only reads them and hands them on, so one file
serves a job's ``scheduler="slurm:PROFILE"``, a standalone scheduler (``python -m
flows.clusters``), a Prefect ``DaskTaskRunner`` (its ``cluster_kwargs``, or
``cluster_class="flows.clusters.kubernetes_cluster"``) and, for Kubernetes, ``kubectl
apply``. Neither cluster library is a dependency of overtile: install the ``cluster`` extra
(``pip install 'overtile[cluster]'``).

Examples
--------
A scheduler on a login node, whose address ``overtile predict --scheduler`` (or a flow's
``scheduler`` setting) takes; GPU worker jobs are submitted while blocks wait:

    $ python -m flows.clusters slurm --profile overtile-gpu --jobs 8 --port 8786

The same spec as a Prefect task runner (one cluster per flow run, see deploy/slurm/on_slurm.py):

>>> from prefect_dask import DaskTaskRunner                          # doctest: +SKIP
>>> DaskTaskRunner(cluster_class="flows.clusters.slurm_cluster",    # doctest: +SKIP
...                cluster_kwargs={"profile": "overtile-gpu"},
...                adapt_kwargs={"minimum_jobs": 0, "maximum_jobs": 8})
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from pipeline.clusters import DEPLOY
from pipeline.clusters.kubernetes import KUBERNETES_MANIFEST, kubernetes_cluster, kubernetes_specs
from pipeline.clusters.slurm import default_spec, slurm_cluster, slurm_cluster_kwargs
from pipeline.errors import InputError

SLURM_SPEC = DEPLOY / "slurm" / "cluster.yaml"
__all__ = ["KUBERNETES_MANIFEST", "SLURM_SPEC", "kubernetes_cluster", "kubernetes_specs", "main", "slurm_cluster",
           "slurm_cluster_kwargs"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.clusters slurm ...``: a standalone scheduler that submits SLURM
    worker jobs on demand, printing the address to give ``overtile predict --scheduler``."""
    parser = argparse.ArgumentParser(prog="python -m flows.clusters", description=main.__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    slurm = sub.add_parser("slurm", help="a scheduler here, Dask workers as SLURM jobs (dask-jobqueue)")
    slurm.add_argument("--spec", default=None, help=f"the spec file (default $OVERTILE_SLURM_SPEC, else {SLURM_SPEC})")
    slurm.add_argument("--profile", default="overtile-gpu", help="a section under 'jobqueue:' (default overtile-gpu)")
    slurm.add_argument("--jobs", type=int, default=4, help="at most this many worker jobs at once (default 4)")
    slurm.add_argument("--min-jobs", type=int, default=0, help="keep at least this many while idle (default 0)")
    slurm.add_argument("--port", type=int, default=8786, help="the scheduler's port (default 8786; 0 for any)")
    slurm.add_argument("--print-job-script", action="store_true", help="print the job script and exit; submits nothing")
    args = parser.parse_args(argv)
    try:
        kwargs = slurm_cluster_kwargs(args.profile, args.spec or default_spec())
    except InputError as exc:
        print(f"overtile: {exc}", file=sys.stderr)
        return 2
    options = {**(kwargs.get("scheduler_options") or {}), "port": args.port}
    if args.print_job_script:  # a throwaway scheduler on loopback: the interface may not exist here
        options.update(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0")
    with slurm_cluster(args.profile, args.spec, scheduler_options=options) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            print("(the scheduler address in it is a throwaway one; real jobs get the scheduler's)", file=sys.stderr)
            return 0
        # Adaptive rather than a fixed scale: jobs that reach their --lifetime (before the
        # walltime) are replaced, and idle GPUs go back to the queue.
        cluster.adapt(minimum_jobs=args.min_jobs, maximum_jobs=args.jobs)
        print(f"scheduler {cluster.scheduler_address}  (overtile predict ... --scheduler {cluster.scheduler_address})")
        if cluster.security and cluster.security.require_encryption:
            print("TLS: clients need this cluster's certificate; in the shell that runs overtile:\n"
                  + "\n".join(f"    export {k}={v}" for k, v in client_tls(cluster, kwargs).items()))
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


def client_tls(cluster: Any, kwargs: dict[str, Any]) -> dict[str, str]:
    """The client's certificate of a TLS cluster written beside the workers' (owner-only
    files in the profile's shared-temp-directory), as the Dask settings a client process
    reads from its environment."""
    import os
    import tempfile

    folder = os.path.expanduser(str(kwargs.get("shared_temp_directory") or "."))
    names = {"tls_ca_file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
             "tls_client_cert": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
             "tls_client_key": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"}
    found = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    for key, value in cluster.security.get_tls_config_for_role("client").items():
        if key in names and value:
            handle, path = tempfile.mkstemp(prefix=f".overtile-client.{key}.", dir=folder)  # mode 0600
            with os.fdopen(handle, "w") as f:
                f.write(value)
            found[names[key]] = path
    return found


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
