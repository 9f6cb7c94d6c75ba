"""The cluster specs in deploy/ hold together without a cluster: every file parses, the
Kubernetes manifests have the structure the dask-kubernetes operator expects and give GPU
workers the `GPU` resource, the Dockerfile builds what the manifests run, and
dask-jobqueue writes the SLURM job script we mean, without submitting a job."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from flows import clusters
from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "daskcluster.yaml"
SLURM_SPEC = DEPLOY / "slurm" / "cluster.yaml"
PREFECT_FILES = sorted(DEPLOY.rglob("prefect.yaml"))
IMAGE = "overtile:0.1.0"


def load_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(docs: list, name: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == name]


def containers(pod_spec: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec["containers"]}


def after(args: list[str], flag: str) -> str:
    """The value that follows ``flag`` in a command line."""
    assert flag in args, f"{flag} missing from {args}"
    return str(args[args.index(flag) + 1])


# --- every file -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_in_deploy_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".md"
                                        and "__pycache__" not in p.parts), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_credentials_in_deploy_files(path):
    """Passwords, keys and auth strings come from Secrets or the environment, never a file."""
    secret = re.compile(r"(?i)(password|passwd|secret_access_key|api_key|auth_string|token)\s*[:=]\s*['\"]?[^\s'\"$<{]")
    assert not [line for line in path.read_text().splitlines() if secret.search(line)]


# --- Prefect deployments ----------------------------------------------------------------------

def defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
    return False


@pytest.mark.parametrize("path", PREFECT_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_prefect_yaml_entrypoints_exist_and_pools_are_named(path):
    (doc,) = load_all(path)
    assert doc["deployments"]
    for deployment in doc["deployments"]:
        file, _, name = deployment["entrypoint"].partition(":")
        assert (ROOT / file).is_file(), deployment["entrypoint"]
        assert defines(ROOT / file, name), deployment["entrypoint"]
        assert deployment["work_pool"]["name"]
    names = [d["name"] for d in doc["deployments"]]
    assert len(names) == len(set(names))


def test_deployment_names_do_not_collide_across_prefect_files():
    seen: dict[tuple[str, str], Path] = {}
    for path in PREFECT_FILES:
        for d in load_all(path)[0]["deployments"]:
            key = (d["entrypoint"], d["name"])
            assert key not in seen, f"{key} in {path} and {seen[key]}"
            seen[key] = path


def test_kubernetes_deployments_run_the_image_code():
    (doc,) = load_all(DEPLOY / "kubernetes" / "prefect.yaml")
    (step,) = doc["pull"]
    workdir = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert f"WORKDIR {workdir}" in (DEPLOY / "Dockerfile").read_text()
    for d in doc["deployments"]:
        assert d["work_pool"]["name"] == "overtile-k8s"
        assert d["work_pool"]["job_variables"]["image"] == IMAGE


def test_work_pool_template_fills_every_placeholder():
    template = json.loads((DEPLOY / "kubernetes" / "work-pool.json").read_text())
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    variables = template["variables"]["properties"]
    assert placeholders <= set(variables), placeholders - set(variables)
    job = template["job_configuration"]["job_manifest"]
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    assert all(s["secretRef"]["optional"] for s in container["envFrom"])
    assert variables["image"]["default"] == IMAGE
    # the pool's flow-run pods use the service account and claim defined beside it
    (account,) = kind(load_all(DEPLOY / "kubernetes" / "rbac.yaml"), "ServiceAccount")
    assert variables["service_account_name"]["default"] == account["metadata"]["name"]
    (claim,) = kind(load_all(DEPLOY / "kubernetes" / "storage.yaml"), "PersistentVolumeClaim")
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# --- Kubernetes: the DaskCluster ----------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest() -> dict:
    docs = load_all(MANIFEST)
    assert all(d["apiVersion"] == "kubernetes.dask.org/v1" for d in docs)
    assert sorted(d["kind"] for d in docs) == ["DaskCluster", "DaskWorkerGroup"]
    (cluster,) = kind(docs, "DaskCluster")
    (gpu,) = kind(docs, "DaskWorkerGroup")
    return {"cluster": cluster, "gpu": gpu}


def test_scheduler_serves_8786_and_8787_inside_the_cluster_only(manifest):
    scheduler = manifest["cluster"]["spec"]["scheduler"]
    service = scheduler["service"]
    assert service["type"] == "ClusterIP"
    assert {p["port"] for p in service["ports"]} == {8786, 8787}
    assert service["selector"] == {"dask.org/cluster-name": manifest["cluster"]["metadata"]["name"],
                                   "dask.org/component": "scheduler"}
    container = containers(scheduler["spec"])["scheduler"]
    assert container["args"][:2] == ["dask", "scheduler"]
    assert after(container["args"], "--port") == "8786"
    assert {p["name"] for p in container["ports"]} == {p["targetPort"] for p in service["ports"]}


def test_gpu_group_requests_a_gpu_and_offers_the_gpu_resource(manifest):
    gpu = manifest["gpu"]
    assert gpu["spec"]["cluster"] == manifest["cluster"]["metadata"]["name"]
    assert gpu["metadata"]["name"] == f"{gpu['spec']['cluster']}-gpu"
    pod = gpu["spec"]["worker"]["spec"]
    worker = containers(pod)["worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["args"][:2] == ["dask", "worker"]
    assert after(worker["args"], "--resources") == "GPU=1"
    assert after(worker["args"], "--nthreads") == "2"  # one computes on the GPU, one reads ahead
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_cpu_group_has_no_gpu_and_one_slot_per_core(manifest):
    pod = manifest["cluster"]["spec"]["worker"]["spec"]
    worker = containers(pod)["worker"]
    assert "--resources" not in worker["args"]
    assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})
    assert after(worker["args"], "--nthreads") == str(worker["resources"]["requests"]["cpu"])


def test_every_pod_runs_the_image_as_the_unprivileged_user(manifest):
    pods = [manifest["cluster"]["spec"]["scheduler"]["spec"], manifest["cluster"]["spec"]["worker"]["spec"],
            manifest["gpu"]["spec"]["worker"]["spec"]]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for pod in pods:
        assert {c["image"] for c in pod["containers"]} == {IMAGE}
        assert pod["securityContext"]["runAsNonRoot"] and f"--uid {pod['securityContext']['runAsUser']}" in dockerfile


def test_workers_mount_the_shared_data_claim(manifest):
    (claim,) = kind(load_all(DEPLOY / "kubernetes" / "storage.yaml"), "PersistentVolumeClaim")
    for pod in (manifest["cluster"]["spec"]["worker"]["spec"], manifest["gpu"]["spec"]["worker"]["spec"]):
        assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
        assert containers(pod)["worker"]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]


def test_kubernetes_specs_rename_the_cluster_throughout():
    spec, groups = clusters.kubernetes_specs(MANIFEST, name="overtile-1a2b3c")
    assert spec["metadata"]["name"] == "overtile-1a2b3c"
    assert spec["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "overtile-1a2b3c"
    assert list(groups) == ["gpu"]
    assert after(containers(groups["gpu"]["spec"])["worker"]["args"], "--resources") == "GPU=1"
    assert clusters.kubernetes_specs(MANIFEST)[0]["metadata"]["name"] == "overtile"  # the file is not changed


@pytest.mark.slow
def test_manifest_validates_against_the_operators_crds(manifest):
    """The operator's own CustomResourceDefinitions (shipped in dask-kubernetes) accept it."""
    dask_kubernetes = pytest.importorskip("dask_kubernetes")
    jsonschema = pytest.importorskip("jsonschema")
    crds = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    if not crds.is_dir():
        pytest.skip(f"{crds}: not in this dask-kubernetes release")
    for resource, crd_file in ((manifest["cluster"], "daskcluster.yaml"), (manifest["gpu"], "daskworkergroup.yaml")):
        (crd,) = load_all(crds / crd_file)
        assert crd["spec"]["names"]["kind"] == resource["kind"]
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        jsonschema.validate(resource, version["schema"]["openAPIV3Schema"])


