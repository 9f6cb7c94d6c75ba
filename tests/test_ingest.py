"""Slides in: SVS, pyramidal TIFF, OME-TIFF and PNG are read in place or ingested to OME-Zarr
with every pyramid level, pixel for pixel what tifffile (or imageio) reads; physical pixel
sizes end up in the scale; truncated files are refused in one line, and a tile that does not
decode ends a run with one last line naming it; predict on a slide equals
predict on its ingested copy; and ingest's memory is bounded by the block, not the slide."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.numerics.geometry import Box
from pipeline.jobs.ingest import IngestSettings, ingest
from pipeline.storage.slides import open_slide
from pipeline.storage import open_image

from conftest import SHARED_DATA, cells, make_model

SLIDES = SHARED_DATA / "slides"
shared = pytest.mark.skipif(not SLIDES.is_dir(), reason="../shared/data/slides is absent")


def tifffile_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def channel_first(a: np.ndarray) -> np.ndarray:
    """A (Y, X, S) or (Y, X) image as overtile stores it: (C, Y, X)."""
    return np.moveaxis(a, -1, 0) if a.ndim == 3 else a[None]


def ome_levels(url: Path) -> tuple[list[np.ndarray], list[list[float]], dict]:
    group = zarr.open_group(str(url), mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    arrays = [group[d["path"]][...] for d in ms["datasets"]]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    return arrays, scales, ms


def rgb_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.stack([cells(shape, seed + k) for k in range(3)], axis=-1)


def write_pyramid(path: Path, data: np.ndarray, levels: int = 3, tile: int = 64, ome: bool = False,
                  metadata: dict | None = None, **kwargs) -> list[np.ndarray]:
    """A tiled pyramidal TIFF, sub-resolutions in SubIFDs (as OME-TIFF writers do); its levels."""
    pyramid = [data[:: 2**i, :: 2**i] for i in range(levels)]
    opts = dict(tile=(tile, tile), photometric="rgb" if data.ndim == 3 else "minisblack", compression="zlib")
    with tifffile.TiffWriter(path, ome=ome) as tw:
        tw.write(pyramid[0], subifds=levels - 1, metadata=metadata, **opts, **kwargs)
        for level in pyramid[1:]:
            tw.write(level, subfiletype=1, **opts)
    return pyramid


# --- the real slide fixtures ------------------------------------------------------------


@shared
@pytest.mark.parametrize("name", ["small.svs", "boxes.tiff"])
def test_ingested_slide_equals_tifffile_level_by_level(tmp_path, name):
    expected = tifffile_levels(SLIDES / name)
    job, summary = ingest(IngestSettings(slide=str(SLIDES / name), output=str(tmp_path / "out.zarr"), block_size=64))
    arrays, scales, ms = ome_levels(tmp_path / "out.zarr")
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert len(arrays) == len(expected) == len(job.levels) and summary.done == summary.total
    for got, want in zip(arrays, expected, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, channel_first(want))


@shared
def test_svs_is_read_in_place_with_its_pixel_size():
    source = open_image(str(SLIDES / "small.svs"))
    assert source.axes == "yxc" and source.channels == 3 and source.spatial_shape == (16, 16)
    assert source.scale == {"y": 0.499, "x": 0.499} and source.units == {"y": "micrometer", "x": "micrometer"}
    whole = tifffile_levels(SLIDES / "small.svs")[0]
    assert np.array_equal(source.read(Box((3, 4), (9, 11))), channel_first(whole[3:12, 4:15]))


@shared
def test_pyramid_levels_get_their_downsampling_in_the_scale(tmp_path):
    ingest(IngestSettings(slide=str(SLIDES / "boxes.tiff"), output=str(tmp_path / "out.zarr")))
    _, scales, ms = ome_levels(tmp_path / "out.zarr")
    # 250×300 → 125×150 → 62×75 → 31×37: halvings with rounding down, not 250/62
    assert scales == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 4.0, 4.0], [1.0, 8.0, 8.0]]
    assert all("unit" not in a for a in ms["axes"])  # boxes.tiff says 72 dpi: not a pixel size


# --- generated files --------------------------------------------------------------------


@pytest.mark.parametrize("rgb", [True, False], ids=["rgb", "grey-uint16"])
def test_ome_tiff_physical_size_ends_up_in_the_scale(tmp_path, rgb):
    data = rgb_image((300, 200)) if rgb else cells((300, 200), dtype=np.uint16)
    pyramid = write_pyramid(tmp_path / "s.ome.tif", data, ome=True, metadata={
        "axes": "YXS" if rgb else "YX", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm"})
    ingest(IngestSettings(slide=str(tmp_path / "s.ome.tif"), output=str(tmp_path / "out.zarr"), block_size=64))
    arrays, scales, ms = ome_levels(tmp_path / "out.zarr")
    assert scales == [[1.0, 0.5, 0.25], [1.0, 1.0, 0.5], [1.0, 2.0, 1.0]]
    # a pixel of level k covers 2^k level-0 pixels from 2^k·i on (as OpenSlide reads levels):
    # its centre, in level-0 pixels, is (2^k - 1) / 2 on
    translations = [[t["translation"] for t in d["coordinateTransformations"] if t["type"] == "translation"]
                    for d in ms["datasets"]]
    assert translations == [[], [[0.0, 0.25, 0.125]], [[0.0, 0.75, 0.375]]]
    assert [a.get("unit") for a in ms["axes"]] == [None, "micrometer", "micrometer"]
    for got, want in zip(arrays, pyramid, strict=True):
        assert np.array_equal(got, channel_first(want))


def test_tiff_resolution_is_a_pixel_size_only_when_it_is_one(tmp_path):
    data = cells((40, 50))
    tifffile.imwrite(tmp_path / "scan.tif", data, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 µm
    tifffile.imwrite(tmp_path / "photo.tif", data, resolution=(72, 72), resolutionunit="INCH")  # a writer's default
    with open_slide(str(tmp_path / "scan.tif")) as scan, open_slide(str(tmp_path / "photo.tif")) as photo:
        assert scan.pixel_size == {"y": 0.5, "x": 0.5} and photo.pixel_size == {}


def test_a_tiff_without_a_tiff_name_is_known_by_its_magic_bytes(tmp_path):
    data = cells((40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "scan.dat", data, tile=(16, 16))
    source = open_image(str(tmp_path / "scan.dat"))
    assert source.axes == "yx" and np.array_equal(source.read(Box((5, 6), (20, 30)))[0], data[5:25, 6:36])


def test_png_is_ingested(tmp_path):
    import imageio.v3 as iio

    data = rgb_image((70, 90))
    iio.imwrite(tmp_path / "pic.png", data)
    job, _ = ingest(IngestSettings(slide=str(tmp_path / "pic.png"), output=str(tmp_path / "out.zarr"), block_size=32))
    arrays, scales, _ = ome_levels(tmp_path / "out.zarr")
    assert job.format == "png" and len(arrays) == 1 and np.array_equal(arrays[0], channel_first(data))


def test_stack_of_unnamed_pages_needs_axes(tmp_path):
    stack = cells((5, 40, 50))
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    with pytest.raises(InputError, match=r"stack.tif: .* give them with --axes"):
        open_image(str(tmp_path / "stack.tif"))
    source = open_image(str(tmp_path / "stack.tif"), "zyx")
    assert source.spatial_shape == (5, 40, 50) and np.array_equal(source.read(Box((1, 2, 3), (2, 5, 7)))[0], stack[1:3, 2:7, 3:10])


def test_a_tiff_url_is_read_through_fsspec():
    import fsspec

    data = rgb_image((60, 70))
    with fsspec.open("memory://slides/rgb.tif", "wb") as f:
        tifffile.imwrite(f, data, tile=(32, 32), photometric="rgb")
    source = open_image("memory://slides/rgb.tif")
    assert source.axes == "yxc" and np.array_equal(source.read(Box((10, 20), (30, 40))), channel_first(data[10:40, 20:60]))


def truncated_copies(tmp_path: Path) -> list[Path]:
    """Cut-off downloads: a generated pyramid cut in its tiles, and in its IFDs; the real SVS."""
    write_pyramid(tmp_path / "whole.tif", rgb_image((300, 200)))
    blob = (tmp_path / "whole.tif").read_bytes()
    sources = [(tmp_path / "whole.tif", n) for n in (len(blob) // 2, len(blob) - 40)]
    if SLIDES.is_dir():
        sources.append((SLIDES / "small.svs", (SLIDES / "small.svs").stat().st_size // 2))
    cuts = []
    for i, (path, n) in enumerate(sources):
        cut = tmp_path / f"cut{i}{path.suffix}"
        cut.write_bytes(path.read_bytes()[:n])
        cuts.append(cut)
    return cuts


def test_truncated_slide_is_refused_in_one_line(tmp_path, capsys):
    for cut in truncated_copies(tmp_path):
        with pytest.raises(InputError, match=rf"{cut.name}: .*truncated"):
            open_slide(str(cut))
        out = tmp_path / f"{cut.stem}.zarr"
        assert main(["ingest", str(cut), str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"overtile: error: {cut}: ") and err.count("\n") == 1 and "truncated" in err, err
        assert not out.exists()


def test_ingest_cli_levels_and_protection(tmp_path, capsys):
    slide = tmp_path / "s.tif"
    pyramid = write_pyramid(slide, rgb_image((130, 150)))
    out = tmp_path / "out.zarr"
    assert main(["ingest", str(slide), str(out), "--levels", "2", "--block-size", "64"]) == 0
    text = capsys.readouterr()
    assert "2 level(s) (130×150, 65×75 px)" in text.out and "13 blocks copied" in text.out and "13/13" in text.err
    arrays, _, _ = ome_levels(out)
    assert len(arrays) == 2 and np.array_equal(arrays[1], channel_first(pyramid[1]))
    assert main(["ingest", str(slide), str(out), "--levels", "2", "--block-size", "64"]) == 0
    assert "0 blocks copied, 13 skipped" in capsys.readouterr().out  # a rerun resumes (here: nothing left)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for args, message in [(["--levels", "4"], "--levels 4: "), (["--levels", "0"], "--levels: "),
                          (["--levels", "2", "--block-size", "32"], "other settings")]:
        assert main(["ingest", str(slide), str(out), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_with_other_blocks_in_the_same_process(tmp_path):
    slide, out = tmp_path / "s.tif", tmp_path / "out.zarr"
    pyramid = write_pyramid(slide, rgb_image((130, 150)))
    ingest(IngestSettings(slide=str(slide), output=str(out), block_size=64))
    _, summary = ingest(IngestSettings(slide=str(slide), output=str(out), block_size=32, overwrite=True))
    arrays, _, _ = ome_levels(out)
    assert summary.done == summary.total == 25 + 9 + 4
    assert all(np.array_equal(a, channel_first(p)) for a, p in zip(arrays, pyramid, strict=True))


def test_ingest_help(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["ingest", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: overtile ingest" in out and "--levels" in out


# --- a tile that does not decode -------------------------------------------------------


def damage_one_tile(path: Path, tile: int = 0) -> None:
    """Scribble over the middle of one tile's compressed bytes of level 0, in place: the file's
    structure (IFDs, offsets, its size) stays intact, so it opens, but that tile does not decode."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset + count // 4)
        f.write(b"\xff" * (count // 2))
    assert path.stat().st_size == size


def overtile(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a process of its own: what its terminal shows."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])


def last_line(text: str) -> str:
    """The last non-empty line as a terminal shows it (a progress bar redraws itself on its line)."""
    return [line for line in text.split("\n") if line.strip()][-1]


def test_a_tile_that_does_not_decode_is_an_input_error_naming_the_file_and_region(tmp_path, capsys):
    slide = tmp_path / "damaged.tif"
    data = rgb_image((96, 128))
    write_pyramid(slide, data, levels=1, tile=32)
    damage_one_tile(slide, tile=1)  # y 0:32, x 32:64
    source = open_image(str(slide))
    assert np.array_equal(source.read(Box((32, 0), (64, 128))), channel_first(data[32:]))  # other tiles read
    with pytest.raises(InputError, match=rf"^{re.escape(str(slide))}: level 0, y 0:40, x 30:70: cannot be decoded \("):
        source.read(Box((0, 30), (40, 40)))
    assert main(["ingest", str(slide), str(tmp_path / "out.zarr"), "--block-size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"overtile: error: {slide}: level 0, y 0:32, x 32:64: cannot be decoded (") and err.count("\n") == 1
    assert err.endswith("(block 0-0.1)\n"), err


@pytest.mark.slow
def test_a_tile_that_does_not_decode_ends_ingest_with_one_last_line(tmp_path):
    # 16-px tiles, the first one damaged: reading the block decodes hundreds of tiles
    # concurrently (Zarr), and the first failure ends the read while the others still run
    slide = tmp_path / "damaged.tif"
    write_pyramid(slide, rgb_image((256, 256)), tile=16)
    damage_one_tile(slide)
    with open_slide(str(slide)) as opened:  # it opens: only the tile is broken
        assert opened.spatial_shape() == (256, 256)
    result = overtile("ingest", str(slide), str(tmp_path / "out.zarr"))
    assert result.returncode == 2, result.stderr
    assert "ingest:" in result.stderr  # the progress bar was drawn, and closed before the error
    assert re.fullmatch(rf"overtile: error: {re.escape(str(slide))}: level 0, y 0:256, x 0:256: cannot be decoded "
                        r"\(.+\) \(block 0-0\.0\)", last_line(result.stderr)), result.stderr
    assert result.stderr.count("cannot be decoded") == 1 and "Traceback" not in result.stderr, result.stderr


# --- on Dask, and predict on a slide -----------------------------------------------------


@pytest.mark.slow
def test_ingest_on_dask_equals_ingest_in_process(tmp_path, client):
    slide = tmp_path / "s.tif"
    write_pyramid(slide, rgb_image((200, 170)))
    ingest(IngestSettings(slide=str(slide), output=str(tmp_path / "here.zarr"), block_size=64))
    _, summary = ingest(IngestSettings(slide=str(slide), output=str(tmp_path / "dask.zarr"), block_size=64), client=client)
    assert summary.done == summary.total == 12 + 4 + 1
    assert len({r["worker_pid"] for r in summary.records}) >= 1
    here, scales, _ = ome_levels(tmp_path / "here.zarr")
    there, scales_there, _ = ome_levels(tmp_path / "dask.zarr")
    assert scales == scales_there and all(np.array_equal(a, b) for a, b in zip(here, there, strict=True))


@pytest.mark.slow
def test_predict_on_a_slide_equals_predict_on_its_ingested_copy(tmp_path, client):
    from pipeline.jobs.predict import PredictSettings, predict

    slide = tmp_path / "slide.tif"
    write_pyramid(slide, rgb_image((150, 170)), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    model = make_model(tmp_path / "rgb.pt", in_channels=3, depth=3)
    direct = tmp_path / "direct.zarr"
    assert main(["predict", str(slide), str(direct), "--model", str(model), "--block-size", "64",
                 "--scheduler", client.scheduler.address, "--quiet"]) == 0
    ingest(IngestSettings(slide=str(slide), output=str(tmp_path / "slide.zarr")))
    predict(PredictSettings(input=str(tmp_path / "slide.zarr"), output=str(tmp_path / "via.zarr"), model=str(model),
                            block_size=64), client=client)
    a, scales, ms = ome_levels(direct)
    b, _, _ = ome_levels(tmp_path / "via.zarr")
    assert a[0].shape == (2, 150, 170) and np.array_equal(a[0], b[0])
    assert scales[0] == [1.0, 0.5, 0.5] and ms["axes"][1]["unit"] == "micrometer"  # the slide's pixel size


@pytest.mark.slow
def test_a_tile_that_does_not_decode_ends_predict_once_in_one_last_line(tmp_path):
    # the slide read in place by the block tasks of a LocalCluster: the block whose input
    # does not decode is not retried and not logged by the worker; the client says it once
    slide = tmp_path / "damaged.tif"
    write_pyramid(slide, rgb_image((150, 170)), tile=32)
    damage_one_tile(slide, tile=2)
    model = make_model(tmp_path / "rgb.pt", in_channels=3, depth=3)
    result = overtile("predict", str(slide), str(tmp_path / "out.zarr"), "--model", str(model), "--workers", "1",
                      "--block-size", "64")
    assert result.returncode == 2, result.stderr
    assert "predict:" in result.stderr  # the progress bar was drawn, and closed before the error
    assert re.fullmatch(rf"overtile: error: {re.escape(str(slide))}: level 0, y \d+:\d+, x \d+:\d+: cannot be decoded "
                        r"\(.+\) \(block \d+\.\d+\)", last_line(result.stderr)), result.stderr
    assert result.stderr.count("cannot be decoded") == 1, result.stderr  # once: no retries, no worker log
    assert "Compute Failed" not in result.stderr and "Traceback" not in result.stderr, result.stderr


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, tracemalloc
    from pipeline.jobs.ingest import IngestSettings, ingest

    warm_up, slide, output, block = sys.argv[1:]
    tracemalloc.start()
    ingest(IngestSettings(slide=warm_up, output=output + "-warm-up", block_size=int(block)))  # imports, codecs
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    job, summary = ingest(IngestSettings(slide=slide, output=output, block_size=int(block)))
    print(json.dumps({"peak": tracemalloc.get_traced_memory()[1] - base, "blocks": summary.done}))
""")


@pytest.mark.slow
def test_ingest_memory_is_bounded_by_the_block_not_the_slide(tmp_path):
    # 3000×4000 RGB (36 MB decoded) in 256² tiles, ingested in blocks of 256²: at its peak,
    # what Python allocates (numpy's arrays included) stays a small multiple of one block
    # (the tiles a block touches, the block, its encoded chunk), not a share of the slide
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", data, tile=(256, 256), photometric="rgb")
    tifffile.imwrite(tmp_path / "small.tif", data[:300, :300], tile=(256, 256), photometric="rgb")
    del data
    block = 256
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "small.tif"), str(tmp_path / "big.tif"),
                             str(tmp_path / "big.zarr"), str(block)],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    slide_bytes, block_bytes = 3000 * 4000 * 3, block * block * 3
    assert measured["blocks"] == 12 * 16
    assert measured["peak"] < 16 * block_bytes < slide_bytes / 10, measured
