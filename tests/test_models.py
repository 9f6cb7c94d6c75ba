"""Models of every kind: TorchScript, ONNX and bioimage.io packages run through ``overtile
predict`` as overtile's own checkpoints do, exactly where the probe finds them translation
equivariant and blended where not; exported forms give the native output; corrupt or
mismatched model files are one clear line and exit status 2. Every model and image is made
here (tiny nets)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import cells, make_model, write_zarr
from torch import nn

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.jobs import blockwise
from pipeline.jobs.inference import file_digest
from pipeline.jobs.predict import PredictSettings, plan_prediction
from pipeline import models
from pipeline.models import describe, detect, export
from pipeline.models.export import write_onnx
from pipeline.models.preprocessing import Preprocessing, ScaleLinear, ScaleRange, ZeroMeanUnitVariance
from pipeline.models.probe import Declared, probe
from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import TileGeometry, overlap_tile, plan_tiles, predict_region, predict_whole, read_mirrored
from pipeline.numerics.unet import Normalization, UNet, load_model, save_model

NOWHERE = "tcp://127.0.0.1:9"  # a scheduler: so a run that fails while planning starts no cluster


def checkpoint(path: Path, **kwargs) -> Path:
    """A depth-4 valid U-Net (8-px grid, margin 44) with a normalisation that is not the default."""
    torch.manual_seed(kwargs.pop("seed", 0))
    net = UNet(**{"depth": 4, "base_channels": 2, **kwargs})
    net.normalization = Normalization(mean=0.2, std=0.5)
    save_model(net, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("models") / "unet.pt")


@pytest.fixture(scope="module")
def torchscript(ckpt) -> Path:
    out = ckpt.with_name("unet.ts")
    export(str(ckpt), str(out), "torchscript")
    return out


@pytest.fixture(scope="module")
def onnx_file(ckpt) -> Path:
    out = ckpt.with_name("unet.onnx")
    export(str(ckpt), str(out), "onnx")
    return out


@pytest.fixture(scope="module")
def package(ckpt) -> Path:
    out = ckpt.with_name("unet.zip")
    export(str(ckpt), str(out), "bioimageio")
    return out


def run_predict(capsys, image: str, model: Path, out: Path, client, *extra: str) -> tuple[np.ndarray, str, str]:
    code = main(["predict", image, str(out), "--model", str(model), "--block-size", "512", "--tile-size", "300",
                 "--scheduler", client.scheduler.address, "--quiet", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return zarr.open_group(str(out), mode="r")["0"][...], captured.out, captured.err


# --- kinds ------------------------------------------------------------------------------------


def test_the_kind_is_read_from_the_file_not_its_name(ckpt, torchscript, tmp_path):
    disguised = tmp_path / "model.onnx"
    shutil.copy(torchscript, disguised)
    assert detect(ckpt) == "overtile" and detect(torchscript) == "torchscript" and detect(disguised) == "torchscript"
    info, _ = describe(disguised)
    assert info.kind == "torchscript" and (info.dims, info.in_channels, info.num_classes) == (2, 1, 2)


def test_the_probe_finds_the_geometry_of_a_traced_unet(torchscript, ckpt):
    """A TorchScript file says nothing about its sizes: the probe measures the U-Net's own
    arithmetic (margin 44, 8-px grid, outputs ≡ 4 mod 8) and finds it translation equivariant."""
    info, _ = describe(torchscript)
    native, _ = describe(ckpt)
    assert info.geometry == native.geometry and info.exact
    assert info.tiling.startswith("exact: output = input − 88 px, and tiles shifted by 8 px agree")


def test_a_declared_step_or_crop_that_the_model_does_not_have_is_an_error(tmp_path):
    """Declared sizes are run, not trusted: a U-Net that runs at every size (it crops its skip
    connections) but crops more off-grid is caught, and so is a wrong declared crop."""
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=2).eval()

    def forward(x):
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    assert probe(forward, 2, 1, "unet").geometry == net.geometry
    with pytest.raises(InputError, match=r"declares input sizes 44 \+ k·2 px, but the model crops"):
        probe(forward, 2, 1, "unet", declared=Declared(44, 2))


@pytest.mark.slow
def test_every_exported_form_predicts_what_the_checkpoint_predicts(ckpt, torchscript, onnx_file, package, client,
                                                                 tmp_path, capsys):
    """The round trip: each exported form through ``overtile predict`` on a 1000² uint8 image
    equals the native checkpoint's output (1e-5; 1e-4 for ONNX), and the closing lines say
    how the tiles were put together and why."""
    image = write_zarr(tmp_path / "img.zarr", cells((1000, 1000)), chunks=(256, 256))
    native, stdout, _ = run_predict(capsys, image, ckpt, tmp_path / "native.zarr", client)
    assert "tiles exact: a valid U-Net, output = input − 88 px, tiles on its 8-px grid" in stdout
    for model, tolerance, kind in [(torchscript, 1e-5, "TorchScript model"), (onnx_file, 1e-4, "ONNX model"),
                                   (package, 1e-5, "bioimage.io package")]:
        out, stdout, _ = run_predict(capsys, image, model, tmp_path / f"{model.name}.zarr", client)
        assert np.abs(out - native).max() <= tolerance, model.name
        assert f"model: {kind}" in stdout and "tiles exact" in stdout


@pytest.mark.slow
def test_a_package_runs_each_of_its_weights_alike(ckpt, package):
    """The package's state dict, TorchScript and ONNX weights, each with the package's
    declared preprocessing, tile exactly and agree with the native model."""
    image = cells((1, 300, 260), dtype=np.uint8)
    native, net = describe(ckpt)
    expected = overlap_tile(net, native.normalization(image), tile_size=212)
    for weights, tolerance in [("pytorch_state_dict", 1e-5), ("torchscript", 1e-5), ("onnx", 1e-4)]:
        info, model = describe(package, weights=weights)
        assert info.exact and info.geometry == native.geometry, weights
        got = overlap_tile(model, info.normalization(image), tile_size=212)
        assert np.abs(got - expected).max() <= tolerance, weights


@pytest.mark.slow
def test_the_package_validates_and_declares_what_it_needs(package, tmp_path):
    from bioimageio.spec import load_model_description

    descr = load_model_description(package, perform_io_checks=True)
    assert descr.validation_summary.status == "valid-format"
    inp, out = descr.inputs[0], descr.outputs[0]
    assert [a.type for a in inp.axes] == ["batch", "channel", "space", "space"]
    assert inp.axes[2].size.min == 92 and inp.axes[2].size.step == 8
    assert out.axes[2].size.offset == -88  # the crop the model makes: a halo it cuts off itself
    assert [p.id for p in inp.preprocessing if p.id != "ensure_dtype"] == ["scale_linear"]
    assert [p.id for p in out.postprocessing if p.id != "ensure_dtype"] == ["softmax"]
    assert {f for f in ("pytorch_state_dict", "torchscript", "onnx") if getattr(descr.weights, f)} == {
        "pytorch_state_dict", "torchscript", "onnx"}
    folder = tmp_path / "package"
    assert main(["model", "export", str(package.with_name("unet.pt")), str(folder), "--format", "bioimageio",
                 "--name", "tiny unet"]) == 0
    assert (folder / "rdf.yaml").is_file() and len(file_digest(folder)) == 64
    assert describe(folder / "rdf.yaml")[0].geometry == describe(package)[0].geometry


CORE_PYTHON = Path(sys.prefix) / "bioimageio-core" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not CORE_PYTHON.exists(), reason=f"no bioimageio.core environment at {CORE_PYTHON.parent.parent} "
                    "(make test builds it: bioimageio.core pins a bioimageio.spec that needs an older pydantic)")
def test_bioimageio_core_reproduces_the_test_output(package):
    """bioimageio.core's own prediction (its preprocessing; its TorchScript, ONNX and state-dict
    runs) on the package's test input gives the package's test output. bioimageio.core runs in
    an environment of its own (tests/bioimageio_core_check.py), with overtile on its path for
    the state-dict form's architecture."""
    formats = ["torchscript", "onnx", "pytorch_state_dict"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([str(CORE_PYTHON), str(root / "tests" / "bioimageio_core_check.py"), str(package), *formats],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["weights"] for r in rows] == formats
    for r in rows:
        assert r["shape"] == r["expected"] and r["max_abs_diff"] <= 1e-5, r


# --- exact or blended -------------------------------------------------------------------------


class PositionTerm(nn.Module):
    """A valid 3×3 convolution plus a term that grows with the position inside the tile: it
    crops like a valid net but is not translation equivariant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        ramp = torch.arange(y.shape[-1], dtype=y.dtype, device=y.device) * 0.01
        return y + ramp


def test_a_position_dependent_model_is_refused_exact_tiling(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "position.ts"
    torch.jit.script(PositionTerm().eval()).save(str(path))
    info, model = describe(path)
    assert not info.exact and info.geometry.margin == 1
    assert "blended" in info.tiling and "not translation equivariant" in info.tiling
    plan = plan_tiles(model, Box.from_shape((100, 100)), 64)
    assert plan.blend and len(plan.tiles) > 1
    assert main(["model", "info", str(path)]) == 0
    assert "tiles blended" in capsys.readouterr().out


@pytest.mark.slow
def test_the_non_equivariant_model_runs_blended_with_a_warning(tmp_path, client, capsys):
    torch.manual_seed(0)
    path = tmp_path / "position.ts"
    torch.jit.script(PositionTerm().eval()).save(str(path))
    image = write_zarr(tmp_path / "img.zarr", cells((200, 180)))
    out, stdout, stderr = run_predict(capsys, image, path, tmp_path / "p.zarr", client, "--tile-size", "64")
    assert out.shape == (2, 200, 180) and np.allclose(out.sum(axis=0), 1, atol=1e-5)
    assert "warning:" in stderr and "not translation equivariant" in stderr
    assert "tiles blended" in stdout


@pytest.mark.slow
def test_monai_basic_unet_as_torchscript_runs_blended(tmp_path, client, capsys):
    """A same-padding U-Net from another library: runs at any size, but zero padding at tile
    borders makes shifted tiles disagree, so it is blended (no warning: that is its design)."""
    monai = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = monai.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    path = tmp_path / "monai.pt"
    torch.jit.script(net).save(str(path))
    info, model = describe(path)
    assert not info.exact and info.geometry.margin == 0 and "zero padding" in info.tiling
    image = write_zarr(tmp_path / "img.zarr", cells((256, 200)))
    out, stdout, stderr = run_predict(capsys, image, path, tmp_path / "p.zarr", client, "--tile-size", "128")
    assert "tiles blended: output as large as its input" in stdout and "warning" not in stderr
    whole = predict_whole(model, Normalization()(cells((256, 200))[None]), context=64)
    probabilities = np.exp(whole) / np.exp(whole).sum(axis=0)
    assert np.abs(out - probabilities).mean() < 0.05  # blended tiles stay close to one pass over the image


# --- models that take one input size ----------------------------------------------------------


def static_onnx(net: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    """``net`` exported to ONNX with static axes (no ``dynamic_axes``): it runs at ``shape`` only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, *shape),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    return path