# --- the container image -------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_builds_on_a_cuda_pytorch_runtime_image():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    (base,) = [a for i, a in instructions if i == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda1\d\.\d+-cudnn\d+-runtime", base), base


def test_dockerfile_installs_overtile_with_the_cluster_extra_and_drops_root():
    instructions = dockerfile_instructions()
    runs = " && ".join(a for i, a in instructions if i == "RUN")
    install = re.search(r"pip install \"\.\[([\w,]+)\]\"", runs)
    assert install, runs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(install.group(1).split(",")) <= set(extras)
    assert any("dask-jobqueue" in r for r in extras["cluster"]) and any("dask-kubernetes" in r for r in extras["cluster"])
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1] not in {"root", "0"}
    # what the image copies exists, and the BuildKit ignore file lets it into the context
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for i, a in instructions:
        if i == "COPY":
            *sources, _ = shlex.split(a)
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, source


# --- SLURM ---------------------------------------------------------------------------------------

def test_slurm_profiles_become_slurmcluster_keywords():
    kwargs = clusters.slurm_cluster_kwargs("overtile-gpu", SLURM_SPEC, account="lab42")
    assert kwargs["queue"] == "gpu" and kwargs["account"] == "lab42"
    assert kwargs["job_name"] == "overtile-gpu" and "name" not in kwargs
    assert kwargs["job_extra_directives"] == ["--gres=gpu:1"]
    assert not any("-" in key for key in kwargs)


