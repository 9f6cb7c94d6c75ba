"""Dask on Kubernetes through the dask-kubernetes operator, from the manifest in
``deploy/kubernetes/daskcluster.yaml``: the ``DaskCluster`` (scheduler and CPU workers) and its
``DaskWorkerGroup`` resources (GPU workers). No cluster can run where the tests run: the
manifest is parsed and validated against the operator's CRDs (tests/test_cluster_specs.py).
"""

from __future__ import annotations

import copy
import secrets
from pathlib import Path
from typing import Any

from pipeline.clusters import DEPLOY, read_yaml
from pipeline.errors import InputError

KUBERNETES_MANIFEST = DEPLOY / "kubernetes" / "daskcluster.yaml"


def kubernetes_specs(manifest: str | Path = KUBERNETES_MANIFEST, name: str | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The ``DaskCluster`` resource of ``manifest`` and the worker specs of its extra
    ``DaskWorkerGroup`` resources, keyed by group name without the cluster's prefix.

    With ``name`` the cluster is renamed, its scheduler service's selector included, so
    several can run side by side (the operator adopts a worker group into the cluster it
    is added to, and deletes it with that cluster).
    """
    docs = read_yaml(manifest)
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