class OneSize(nn.Module):
    """A model that refuses every input size but one, as some TorchScript exports do."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net = net
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError("this model takes one input size only")
        return self.net(x)


def one_size_torchscript(net: nn.Module, size: int, path: Path) -> Path:
    with warnings.catch_warnings():  # torch deprecates TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net.eval(), torch.zeros(1, 1, size, size), check_trace=False)
        torch.jit.script(OneSize(traced, size)).save(str(path))
    return path


def test_a_static_onnx_unet_predicts_what_its_dynamic_export_predicts(tmp_path):
    """An ONNX export with static axes (140 px in, 100 px out) runs through the blockwise job:
    tiles of its one size on the net's 4-px grid counted from the image origin, reaching past
    blocks smaller than their output and past the image border. The output equals the dynamic
    export's for any block size, and --tile-size gives way to the model's size."""
    torch.manual_seed(1)  # a tiny net whose output varies (seed 0's is almost constant)
    net = UNet(depth=3, base_channels=2).eval()
    static = static_onnx(net, (140, 140), tmp_path / "static.onnx")
    dynamic = tmp_path / "dynamic.onnx"
    write_onnx(net, torch.zeros(1, 1, 60, 60), dynamic)
    image = write_zarr(tmp_path / "img.zarr", cells((150, 170)))

    def run(model: Path, block: int, name: str):
        settings = PredictSettings(input=image, output=str(tmp_path / name), model=str(model), block_size=block,
                                   tile_size=300, device="cpu", pyramid=False)
        job, _ = blockwise.execute(plan_prediction, settings, in_process=True)
        return job, zarr.open_array(job.output_array, mode="r")[...]

    _, expected = run(dynamic, 64, "dynamic.zarr")
    for block in (50, 128):  # blocks smaller than a tile's output, off its grid; blocks that need two tiles per axis
        job, out = run(static, block, f"static{block}.zarr")
        assert np.abs(out - expected).max() <= 1e-4, block
    assert job.tile_size == 140 and job.model.exact and job.model.geometry.fixed and job.model.geometry.factor == 4
    assert job.model.tiling.startswith("exact: fixed input size 140 px (every tile that size, whatever --tile-size says)")
    assert "fixed input size 140 px" in job.model.summary()


def test_the_scan_finds_a_model_that_takes_one_size_and_tiles_it_exactly(tmp_path):
    """A TorchScript model that runs at 76 px and no other size: the scan finds that size, the
    probe measures the margin and shifted 76 px tiles agree at 4 px. Its tiles equal one pass
    of the range net over the whole image, also for a region smaller than one tile's output."""
    torch.manual_seed(1)
    net = UNet(depth=3, base_channels=2).eval()
    info, model = describe(one_size_torchscript(net, 76, tmp_path / "one.ts"))
    assert info.geometry == TileGeometry(20, 4, 0, 36, fixed=True) and info.exact
    assert info.tiling.startswith("exact: fixed input size 76 px") and "fixed input size 76 px" in info.summary()
    image = cells((1, 90, 61), dtype=np.float32)
    whole = predict_whole(net, image)
    np.testing.assert_allclose(overlap_tile(model, image, tile_size=500), whole, rtol=0, atol=1e-5)
    region = Box((50, 33), (10, 7))
    plan = plan_tiles(model, region, 300)
    assert [t.input.shape for t in plan.tiles] == [(76, 76)] and plan.tiles[0].output.contains(region)
    padded = read_mirrored(lambda box: image[(slice(None), *box.slices())], plan.read, (90, 61))
    np.testing.assert_allclose(predict_region(model, plan, padded), whole[(slice(None), *region.slices())], atol=1e-5)


