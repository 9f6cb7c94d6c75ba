"""Deployments end to end with real servers: ``deploy/prefect.yaml`` deployed to a Prefect
server, a process worker, runs triggered through the API and from the UI in headless Chromium
(Playwright), outputs and artifacts checked through the API, and a rerun that skips."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.jobs.predict import PredictSettings, predict

from conftest import cells, make_model, write_zarr
from servers import BIN, ROOT
from test_flows import COMPUTED, SKIPPED, table

pytestmark = pytest.mark.slow  # a Prefect server, a Prefect worker, deployments, a browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-output" / "ui"


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """All deployments of deploy/prefect.yaml on the server, and a process worker polling."""
    data = tmp_path_factory.mktemp("deployed")
    image = write_zarr(data / "image.zarr", cells((256, 384), seed=5))
    model = make_model(data / "model.pt")
    prefect_server.cli("work-pool", "create", "overtile", "--type", "process")
    out = prefect_server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    assert "segment" in out
    worker = prefect_server.spawn([str(BIN / "prefect"), "worker", "start", "--pool", "overtile", "--type", "process"],
                                  "worker.log", PREFECT_WORKER_QUERY_SECONDS="1")
    deployment = prefect_server.request("GET", "/deployments/name/segment/segment")
    yield {"server": prefect_server, "deployment": deployment, "image": image, "model": str(model), "data": data,
           "worker": worker}
    from servers import stop

    stop(worker)


def parameters(d: dict, output: str) -> dict:
    return {"settings": {"input": d["image"], "output": output, "model": d["model"], "block_size": 128}}


def test_every_deployment_in_prefect_yaml_is_on_the_server(deployed):
    server = deployed["server"]
    names = {(d["name"], d["entrypoint"]) for d in server.request("POST", "/deployments/filter", {})}
    assert {n for n, _ in names} >= {"segment", "weight-maps", "train", "ingest", "cohort", "cohort-slide"}
    segment = deployed["deployment"]
    assert segment["work_pool_name"] == "overtile"
    assert any(s["schedule"].get("cron") == "0 2 * * *" for s in segment["schedules"])
    # the UI renders a form from this schema: the settings model with descriptions and defaults
    schema = segment["parameter_openapi_schema"]
    settings = schema["definitions"]["PredictSettings"]["properties"]
    assert settings["block_size"]["description"].startswith("Block edge")
    assert settings["overlap"]["default"] == 0.5
    cohort = server.request("GET", "/deployments/name/cohort/cohort")["parameter_openapi_schema"]["definitions"]
    assert cohort["CohortSettings"]["properties"]["slides_in_flight"]["default"] == 3
    assert cohort["SlideObjects"]["properties"]["output"]["default"] == "cells.zarr"


@pytest.fixture(scope="module")
def api_run(deployed, client) -> dict:
    """The segment deployment run once through the API; the UI's quick run below reruns it."""
    server, d = deployed["server"], deployed
    output = str(d["data"] / "api.zarr")
    first = server.request("POST", f"/deployments/{d['deployment']['id']}/create_flow_run",
                           {"parameters": parameters(d, output)})
    run = server.wait_for_run(first["id"])
    assert run["state_type"] == "COMPLETED", (server.home / "worker.log").read_text()[-4000:]
    clean = d["data"] / "clean.zarr"
    predict(PredictSettings(input=d["image"], output=str(clean), model=d["model"], block_size=128), client=client)
    return {"run": run, "output": output, "clean": clean}


def test_run_through_the_api(deployed, api_run):
    server = deployed["server"]
    out = zarr.open_array(api_run["output"] + "/0", mode="r")[...]
    assert np.array_equal(out, zarr.open_array(str(api_run["clean"] / "0"), mode="r")[...])
    artifacts = server.artifacts(api_run["run"]["id"])
    summary = table(artifacts["segment-summary"])
    assert summary[COMPUTED] == "6" and summary[SKIPPED] == "0"
    assert "data:image/jpeg;base64," in artifacts["segment-preview"]["data"]


