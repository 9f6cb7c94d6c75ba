"""The overtile flows with a Dask cluster of SLURM jobs for each flow run.

deploy/slurm/prefect.yaml deploys these to a ``process`` work pool whose worker runs on a
login node. Each flow run starts a ``dask_jobqueue.SLURMCluster`` (its scheduler in the flow
run's process) from a profile of deploy/slurm/cluster.yaml; worker jobs are submitted while
blocks wait (adaptive, 0 to ``maximum_jobs``) and cancelled when the run ends. Leave the
``scheduler`` setting empty: it would send the blocks elsewhere.

(Not named ``flows.py``: Prefect imports an entrypoint file as a module named after the
file, which would then shadow the ``flows`` package.)
"""

from __future__ import annotations

from prefect_dask import DaskTaskRunner

from flows.segment import segment
from flows.weight_maps import weight_maps_flow


def slurm_task_runner(profile: str, maximum_jobs: int) -> DaskTaskRunner:
    """A SLURMCluster per flow run, made as ``overtile --scheduler slurm`` makes it: from the
    site's spec (``OVERTILE_SLURM_SPEC``, else deploy/slurm/cluster.yaml) when the run starts,
    with the TLS folder created owner-only and ``security: false`` honoured."""
    return DaskTaskRunner(
        cluster_class="flows.clusters.slurm_cluster",
        cluster_kwargs={"profile": profile},
        adapt_kwargs={"minimum_jobs": 0, "maximum_jobs": maximum_jobs},
    )


# GPU jobs: give the run `device: cuda` (the flow process on the login node has no GPU).
segment_on_slurm = segment.with_options(task_runner=slurm_task_runner("overtile-gpu", maximum_jobs=8))
weight_maps_on_slurm = weight_maps_flow.with_options(task_runner=slurm_task_runner("overtile-cpu", maximum_jobs=4))