def test_a_fixed_size_model_that_is_not_equivariant_is_blended_and_says_so(tmp_path):
    torch.manual_seed(0)
    path = one_size_torchscript(PositionTerm(), 40, tmp_path / "position.ts")
    info, model = describe(path)
    assert not info.exact and info.geometry.fixed and info.geometry.input_size == 40 and info.geometry.margin == 1
    assert info.tiling.startswith("blended: fixed input size 40 px") and "not translation equivariant" in info.tiling
    plan = plan_tiles(model, Box.from_shape((70, 50)), 64)
    assert plan.blend and len(plan.tiles) > 1 and {t.input.shape for t in plan.tiles} == {(40, 40)}
    out = overlap_tile(model, cells((1, 70, 50), dtype=np.float32), tile_size=64)
    assert out.shape == (2, 70, 50) and np.isfinite(out).all()


def test_a_fixed_size_too_small_or_not_alike_on_every_axis_is_one_clear_error(tmp_path):
    def one_size(size: int, keep: int):
        def forward(x: np.ndarray) -> np.ndarray:
            if x.shape[-1] != size:
                raise ValueError("one size only")
            cut = (size - keep) // 2
            return x[..., cut : size - cut, cut : size - cut]
        return forward

    with pytest.raises(InputError, match=r"takes only 12 px tiles, and crops them to nothing \(0 px output\)"):
        probe(one_size(12, 0), 2, 1, "tiny")
    with pytest.raises(InputError, match="declares a fixed input size 12 px, but the model fails at 12 px"):
        probe(one_size(14, 2), 2, 1, "tiny", declared=Declared(12, 0))
    found = probe(one_size(11, 1), 2, 1, "tiny")  # a 1 px output runs, blended: nothing to compare
    assert found.geometry.fixed and found.geometry.blend and "too small to test shifted tiles" in found.reason()
    torch.manual_seed(0)
    path = static_onnx(UNet(depth=3, base_channels=2).eval(), (76, 80), tmp_path / "oblong.onnx")
    with pytest.raises(InputError, match="oblong.onnx: an ONNX model with a fixed input size 76×80 px; overtile tiles "
                                         "alike on every axis"):
        describe(path)