def chromium_or_skip() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (make test installs Debian's chromium where it can: apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    return CHROMIUM


def test_quick_run_from_the_ui_reruns_and_skips_what_the_api_run_finished(deployed, api_run):
    """Click Run > Quick run on the segment deployment page in headless Chromium, with the
    parameters of the API's run: the run completes having computed nothing (every block is in
    the ledger) and says so; screenshots of the deployment page and of the run's artifacts."""
    executable = chromium_or_skip()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    server, d = deployed["server"], deployed
    deployment_id = d["deployment"]["id"]
    output = api_run["output"]
    server.request("PATCH", f"/deployments/{deployment_id}", {"parameters": parameters(d, output)})
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    by_deployment = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    before = {r["id"] for r in server.request("POST", "/flow_runs/filter", by_deployment)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{server.url}/deployments")
            page.get_by_role("link", name="segment", exact=True).first.click()
            page.wait_for_url(f"**/deployments/deployment/{deployment_id}**")
            expect(page.get_by_text("flows/segment.py:segment").first).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "deployment.png"), full_page=True)
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Quick run").first.click()
            # Some UI versions start the run at once, this one confirms with the parameter form
            dialog_run = page.get_by_role("dialog").get_by_role("button", name="Run", exact=True)
            runs: list = []
            deadline = time.monotonic() + 60
            while not runs and time.monotonic() < deadline:
                if dialog_run.count() and dialog_run.is_visible():
                    page.screenshot(path=str(SCREENSHOTS / "run-form.png"))
                    try:  # the form may be closing: the run was created, and the filter below sees it
                        dialog_run.click(timeout=3000)
                    except PlaywrightTimeout:
                        pass
                runs = [r for r in server.request("POST", "/flow_runs/filter", by_deployment) if r["id"] not in before]
                page.wait_for_timeout(500)
            assert runs, "clicking Quick run created no flow run"
            run = server.wait_for_run(runs[0]["id"])
            assert run["state_type"] == "COMPLETED", (server.home / "worker.log").read_text()[-4000:]

            page.goto(f"{server.url}/runs/flow-run/{run['id']}")
            expect(page.get_by_text("Completed").first).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "run.png"), full_page=True)
            page.get_by_text("Artifacts", exact=True).first.click()
            expect(page.get_by_text("overtile segment: what this run did").first).to_be_visible()
            page.wait_for_timeout(1000)  # images in the markdown artifact
            page.screenshot(path=str(SCREENSHOTS / "run-artifacts.png"), full_page=True)
            page.get_by_text("segment-preview", exact=True).last.click()  # the picture renders in the UI
            picture = page.locator("img[src^='data:image/jpeg']").first
            expect(picture).to_be_visible()
            assert picture.evaluate("img => img.naturalWidth") > 100
            page.screenshot(path=str(SCREENSHOTS / "preview-artifact.png"), full_page=True)
        finally:
            browser.close()
    summary = table(server.artifacts(run["id"])["segment-summary"])
    assert summary[COMPUTED] == "0" and summary[SKIPPED] == "6"
    assert server.logs(run["id"], "already finished")
    assert all((SCREENSHOTS / n).stat().st_size > 10_000 for n in ("deployment.png", "run.png", "run-artifacts.png",
                                                                   "preview-artifact.png"))


