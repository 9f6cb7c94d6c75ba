"""A study of slides on one shared cluster (``overtile cohort``, :mod:`pipeline.jobs.cohort`):
each slide's outputs equal the same run on the slide alone, a broken slide is its row and the
others go on, a rerun skips the finished slides without a cluster, a run killed half-way and
rerun gives the same outputs, and the study table is what pandas reads."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.jobs.cohort import COLUMNS, CohortSettings, SlideObjects, SlideRun, list_slides, run_cohort
from pipeline.jobs.predict import PredictSettings, predict

from conftest import SHARED_DATA, make_model
from servers import ROOT
from test_flows import logs_reach_the_server  # noqa: F401 - autouse: flow logs reach the server before it stops

PIXEL_UM = 0.5


def write_slide(path: Path, shape: tuple[int, int], blob: tuple[tuple[int, int], tuple[int, int]],
                seed: int = 0) -> Path:
    """A pyramidal RGB OME-TIFF (tiles of 64, one sub-resolution) of white glass with one
    pink 'tissue' region, 0.5 µm pixels."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(235, 6, (*shape, 3)), 0, 255).astype(np.uint8)
    (y0, y1), (x0, x1) = blob
    tissue = np.array([200, 110, 170]) + rng.normal(0, 15, (y1 - y0, x1 - x0, 3))
    image[y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    options = dict(tile=(64, 64), photometric="rgb", compression="zlib")
    metadata = {"axes": "YXS", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
                "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, subifds=1, metadata=metadata, **options)
        tw.write(image[::2, ::2], subfiletype=1, **options)
    return path


def write_study(folder: Path) -> Path:
    """Three OME-TIFF slides of different sizes, a PNG picture (ingested: it cannot be read by
    region), and a TIFF cut off half-way (the broken one)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    write_slide(folder / "a.ome.tiff", (384, 512), ((50, 200), (60, 300)), seed=1)
    write_slide(folder / "b.ome.tiff", (512, 768), ((300, 450), (400, 700)), seed=2)
    write_slide(folder / "c.ome.tiff", (256, 320), ((0, 256), (0, 320)), seed=3)
    rgb = np.clip(np.random.default_rng(4).normal(200, 30, (200, 260, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "d.png")
    whole = write_slide(folder / "whole.tiff", (256, 256), ((0, 128), (0, 128)), seed=5).read_bytes()
    (folder / "broken.svs").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.tiff").unlink()
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory, client):
    """The study and one clean run of it (objects with outlines), on the session's 2-worker cluster."""
    base = tmp_path_factory.mktemp("study")
    slides = write_study(base / "slides")
    model = make_model(base / "rgb.pt", in_channels=3, base_channels=2)
    settings = CohortSettings(slides=str(slides), output=str(base / "clean"), model=str(model), block_size=128,
                              workers=2, objects=SlideObjects(geojson="cells.geojson.gz", grow_distance=2))
    blocks: list[tuple[str, dict]] = []
    rows = run_cohort(settings, report=SlideRun(on_block=lambda name, record: blocks.append((name, record))),
                      client=lambda: client)
    return {"settings": settings, "rows": {r["name"]: r for r in rows}, "blocks": blocks, "base": base}


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.slow
def test_each_slide_equals_its_own_run_and_the_broken_one_is_its_row(study, client, tmp_path):
    rows, settings = study["rows"], study["settings"]
    assert sorted(rows) == ["a", "b", "broken", "c", "d"]
    assert {n: r["status"] for n, r in rows.items()} == {**dict.fromkeys("abcd", "finished"), "broken": "failed"}
    assert "broken.svs" in rows["broken"]["error"] and "truncated" in rows["broken"]["error"]
    assert rows["a"]["read"] == "in place" and rows["d"]["read"].startswith("ingested (a picture")
    # the mostly empty slide computes only the blocks near its tissue
    assert rows["b"]["blocks_without_tissue"] > 0 and rows["c"]["blocks_without_tissue"] == 0
    a = rows["a"]
    assert a["tissue_area_mm2"] == pytest.approx(a["tissue_fraction"] * 384 * 512 * (PIXEL_UM * 1e-3) ** 2, rel=1e-4)
    for name, source in (("a", a["slide"]), ("d", f"{settings.output}/d/image.zarr")):
        alone = tmp_path / f"{name}.zarr"
        predict(PredictSettings(input=source, output=str(alone), model=settings.model, block_size=128, dtype="uint8",
                                tissue="auto"), client=client)
        for level in ("0", "1"):
            np.testing.assert_array_equal(zarr.open_array(f"{rows[name]['prediction']}/{level}", mode="r")[...],
                                          zarr.open_array(str(alone / level), mode="r")[...])
    assert rows["a"]["objects"] > 0 and os.path.exists(rows["a"]["geojson"])

    import pandas as pd

    table = pd.read_parquet(f"{settings.output}/study.parquet")
    assert list(table.columns) == list(COLUMNS)
    assert dict(zip(table["name"], table["status"])) == {n: r["status"] for n, r in rows.items()}
    assert table.set_index("name").loc["b", "blocks_computed"] == rows["b"]["blocks_computed"]
    with open(f"{settings.output}/study.csv", newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == list(table["name"])


@pytest.mark.slow
def test_blocks_of_several_slides_are_in_flight_at_once(study):
    """While one slide plans, builds its pyramid or finds its objects, the workers compute
    other slides' blocks: block tasks of different slides overlap in time."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for name, record in study["blocks"]:  # prediction's blocks say when they ran
        if "started" in record:
            spans.setdefault(name, []).append((record["started"], record["finished"]))
    overlapping = {(m, n) for m in spans for n in spans if m < n
                   for s0, e0 in spans[m] for s1, e1 in spans[n] if s0 < e1 and s1 < e0}
    assert overlapping, spans


@pytest.mark.slow
def test_a_rerun_skips_finished_slides_without_a_cluster(study):
    def no_cluster():
        raise AssertionError("a rerun of finished slides started a cluster")

    rows = {r["name"]: r for r in run_cohort(study["settings"], client=no_cluster)}
    assert {n: r["status"] for n, r in rows.items()} == {**dict.fromkeys("abcd", "finished before"), "broken": "failed"}
    assert rows["b"]["blocks_computed"] == study["rows"]["b"]["blocks_computed"]  # the row as it was


@pytest.mark.slow
def test_a_killed_study_rerun_gives_the_same_outputs(study, client):
    """``overtile cohort`` killed (SIGKILL, its Dask workers too) while slides are half done,
    then rerun: every output equals the uninterrupted run's."""
    settings = study["settings"]
    out = study["base"] / "killed"
    command = [sys.executable, "-m", "pipeline.cli", "cohort", settings.slides, str(out), "--model", settings.model,
               "--block-size", "128", "--workers", "2", "--objects", "--objects-geojson", "cells.geojson.gz",
               "--objects-grow-distance", "2", "--quiet"]
    run = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("*/prediction.zarr/ledger/c/*/*")):
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (out / "study.csv").exists(), "the study ended before it was killed"
    rows = {r["name"]: r for r in run_cohort(settings.model_copy(update={"output": str(out)}), client=lambda: client)}
    assert {n: r["status"] for n, r in rows.items()} == {n: r["status"] for n, r in study["rows"].items()}, \
        {n: r.get("error") for n, r in rows.items() if r["status"] == "failed"}  # why, if a kill left something
    for name in "abcd":
        clean, rerun = study["rows"][name], rows[name]
        assert rerun["objects"] == clean["objects"]
        for key, levels in (("prediction", ("0", "1")), ("labels", ("0",))):
            for level in levels:
                np.testing.assert_array_equal(zarr.open_array(f"{rerun[key]}/{level}", mode="r")[...],
                                              zarr.open_array(f"{clean[key]}/{level}", mode="r")[...])
        assert Path(rerun["geojson"]).read_bytes() == Path(clean["geojson"]).read_bytes()


def test_slides_from_a_folder_a_glob_or_a_manifest(tmp_path):
    for name in ("b.svs", "a.ome.tiff", "notes.txt", "x/a.ome.tiff"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [(s.name, s.url) for s in list_slides(str(tmp_path))] == [
        ("a", str(tmp_path / "a.ome.tiff")), ("b", str(tmp_path / "b.svs"))]
    assert [s.name for s in list_slides(str(tmp_path / "*.svs"))] == ["b"]
    (tmp_path / "study.csv").write_text(f"slide,patient\na.ome.tiff,1\n{tmp_path / 'x' / 'a.ome.tiff'},2\n")
    found = list_slides(str(tmp_path / "study.csv"))
    assert [s.url for s in found] == [str(tmp_path / "a.ome.tiff"), str(tmp_path / "x" / "a.ome.tiff")]
    assert len({s.name for s in found}) == 2 and all(s.name.startswith("a-") for s in found)  # same stem: told apart
    (tmp_path / "bad.csv").write_text("path,patient\na.ome.tiff,1\n")
    with pytest.raises(InputError, match="a 'slide' column"):
        list_slides(str(tmp_path / "bad.csv"))
    with pytest.raises(InputError, match="no slides in it"):
        list_slides(str(tmp_path / "x" / "*.svs"))


def test_cli_names_a_missing_study_in_one_line(tmp_path, capsys):
    model = make_model(tmp_path / "m.pt", in_channels=3, base_channels=2)
    assert main(["cohort", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such file, folder or manifest" in err[0]
    with pytest.raises(ValueError, match="relative to each slide's folder"):
        SlideObjects(output="/elsewhere/cells.zarr")


@pytest.mark.skipif(not (SHARED_DATA / "slides" / "small.svs").exists(), reason="../shared/data/slides is absent")
def test_a_real_svs_in_a_manifest(tmp_path, client):
    (tmp_path / "study.csv").write_text(f"slide\n{SHARED_DATA / 'slides' / 'small.svs'}\n")
    model = make_model(tmp_path / "m.pt", in_channels=3, base_channels=2)
    rows = run_cohort(CohortSettings(slides=str(tmp_path / "study.csv"), output=str(tmp_path / "out"),
                                     model=str(model), tissue="all"), client=lambda: client)
    assert rows[0]["status"] == "finished", rows[0]
    assert rows[0]["read"] == "in place" and rows[0]["width_px"] == 16


@pytest.mark.slow
def test_cohort_flow_runs_each_slide_as_a_sub_flow(prefect_api, study, client, monkeypatch):
    """Through a real Prefect server: one sub-flow run per slide, named after it, the broken
    slide's failed and the study's run completed, with the study table and progress artifacts;
    a rerun makes no sub-flow runs for the finished slides."""
    from flows.cohort import cohort
    from test_flows import run_id

    settings = study["settings"].model_copy(update={"output": str(study["base"] / "flow"), "objects": None,
                                                   "workers": None, "scheduler": client.scheduler.address})
    state = cohort(settings, return_state=True)
    assert state.is_completed(), state.message
    children = prefect_api.request("POST", "/flow_runs/filter",
                                   {"flow_runs": {"parent_flow_run_id": {"any_": [run_id(state)]}}})
    assert {c["name"]: c["state_type"] for c in children} == {**dict.fromkeys("abcd", "COMPLETED"), "broken": "FAILED"}
    artifacts = prefect_api.artifacts(run_id(state))
    assert artifacts["cohort-slides"]["data"] == 100.0
    study_table = artifacts["study-table"]["data"]
    study_table = json.loads(study_table) if isinstance(study_table, str) else study_table
    assert {r["name"]: r["status"] for r in study_table} == {**dict.fromkeys("abcd", "finished"), "broken": "failed"}
    # the blocks' progress follows the sub-flows' blocks (ingest's and prediction's), all of them
    computed, planned = map(int, re.search(r"(\d+) blocks computed of (\d+) planned",
                                           prefect_api.logs(run_id(state), "blocks computed of")[0]).groups())
    assert computed == planned >= sum(r["blocks_computed"] for r in study_table if r["blocks_computed"]) > 0
    np.testing.assert_array_equal(zarr.open_array(f"{settings.output}/a/prediction.zarr/0", mode="r")[...],
                                  zarr.open_array(f"{study['rows']['a']['prediction']}/0", mode="r")[...])

    again = cohort(settings, return_state=True)
    children = prefect_api.request("POST", "/flow_runs/filter",
                                   {"flow_runs": {"parent_flow_run_id": {"any_": [run_id(again)]}}})
    assert [c["name"] for c in children] == ["broken"]
    assert prefect_api.logs(run_id(again), "4 before this run")

    # one slide rerun alone, as from the cohort-slide deployment's form, with paths relative
    # to where the worker runs: the slide finished by the study is found, not made again
    from flows.cohort import cohort_slide

    base = study["base"]
    monkeypatch.chdir(base)
    relative = settings.model_copy(update={"output": os.path.relpath(settings.output, base), "scheduler": None,
                                           "model": os.path.relpath(settings.model, base), "workers": 1})
    row = cohort_slide(os.path.relpath(study["rows"]["a"]["slide"], base), "a", relative)
    assert row["status"] == "finished before", row


def test_manifests_as_spreadsheets_write_them(tmp_path):
    """One column of paths without a header, Excel's byte-order mark and semicolons, a slide
    listed twice (it runs once), and a folder whose name has brackets (not a pattern)."""
    folder = tmp_path / "batch [1]"
    folder.mkdir()
    for name in ("a.svs", "b.svs", "c.svs"):
        (folder / name).write_bytes(b"")
    urls = [str(folder / n) for n in ("a.svs", "b.svs", "c.svs")]
    (folder / "plain.csv").write_text("a.svs\nb.svs\nc.svs\n")  # no header: a.svs is a slide
    assert [s.url for s in list_slides(str(folder / "plain.csv"))] == urls
    (folder / "named.csv").write_text("path\na.svs\n\nb.svs\n")  # one column with a header of its own
    assert [s.url for s in list_slides(str(folder / "named.csv"))] == urls[:2]
    (folder / "excel.csv").write_bytes("\ufeffSlide;patient\na.svs;1\nc.svs;2\na.svs;3\n".encode())
    assert [s.url for s in list_slides(str(folder / "excel.csv"))] == [urls[0], urls[2]]
    assert [s.name for s in list_slides(str(folder))] == ["a", "b", "c"]


def test_a_slide_whose_stamp_fails_is_its_row_not_the_studys_end(tmp_path):
    """A path through a file (NotADirectoryError, as a 403 would be on a bucket): the slide's
    row says failed, naming it, and the next slide still runs."""
    from pipeline.jobs.cohort import Slide, run_slide

    (tmp_path / "notes.txt").write_text("not a folder")
    model = make_model(tmp_path / "m.pt", in_channels=3, base_channels=2)
    settings = CohortSettings(slides=str(tmp_path), output=str(tmp_path / "out"), model=str(model))
    row = run_slide(Slide(str(tmp_path / "notes.txt" / "s1.svs"), "s1"), settings, client=lambda: None)
    assert row["status"] == "failed" and "notes.txt/s1.svs" in row["error"], row


def test_where_a_slide_is_read_from(tmp_path):
    """A Zarr image is read as it is stored, however large its chunks; a TIFF in strips
    longer than 8192 px is ingested (each block would decode the whole width again)."""
    from pipeline import storage
    from pipeline.jobs.cohort import in_place

    zarr_url = str(tmp_path / "big-chunks.zarr")
    storage.create_image(zarr_url, (4200, 4200), (4200, 4200), "uint8", "yx")
    assert in_place(zarr_url)[0] is not None
    tifffile.imwrite(tmp_path / "strips.tif", np.zeros((128, 9000), np.uint8), rowsperstrip=64)
    source, why = in_place(str(tmp_path / "strips.tif"))
    assert source is None and "64×9000" in why
    tifffile.imwrite(tmp_path / "tiles.tif", np.zeros((128, 9000), np.uint8), tile=(64, 64))
    assert in_place(str(tmp_path / "tiles.tif"))[0] is not None


def test_a_zarr_slide_rewritten_gets_a_new_key(tmp_path):
    from pipeline import storage
    from pipeline.jobs.cohort import Slide, slide_key

    url = f"memory://{tmp_path.name}/s.zarr"  # a store that keeps no modification times, as many buckets list none
    settings = CohortSettings(slides=url, output=str(tmp_path / "out"), model="m.pt")
    storage.create_image(url, (64, 64), (32, 32), "uint8", "yx")
    first = slide_key(Slide(url, "s"), settings, "digest")
    assert slide_key(Slide(url, "s"), settings, "digest") == first
    storage.create_image(url, (64, 96), (32, 32), "uint8", "yx", overwrite=True)  # re-exported: another shape
    assert slide_key(Slide(url, "s"), settings, "digest") != first


@pytest.mark.slow
def test_a_changed_slide_is_made_again_and_only_it(tmp_path, client):
    """A study rerun after one slide was rescanned: that slide's outputs are made again
    (equal to a fresh run of the new file), the unchanged slide is finished before."""
    folder = tmp_path / "slides"
    folder.mkdir()
    write_slide(folder / "a.ome.tiff", (192, 256), ((20, 150), (30, 200)), seed=1)
    write_slide(folder / "b.ome.tiff", (192, 256), ((40, 120), (60, 220)), seed=2)
    model = make_model(tmp_path / "m.pt", in_channels=3, base_channels=2)
    settings = CohortSettings(slides=str(folder), output=str(tmp_path / "out"), model=str(model), block_size=128)
    first = {r["name"]: r for r in run_cohort(settings, client=lambda: client)}
    assert {n: r["status"] for n, r in first.items()} == {"a": "finished", "b": "finished"}
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_slide(folder / "b.ome.tiff", (192, 256), ((10, 180), (10, 250)), seed=3)  # rescanned
    again = {r["name"]: r for r in run_cohort(settings, client=lambda: client)}
    assert {n: r["status"] for n, r in again.items()} == {"a": "finished before", "b": "finished"}, again["b"]
    fresh = tmp_path / "fresh.zarr"
    predict(PredictSettings(input=str(folder / "b.ome.tiff"), output=str(fresh), model=str(model), block_size=128,
                            dtype="uint8", tissue="auto"), client=client)
    np.testing.assert_array_equal(zarr.open_array(f"{again['b']['prediction']}/0", mode="r")[...],
                                  zarr.open_array(str(fresh / "0"), mode="r")[...])
    # harmless changes remake nothing: the same model bytes elsewhere, or another device setting
    import shutil

    shutil.copy(model, tmp_path / "copy.pt")
    moved = {r["name"]: r["status"] for r in run_cohort(settings.model_copy(update={"model": str(tmp_path / "copy.pt")}),
                                                        client=lambda: client)}
    assert moved == {"a": "finished before", "b": "finished before"}
    other = {r["name"]: r for r in run_cohort(settings.model_copy(update={"device": "cpu"}), client=lambda: client)}
    assert all(r["status"] == "finished" and r["blocks_computed"] == 0 for r in other.values()), other


@pytest.mark.slow
def test_a_study_where_no_slide_finished_fails(prefect_api, study, client, tmp_path):
    """Some slides failing is the table's to say (the run completes); none finishing is a
    failed run, with the table still written."""
    from flows.cohort import cohort

    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "broken.svs").write_bytes((Path(study["settings"].slides) / "broken.svs").read_bytes())
    settings = study["settings"].model_copy(update={"slides": str(folder), "output": str(tmp_path / "out"),
                                                   "objects": None, "workers": None,
                                                   "scheduler": client.scheduler.address})
    state = cohort(settings, return_state=True)
    assert state.is_failed() and "none of the 1 slides finished" in state.message and "broken.svs" in state.message
    assert (tmp_path / "out" / "study.csv").exists()