@pytest.mark.slow
def test_a_package_that_declares_a_fixed_shape_runs_exactly(package, ckpt, tmp_path):
    """A package whose input axes have one size (124 px), with its ONNX weights exported with
    static axes: its ONNX and TorchScript weights run at that size only, exactly; the state
    dict of overtile's own U-Net takes every valid size anyway."""
    folder = tmp_path / "package"
    with zipfile.ZipFile(package) as z:
        z.extractall(folder)
    rdf = folder / "rdf.yaml"
    text = rdf.read_text()
    declared = "      - size:\n          min: 92\n          step: 8\n"
    assert text.count(declared) == 2
    rdf.write_text(text.replace(declared, "      - size: 124\n"))
    static_onnx(load_model(ckpt), (124, 124), folder / "weights.onnx")
    image = cells((1, 150, 170), dtype=np.uint8)
    native, net = describe(ckpt)
    expected = overlap_tile(net, native.normalization(image), tile_size=212)
    for weights in ("onnx", "torchscript"):
        info, model = describe(folder, weights=weights)
        assert info.exact and info.geometry.fixed and (info.geometry.input_size, info.geometry.factor) == (124, 8)
        assert info.tiling.startswith("exact: fixed input size 124 px"), weights
        got = overlap_tile(model, info.normalization(image), tile_size=212)
        assert np.abs(got - expected).max() <= 1e-4, weights
    assert not describe(folder)[0].geometry.fixed