def test_a_study_on_s3_killed_then_rerun_from_the_api_skips_the_finished_slides(deployed, s3):
    """The cohort deployment through the API: three slides (a generated OME-TIFF pyramid, one in
    the bucket, a PNG that is ingested) and a broken one, the study's
    outputs in the bucket, credentials through the run's environment only. The flow-run
    process is killed (SIGKILL, with its Dask workers) once a slide has finished; a rerun from
    the API skips the finished slides, does the others, and reports the broken one."""
    import psutil

    from conftest import S3_ENVIRONMENT
    from pipeline.jobs.cohort import read_record
    from test_cohort import write_slide, write_study

    server, d = deployed["server"], deployed
    folder = write_study(d["data"] / "study")  # a, b, c (OME-TIFF), d (PNG: ingested), broken.svs
    remote = s3.url("slides/e.ome.tiff")
    write_slide(folder / "e.ome.tiff", (256, 384), ((40, 200), (50, 300)), seed=7)
    s3.filesystem().put(str(folder / "e.ome.tiff"), remote)
    (folder / "e.ome.tiff").unlink()
    listed = ["a.ome.tiff", "d.png", remote, "broken.svs"]  # a real SVS in a manifest: test_cohort.py
    (folder / "study.csv").write_text("slide\n" + "\n".join(listed) + "\n")
    model = make_model(d["data"] / "rgb.pt", in_channels=3, base_channels=2)
    output = s3.url("study-out")
    body = {"parameters": {"settings": {"slides": str(folder / "study.csv"), "output": output, "model": str(model),
                                        "block_size": 128, "workers": 1, "slides_in_flight": 1}},
            "job_variables": {"env": {**S3_ENVIRONMENT, "AWS_ENDPOINT_URL": s3.endpoint}}}
    cohort = server.request("GET", "/deployments/name/cohort/cohort")
    server.request("POST", f"/deployments/{cohort['id']}/create_flow_run", body)
    fs, names = s3.filesystem(), ["a", "d", "e"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(fs.exists(f"{s3.name}/study-out/{n}/slide.json") for n in names):
        time.sleep(0.2)
    worker = psutil.Process(d["worker"].pid)
    flow_processes = worker.children(recursive=True)
    assert flow_processes, "no flow-run process to kill"
    for process in flow_processes:
        process.kill()
    psutil.wait_procs(flow_processes, timeout=30)
    assert not fs.exists(f"{s3.name}/study-out/study.csv"), "the study ended before it was killed"
    finished = {n for n in names if (read_record(f"{output}/{n}") or {}).get("status") == "finished"}
    assert finished and len(finished) < len(names)

    second = server.request("POST", f"/deployments/{cohort['id']}/create_flow_run", body)
    run = server.wait_for_run(second["id"])
    assert run["state_type"] == "COMPLETED", (server.home / "worker.log").read_text()[-4000:]
    rows = server.artifacts(second["id"])["study-table"]["data"]
    rows = {r["name"]: r for r in (json.loads(rows) if isinstance(rows, str) else rows)}
    assert {n for n, r in rows.items() if r["status"] == "finished before"} == finished
    assert rows["broken"]["status"] == "failed" and "broken.svs" in rows["broken"]["error"]
    assert all(rows[n]["status"] in ("finished", "finished before") for n in names)
    assert rows["e"]["read"] == "in place" and rows["e"]["slide"] == remote
    for name in names:  # every slide's blocks with tissue are in its ledger, in the bucket
        ledger = zarr.open_array(f"{output}/{name}/prediction.zarr/ledger", mode="r")[...]
        assert ledger.sum() == int(rows[name]["blocks_total"]) - int(rows[name]["blocks_without_tissue"] or 0)
    children = server.request("POST", "/flow_runs/filter",
                              {"flow_runs": {"parent_flow_run_id": {"any_": [second["id"]]}}})
    assert {c["name"] for c in children} == set(rows) - finished


def test_a_flow_run_on_slurm_picked_by_the_deployments_job_variables(deployed, slurm, client):
    """The segment deployment run through the API with job variables that send its blocks to
    SLURM worker jobs (the site's spec and profile in the run's environment): the run
    completes, its log says where the blocks ran, SLURM allocated jobs for it, and the output
    equals a local run's."""
    import os

    server, d = deployed["server"], deployed
    output = str(d["data"] / "on-slurm.zarr")
    log = slurm.home / "log" / "slurmctld.log"
    allocated = log.read_text().count("Allocate JobId")
    env = {"OVERTILE_SCHEDULER": "slurm:overtile-cpu", "SLURM_CONF": os.environ["SLURM_CONF"],
           "OVERTILE_SLURM_SPEC": os.environ["OVERTILE_SLURM_SPEC"]}
    run = server.request("POST", f"/deployments/{d['deployment']['id']}/create_flow_run",
                         {"parameters": parameters(d, output), "job_variables": {"env": env}})
    state = server.wait_for_run(run["id"])
    assert state["state_type"] == "COMPLETED", (server.home / "worker.log").read_text()[-4000:]
    assert server.logs(run["id"], "Blocks run on SLURM worker jobs (slurm:overtile-cpu, scheduler tls://")
    assert log.read_text().count("Allocate JobId") > allocated
    clean = d["data"] / "slurm-clean.zarr"
    predict(PredictSettings(input=d["image"], output=str(clean), model=d["model"], block_size=128), client=client)
    np.testing.assert_array_equal(zarr.open_array(output + "/0", mode="r")[...],
                                  zarr.open_array(str(clean / "0"), mode="r")[...])


def test_every_deployments_inputs_are_what_make_demo_writes():
    """Quick run works after `make demo`: every input a deployment's defaults name is under
    demo-data/ (scripts/demo.py writes there), none a placeholder to replace."""
    import yaml

    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    inputs = {(d["name"], key): value for d in spec["deployments"]
              for key, value in (d.get("parameters", {}).get("settings") or {}).items()
              if key in ("input", "model", "images", "labels", "slides", "slide")}
    assert {"segment", "weight-maps", "train", "ingest", "cohort"} <= {name for name, _ in inputs}
    assert all(str(v).startswith("demo-data/") for v in inputs.values()), inputs
    demo = (ROOT / "scripts" / "demo.py").read_text()
    assert 'f"slide{k + 1}.ome.tiff"' in demo and 'out / "slides"' in demo  # demo-data/slides/slide1.ome.tiff