def test_an_unknown_profile_is_named_with_the_ones_there_are():
    with pytest.raises(InputError, match=r"cluster\.yaml: no SLURM profile 'gpu'.*overtile-gpu, overtile-cpu"):
        clusters.slurm_cluster_kwargs("gpu", SLURM_SPEC)


@pytest.fixture
def no_sbatch(monkeypatch):
    """Fail the test if dask-jobqueue runs any SLURM command (sbatch, scancel, squeue)."""
    core = pytest.importorskip("dask_jobqueue.core")
    calls: list = []

    async def refuse(cmd, **kwargs):
        calls.append(cmd)
        raise AssertionError(f"a SLURM command was run: {cmd}")

    monkeypatch.setattr(core.Job, "_call", staticmethod(refuse))
    yield calls
    assert calls == []


def loopback(tmp_path: Path) -> dict:
    """Overrides that keep the test's scheduler on this machine: the spec's interface (ib0)
    stays in the workers' command line but the scheduler binds 127.0.0.1."""
    return {"scheduler_options": {"host": "127.0.0.1", "port": 0, "dashboard_address": "127.0.0.1:0"},
            "log_directory": str(tmp_path / "logs"), "shared_temp_directory": str(tmp_path / "tls")}


def test_gpu_job_script_asks_for_a_gpu_and_offers_the_gpu_resource(no_sbatch, tmp_path):
    with clusters.slurm_cluster("overtile-gpu", SLURM_SPEC, **loopback(tmp_path)) as cluster:
        script = cluster.job_script()
        assert not cluster.workers and not cluster.worker_spec  # never scaled: nothing submitted
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH -p gpu" in header
    assert "#SBATCH --gres=gpu:1" in header
    assert "#SBATCH --cpus-per-task=8" in header
    assert "#SBATCH --mem=64G" in header
    assert "#SBATCH -t 04:00:00" in header
    assert "#SBATCH -J overtile-gpu" in header
    command = shlex.split(script.splitlines()[-1])
    assert command[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert command[3].startswith("tls://127.0.0.1:")  # TLS by default, with this cluster's own certificates
    for flag in ("--tls-ca-file", "--tls-cert", "--tls-key"):
        assert Path(after(command, flag)).parent == tmp_path / "tls"
    assert after(command, "--resources") == "GPU=1"
    assert after(command, "--nthreads") == "2"
    assert "--nworkers" not in command  # one worker process per GPU
    assert after(command, "--interface") == "ib0"
    assert after(command, "--lifetime") == "225m"
    assert after(command, "--dashboard-address") == "127.0.0.1:0"
    assert "--local-directory ${TMPDIR:-/tmp}" in script  # expanded by the job's shell


@pytest.mark.slow
def test_the_gpu_job_scripts_command_starts_a_worker_that_takes_gpu_tasks(no_sbatch, tmp_path):
    """Run the job script's worker command here (on loopback instead of ib0): it starts, offers
    GPU=1 with one thread, and runs a task that asks for the GPU resource."""
    from distributed import Client

    with clusters.slurm_cluster("overtile-gpu", SLURM_SPEC, interface="lo", **loopback(tmp_path)) as cluster, \
            Client(cluster) as client:
        command = cluster.job_script().splitlines()[-1]
        worker = subprocess.Popen(["bash", "-c", f"exec {command}"], env={**os.environ, "TMPDIR": str(tmp_path)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(1, timeout=60)
            (info,) = client.scheduler_info()["workers"].values()
            assert info["resources"] == {"GPU": 1} and info["nthreads"] == 2
            assert client.submit(sum, [1, 2], resources={"GPU": 1}, pure=False).result(timeout=30) == 3
        finally:
            worker.terminate()
            worker.wait(30)


def test_cpu_job_script_has_one_slot_per_core_and_no_gpu(no_sbatch, tmp_path):
    with clusters.slurm_cluster("overtile-cpu", SLURM_SPEC, **loopback(tmp_path)) as cluster:
        script = cluster.job_script()
    assert "--gres" not in script and "GPU=1" not in script
    assert "#SBATCH -p cpu" in script and "#SBATCH --cpus-per-task=32" in script
    command = shlex.split(script.splitlines()[-1])
    assert after(command, "--nworkers") == "4"
    assert after(command, "--nthreads") == "8"


def test_print_job_script_submits_nothing(no_sbatch, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # the profile's shared-temp-directory is under ~
    assert clusters.main(["slurm", "--spec", str(SLURM_SPEC), "--profile", "overtile-gpu", "--print-job-script"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script


@pytest.mark.parametrize("entrypoint, name, gpu, jobs", [("segment_on_slurm", "segment", True, 8),
                                                     ("weight_maps_on_slurm", "weight-maps", False, 4)])
def test_slurm_flows_carry_a_slurmcluster_task_runner(monkeypatch, entrypoint, name, gpu, jobs):
    pytest.importorskip("dask_jobqueue")
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(f"deploy/slurm/on_slurm.py:{entrypoint}", use_placeholder_flow=False)
    runner = flow.task_runner
    assert flow.name == name
    # made when the run starts, as --scheduler slurm makes it (the site's spec, the TLS folder)
    assert runner.cluster_class == "flows.clusters.slurm_cluster"
    assert runner.resolved_cluster_class is clusters.slurm_cluster
    kwargs = clusters.slurm_cluster_kwargs(runner.cluster_kwargs["profile"])
    assert ("--gres=gpu:1" in kwargs.get("job_extra_directives", [])) == gpu
    assert ("GPU=1" in kwargs["worker_extra_args"]) == gpu
    assert runner.adapt_kwargs == {"minimum_jobs": 0, "maximum_jobs": jobs}


def test_specs_are_found_from_any_working_directory(monkeypatch, tmp_path):
    """The default spec paths are the deploy/ folder beside the package, not the process's
    working directory (a Prefect worker may start flow runs anywhere)."""
    monkeypatch.chdir(tmp_path)
    assert clusters.SLURM_SPEC.is_file() and clusters.KUBERNETES_MANIFEST.is_file()
    assert clusters.slurm_cluster_kwargs("overtile-cpu")["cores"] >= 1
    assert clusters.kubernetes_specs()[0]["kind"] == "DaskCluster"


def test_every_worker_spec_starts_workers_with_the_allocator_that_keeps_memory():
    """The SLURM job scripts and the Kubernetes worker pods put the allocator setting of the
    LocalCluster into the workers' environment before they start (glibc reads it then)."""
    from pipeline.clusters import WORKER_ENVIRONMENT

    for profile in ("overtile-gpu", "overtile-cpu"):
        prologue = " ".join(clusters.slurm_cluster_kwargs(profile)["job_script_prologue"])
        for name, value in WORKER_ENVIRONMENT.items():
            assert f"{name}={value}" in prologue, (profile, name)
    cluster, groups = clusters.kubernetes_specs()
    pods = [cluster["spec"]["worker"]["spec"]] + [g["spec"] for g in groups.values()]
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["containers"][0].get("env", [])}
        assert env == {**env, **WORKER_ENVIRONMENT}