# --- bad model files: one line, exit 2 --------------------------------------------------------


@pytest.fixture
def image(tmp_path) -> str:
    return write_zarr(tmp_path / "img.zarr", np.zeros((60, 50), np.uint8))


def expect_error(capsys, args: list[str], message: str) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("overtile: error: ") and err.count("\n") == 1, err
    assert message in err, err


def predict_args(image: str, model: Path, tmp_path: Path) -> list[str]:
    return ["predict", image, str(tmp_path / "out.zarr"), "--model", str(model), "--scheduler", NOWHERE]


def test_an_onnx_model_takes_onnxruntimes_float32_only(tmp_path, image, onnx_file, capsys):
    for precision in ("fp32", "bf16"):  # fp32 would not be strict there: onnxruntime's CUDA uses TF32
        expect_error(capsys, predict_args(image, onnx_file, tmp_path) + ["--autocast", precision],
                     f"--autocast {precision}: {onnx_file} is an ONNX model, run in float32 by onnxruntime")


def test_corrupt_model_files_are_one_line(tmp_path, image, torchscript, capsys):
    junk_onnx = tmp_path / "junk.onnx"
    junk_onnx.write_bytes(b"\x08\x07" + b"not really a protobuf" * 10)
    expect_error(capsys, predict_args(image, junk_onnx, tmp_path), "junk.onnx: not a readable ONNX model")
    broken_ts = tmp_path / "broken.ts"
    with zipfile.ZipFile(torchscript) as src, zipfile.ZipFile(broken_ts, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"garbage" if name.endswith(".py") or name.endswith("data.pkl") else src.read(name))
    expect_error(capsys, predict_args(image, broken_ts, tmp_path), "broken.ts: not a readable TorchScript model")
    folder = tmp_path / "folder"
    folder.mkdir()
    expect_error(capsys, predict_args(image, folder, tmp_path), "folder: a folder without rdf.yaml")
    bad_rdf = tmp_path / "bad"
    bad_rdf.mkdir()
    (bad_rdf / "rdf.yaml").write_text("type: model\nformat_version: 0.5.4\nname: x\n")
    expect_error(capsys, ["model", "info", str(bad_rdf)], "bad: not a valid bioimage.io model description")
    expect_error(capsys, predict_args(image, tmp_path / "missing.onnx", tmp_path), "missing.onnx: no such model file")


def test_a_model_that_does_not_fit_the_image_is_one_line(tmp_path, image, capsys):
    rgb = tmp_path / "rgb.ts"
    torch.manual_seed(0)
    torch.jit.trace(UNet(in_channels=3, depth=3, base_channels=2).eval(), torch.zeros(1, 3, 44, 44)).save(str(rgb))
    expect_error(capsys, predict_args(image, rgb, tmp_path), "rgb.ts: the model expects 3 input channel(s)")
    flat = tmp_path / "flat.ts"
    torch.jit.script(nn.Flatten().eval()).save(str(flat))
    expect_error(capsys, predict_args(image, flat, tmp_path), "flat.ts: output of shape")


@pytest.mark.slow
def test_a_package_whose_declarations_do_not_match_its_model_is_an_error(package, tmp_path, capsys):
    folder = tmp_path / "package"
    with zipfile.ZipFile(package) as z:
        z.extractall(folder)
    rdf = folder / "rdf.yaml"
    text = rdf.read_text()
    rdf.write_text(text.replace("offset: -88", "offset: -80"))
    expect_error(capsys, ["model", "info", str(folder)], "declares output = input − 80 px, but the model's output is input − 88 px")
    expect_error(capsys, ["model", "info", str(folder), "--weights", "torchscript"],
                 "declares output = input − 80 px, but the model's output is input − 88 px")
    rdf.write_text(text.replace("step: 8", "step: 4"))
    expect_error(capsys, ["model", "info", str(folder)], "declares input sizes 92 + k·4 px, but its U-Net takes 92 + k·8 px")
    expect_error(capsys, ["model", "info", str(folder), "--weights", "onnx"], "declares input sizes 92 + k·4 px, but the model")


def test_per_sample_statistics_are_taken_once_from_the_whole_image():
    """A package's zero_mean_unit_variance and scale_range, fixed from the whole image, give
    every block the arithmetic one pass over the image would: no per-tile statistics, no seams.
    Each statistic is of the image as given, before any step, as bioimageio.core measures a
    sample once ahead of its preprocessing."""
    image = cells((2, 120, 90), dtype=np.uint16)
    steps = Preprocessing((ScaleLinear((2.0,), (5.0,)), ZeroMeanUnitVariance(per_channel=True), ScaleRange(1, 99)))
    fixed = steps.fixed(image)
    assert not fixed.needs_statistics and steps.needs_statistics
    x = image.astype(np.float32)
    mean, std = x.mean(axis=(1, 2), keepdims=True), x.std(axis=(1, 2), keepdims=True)
    z = (2 * x + 5 - mean) / (std + 1e-6)
    low, high = np.percentile(x, [1, 99])
    whole = (z - low) / (high - low + 1e-6)
    np.testing.assert_allclose(fixed(image), whole, atol=1e-5)
    np.testing.assert_allclose(fixed(image[:, 30:70, 10:50]), whole[:, 30:70, 10:50], atol=1e-5)  # a block alone


@pytest.mark.slow
def test_a_package_with_statistics_and_a_halo_predicts_through_overtile(tmp_path, client, capsys):
    """A same-padding U-Net packaged with zero_mean_unit_variance and a declared halo: the
    statistics come from the whole image, the halo is cropped from every tile, tiles blend."""
    ckpt = make_model(tmp_path / "same.pt", depth=3, base_channels=2, padding="same")
    folder = tmp_path / "package"
    export(str(ckpt), str(folder), "bioimageio")
    rdf = folder / "rdf.yaml"
    text = rdf.read_text().replace("    preprocessing:\n", "    preprocessing:\n      - id: zero_mean_unit_variance\n")
    text = text.replace("min: 4\n", "min: 16\n")  # room for the halo
    for axis in "yx":  # the output axes: crop 6 px of each tile's output (its zero-padded border)
        text = text.replace(f"          offset: 0\n        id: {axis}\n        type: space\n",
                            f"          offset: 0\n        id: {axis}\n        type: space\n        halo: 6\n")
    rdf.write_text(text)
    info, model = describe(folder)
    assert info.halo == 6 and info.geometry.margin == 6 and not info.exact and info.needs_statistics
    data = cells((150, 130))
    image = write_zarr(tmp_path / "img.zarr", data)
    out, stdout, _ = run_predict(capsys, image, folder, tmp_path / "p.zarr", client, "--tile-size", "48")
    assert "tiles blended: same padding" in stdout
    x = data.astype(np.float32)[None]
    expected = overlap_tile(model, (x - x.mean()) / (x.std() + 1e-6), tile_size=48)
    np.testing.assert_allclose(out, np.exp(expected) / np.exp(expected).sum(axis=0), atol=1e-5)


def test_file_digest_covers_a_package_folder(tmp_path, ckpt):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "rdf.yaml").write_text("a")
    (folder / "weights.pt").write_bytes(ckpt.read_bytes())
    first = file_digest(folder)
    (folder / "weights.pt").write_bytes(ckpt.read_bytes() + b"\0")
    assert file_digest(folder) != first and file_digest(ckpt) != first


def test_a_checkpoint_of_overtile_still_needs_no_probe(tmp_path):
    path = make_model(tmp_path / "m.pt", depth=3, base_channels=2)
    info, _ = describe(path)
    assert info.kind == "overtile" and info.weights == "overtile" and info.compilable
    assert info.tiling.startswith("exact: a valid U-Net")


# --- what the outputs are: logits or probabilities --------------------------------------------


class Head(nn.Module):
    """A valid 3×3 convolution (output = input − 2 px) that ends in its own activation:
    ``sigmoid`` of one channel that is x − 0.5 at the centre pixel, ``softmax`` of three
    channels, or ``none`` (logits, as overtile's exports)."""

    def __init__(self, head: str, channels: int):
        super().__init__()
        self.head = head
        self.conv = nn.Conv2d(1, channels, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, 1, 1] = 8.0 * torch.arange(1, channels + 1)
            self.conv.bias.fill_(-4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.head == "sigmoid":
            return torch.sigmoid(y)
        return torch.softmax(y, 1) if self.head == "softmax" else y


def head_model(tmp_path: Path, head: str, channels: int, form: str) -> Path:
    net = Head(head, channels).eval()
    if form == "onnx":
        path = tmp_path / f"{head}{channels}.onnx"
        write_onnx(net, torch.zeros(1, 1, 16, 16), path)
    else:
        path = tmp_path / f"{head}{channels}.ts"
        with warnings.catch_warnings():  # torch deprecates TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.script(net).save(str(path))
    return path


@pytest.mark.parametrize("form", ["torchscript", "onnx"])
def test_a_model_that_ends_in_its_own_sigmoid_or_softmax_is_not_activated_again(tmp_path, form):
    """Outputs in [0, 1] (summing to 1 over several channels) already are probabilities: no
    second activation, and the model's line says why. Logits keep softmax, or sigmoid for one."""
    for head, channels, activation in [("sigmoid", 1, "none"), ("softmax", 3, "none"), ("none", 1, "sigmoid"),
                                       ("none", 3, "softmax")]:
        info, _ = describe(head_model(tmp_path, head, channels, form))
        assert (info.activation, info.probabilities) == (activation, activation == "none"), (head, channels)
        assert ("its outputs already are probabilities" in info.summary()) == (activation == "none")


def test_labels_of_a_sigmoid_head_are_its_probability_above_one_half(tmp_path):
    """``--output labels`` of a model ending in a sigmoid: p > 0.5, not every pixel (as the
    sigmoid's output read as a logit, p > 0, would make it); --activation overrides what the
    probe found, and a run with another activation does not resume into the output."""
    data = cells((60, 50))
    image = write_zarr(tmp_path / "img.zarr", data)
    path = head_model(tmp_path, "sigmoid", 1, "torchscript")

    def run(name: str, **extra):
        settings = PredictSettings(input=image, output=str(tmp_path / name), model=str(path), block_size=32,
                                   device="cpu", pyramid=False, output_kind="labels", **extra)
        job, _ = blockwise.execute(plan_prediction, settings, in_process=True)
        return job, zarr.open_array(job.output_array, mode="r")[...]

    job, labels = run("labels.zarr")
    expected = data.astype(np.float32) / 255 > 0.5
    assert job.model.activation == "none" and 0.1 < expected.mean() < 0.9
    np.testing.assert_array_equal(labels[0], expected)
    forced, all_foreground = run("forced.zarr", activation="sigmoid")
    assert all_foreground.all() and forced.fingerprint != job.fingerprint
    assert run("none.zarr", activation="none")[0].fingerprint == job.fingerprint
    with pytest.raises(InputError, match="one output channel, whose softmax is 1 everywhere"):
        run("softmax.zarr", activation="softmax")


def test_a_model_whose_outputs_are_not_floating_point_is_one_line(tmp_path, image, capsys):
    class Labels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).argmax(1, keepdim=True)

    ts = tmp_path / "labels.ts"
    torch.jit.script(Labels().eval()).save(str(ts))
    expect_error(capsys, predict_args(image, ts, tmp_path), "labels.ts: output of type torch.int64; overtile needs "
                                                            "floating-point logits or probabilities")
    onnx = tmp_path / "labels.onnx"
    write_onnx(Labels().eval(), torch.zeros(1, 1, 16, 16), onnx)
    expect_error(capsys, predict_args(image, onnx, tmp_path), "labels.onnx: ONNX output of type tensor(int64)")


def test_a_package_given_as_its_rdf_yaml_is_digested_and_stamped_with_its_weights(tmp_path, ckpt):
    """A rerun after the package's weights were replaced must not resume with the old blocks,
    nor a worker keep the old model: the rdf.yaml stands for itself and the files it names.
    Not for the rest of its folder: a project folder holding the run's own output beside the
    package would change the digest as the run writes it, and hash gigabytes."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    rdf = folder / "rdf.yaml"
    rdf.write_text("weights:\n  pytorch_state_dict:\n    source: weights.pt\n")
    (folder / "weights.pt").write_bytes(ckpt.read_bytes())
    digest, stamp = file_digest(rdf), models.stamp(rdf)
    assert digest == file_digest(folder)  # here the folder holds nothing else
    (folder / "output.zarr").mkdir()
    (folder / "output.zarr" / "zarr.json").write_text("{}")
    (folder / "notes.txt").write_text("x")
    assert file_digest(rdf) == digest and models.stamp(rdf) == stamp
    (folder / "weights.pt").write_bytes(ckpt.read_bytes() + b"\0")
    assert file_digest(rdf) != digest and models.stamp(rdf) != stamp


def extracted(package: Path, folder: Path) -> tuple[Path, str]:
    """The package as a folder to edit: its rdf.yaml and that file's text."""
    with zipfile.ZipFile(package) as z:
        z.extractall(folder)
    return folder / "rdf.yaml", (folder / "rdf.yaml").read_text()


def test_a_package_with_a_physical_scale_or_a_fixed_output_size_runs(package, tmp_path, capsys):
    """Output size = input size × input scale / output scale + offset (spec 0.5): input and
    output at 0.5 µm is a plain crop, an output at another scale is refused. A fixed input
    size with a fixed output size crops half their difference on each side."""
    rdf, text = extracted(package, tmp_path / "package")
    space = "        type: space\n"
    assert text.count(space) == 4  # y and x of the input, then of the output
    inputs, outputs = text.split("outputs:\n")
    rdf.write_text(inputs.replace(space, space + "        scale: 0.5\n        unit: micrometer\n") + "outputs:\n" +
                   outputs.replace(space, space + "        scale: 0.5\n        unit: micrometer\n"))
    assert describe(rdf.parent)[0].geometry.margin == 44
    rdf.write_text(inputs.replace(space, space + "        scale: 0.5\n        unit: micrometer\n") + "outputs:\n" +
                   outputs.replace(space, space + "        scale: 0.25\n        unit: micrometer\n"))
    expect_error(capsys, ["model", "info", str(rdf.parent)], "output axis 'y' has scale 0.25, its input's 0.5")
    fixed = text.replace("      - size:\n          min: 92\n          step: 8\n", "      - size: 124\n")
    for axis in "yx":
        fixed = fixed.replace(f"      - size:\n          tensor_id: raw\n          axis_id: {axis}\n          offset: -88\n",
                              "      - size: 36\n")
    rdf.write_text(fixed)
    info, _ = describe(rdf.parent, weights="pytorch_state_dict")
    assert info.geometry.margin == 44
    rdf.write_text(fixed.replace("size: 36", "size: 37"))
    expect_error(capsys, ["model", "info", str(rdf.parent)], "output axis 'y' is the input -87 px: not a crop of the same width")


def test_a_model_that_fails_for_another_reason_than_its_size_says_why(tmp_path, capsys, image):
    """The probe's error carries the model's last failure, not just 'no input size': a model
    that casts its input to float64 before float32 weights fails at every size for that."""
    class Double(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.double())

    path = tmp_path / "double.ts"
    with warnings.catch_warnings():  # torch deprecates TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Double().eval()).save(str(path))
    expect_error(capsys, ["model", "info", str(path)], "the model runs at no 2-D input size from 1 to 640 px with 1 "
                 "channel(s) (at 640 px: RuntimeError: Input type (double) and bias type (float) should be the same)")

    def out_of_memory(x: np.ndarray) -> np.ndarray:
        raise MemoryError("cannot allocate 3 GiB\nsecond line")

    with pytest.raises(InputError, match=r"declares a fixed input size 12 px, but the model fails at 12 px "
                                         r"\(MemoryError: cannot allocate 3 GiB\)$"):
        probe(out_of_memory, 2, 1, "tiny", declared=Declared(12, 0))


def test_an_exported_onnx_file_does_not_claim_its_output_is_as_large_as_its_input(tmp_path):
    """A valid U-Net's output is its input less 2·margin: the output's dynamic axes are named
    apart from the input's, which would say the two are equal."""
    import onnx

    torch.manual_seed(0)
    path = tmp_path / "unet.onnx"
    write_onnx(UNet(depth=3, base_channels=2).eval(), torch.zeros(1, 1, 60, 60), path)
    graph = onnx.load(str(path)).graph

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(graph.input[0]) == ["batch", 1, "y", "x"]
    assert dims(graph.output[0]) == ["batch", 2, "out_y", "out_x"]
