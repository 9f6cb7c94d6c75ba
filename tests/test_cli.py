"""The ``overtile`` command: help everywhere, a real run, and one clear line (exit 2) for
each kind of bad input, leaving an existing output untouched."""

import os
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cells, make_model, write_zarr

from pipeline.cli import main
from pipeline.storage import create_image


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_installed_command_prints_its_help():
    """The console script itself (pyproject's entry point), once: the rest is in-process."""
    overtile = Path(sys.executable).with_name("overtile")
    result = subprocess.run([str(overtile), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: overtile" in result.stdout
    assert all(c in result.stdout for c in ("predict", "objects", "cohort", "train", "ingest", "model"))


@pytest.mark.parametrize("command", [["predict"], ["weights"], ["objects"], ["cohort"], ["train"], ["score"],
                                     ["ingest"], ["model"], ["model", "init"], ["model", "info"], ["model", "export"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: overtile {' '.join(command)}")


SETTINGS = {  # command -> (settings model, positional fields)
    "predict": ("pipeline.jobs.predict:PredictSettings", ("input", "output")),
    "weights": ("pipeline.jobs.weights:WeightSettings", ("labels", "output")),
    "ingest": ("pipeline.jobs.ingest:IngestSettings", ("slide", "output")),
    "train": ("pipeline.jobs.train:TrainSettings", ()),
}


def _model(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _subparser(command: str):
    from pipeline.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[command]


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_every_settings_field_has_its_option_with_the_models_help(command):
    """The command line is made from the settings model: every field has its option (or
    positional), with the field's description as help, and nothing the model lacks."""
    model, positional = SETTINGS[command]
    model = _model(model)
    actions = {a.dest: a for a in _subparser(command)._actions if a.dest not in ("help", "quiet", "preview")}
    assert set(actions) == set(model.model_fields)
    for name, info in model.model_fields.items():
        action = actions[name]
        assert action.help.replace("%%", "%").startswith(info.description), name
        assert (not action.option_strings) == (name in positional), name


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_the_command_line_defaults_are_the_models(command):
    """Only what the user gives is passed on: parsing the required arguments alone gives
    exactly the model's defaults, so the two can never disagree."""
    from pipeline.cli import _settings

    model, positional = SETTINGS[command]
    model = _model(model)
    required = [n for n, f in model.model_fields.items() if f.is_required()]
    argv = [command] + [f"/x/{n}" for n in positional]
    for name in required:
        if name not in positional:
            argv += ["--" + name.replace("_", "-"), f"/x/{name}"]
    from pipeline.cli import build_parser

    parsed = _settings(model, build_parser().parse_args(argv))
    assert parsed == model(**{n: f"/x/{n}" for n in required})


def test_options_that_were_missing_are_there(tmp_path):
    """Flags the hand-written parser had forgotten, now generated from the models."""
    from pipeline.cli import _settings, build_parser

    predict = build_parser().parse_args(["predict", "i", "o", "--model", "m", "--prefetch", "--no-channels-last"])
    s = _settings(_model(SETTINGS["predict"][0]), predict)
    assert s.prefetch is True and s.channels_last is False
    train = build_parser().parse_args(["train", "--images", "i", "--labels", "l", "--out", "o", "--weight-decay", "0.01",
                                       "--elastic-sigma", "4", "--elastic-grid", "5", "--mirror", "symmetric",
                                       "--val-tile-size", "300", "--labels-kind", "instances", "--val-slices", "2-4", "7",
                                       "--loader-workers", "2", "--autocast", "bf16"])
    s = _settings(_model(SETTINGS["train"][0]), train)
    assert (s.weight_decay, s.elastic_sigma, s.elastic_grid, s.mirror, s.val_tile_size, s.labels_kind) == \
        (0.01, 4.0, 5, "symmetric", 300, "instances")
    assert s.val_slices == (2, 3, 4, 7) and s.loader_workers == 2 and s.autocast == "bf16"


@pytest.mark.slow
def test_model_init_then_predict_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert main(["model", "init", str(ckpt), "--base-channels", "4", "--depth", "4"]) == 0 and ckpt.exists()
    assert main(["model", "info", str(ckpt)]) == 0 and "margin 44 px" in capsys.readouterr().out
    image = write_zarr(tmp_path / "img.zarr", np.random.default_rng(0).integers(0, 255, (150, 170), dtype=np.uint8))
    args = ["predict", image, str(tmp_path / "out.zarr"), "--model", str(ckpt), "--block-size", "64", "--workers", "2"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "9 blocks computed, 0 skipped" in result.stdout and "MP/s" in result.stdout
    assert "out.zarr" in result.stdout
    assert "9/9" in result.stderr  # the progress bar
    rerun = run_cli(*args)
    assert "0 blocks computed, 9 skipped" in rerun.stdout and "resuming" in rerun.stdout
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"]
    assert out.shape == (2, 150, 170) and out.dtype == np.float32


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def setup(tmp_path, model_2d):
    """A good image, a good model and an existing output (from an earlier run) to protect."""
    image = write_zarr(tmp_path / "img.zarr", np.zeros((40, 50), np.uint8))
    out = tmp_path / "out.zarr"
    create_image(str(out), (2, 40, 50), (2, 40, 50), "float32", "cyx")[...] = 0.5
    return tmp_path, image, out, model_2d


def expect_error(capsys, args, message, out: Path):
    before = tree_digest(out)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("overtile: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert tree_digest(out) == before  # the existing output is untouched


def test_missing_input(setup, capsys):
    tmp, _, out, model = setup
    expect_error(capsys, ["predict", str(tmp / "missing.zarr"), str(out), "--model", str(model)], "missing.zarr: no such file", out)


def test_input_not_zarr(setup, capsys):
    tmp, _, out, model = setup
    (tmp / "photo.png").write_bytes(b"\x89PNG not really")
    expect_error(capsys, ["predict", str(tmp / "photo.png"), str(out), "--model", str(model)], "photo.png: not a Zarr", out)


def test_axes_do_not_match(setup, capsys):
    tmp, image, out, model = setup
    expect_error(capsys, ["predict", image, str(out), "--model", str(model), "--axes", "zyx"], "axes 'zyx' do not match the array's 2 dimensions", out)


@pytest.mark.parametrize("dtype", [bool, np.complex64])
def test_unsupported_dtype(setup, capsys, dtype):
    tmp, _, out, model = setup
    image = write_zarr(tmp / "odd.zarr", np.zeros((40, 50), dtype))
    expect_error(capsys, ["predict", image, str(out), "--model", str(model)], f"odd.zarr: unsupported dtype {np.dtype(dtype)}", out)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_float_input(setup, capsys, bad):
    tmp, _, out, model = setup
    data = np.zeros((40, 50), np.float32)
    data[33, 7] = bad
    image = write_zarr(tmp / "float.zarr", data, chunks=(16, 16))
    expect_error(capsys, ["predict", image, str(out), "--model", str(model)], "float.zarr: NaN or Inf values", out)


def test_model_channels_do_not_match_image(setup, capsys):
    tmp, _, out, _ = setup
    rgb = make_model(tmp / "rgb.pt", in_channels=3, depth=3)
    image = write_zarr(tmp / "gray.zarr", np.zeros((40, 50), np.uint8))
    expect_error(capsys, ["predict", image, str(out), "--model", str(rgb)], "rgb.pt: the model expects 3 input channel(s); ", out)


def test_corrupt_checkpoint(setup, capsys):
    tmp, image, out, model = setup
    broken = tmp / "broken.pt"
    broken.write_bytes(Path(model).read_bytes()[:2000])  # a truncated download
    expect_error(capsys, ["predict", image, str(out), "--model", str(broken)], "broken.pt: not a readable checkpoint", out)


def test_damaged_or_diverged_checkpoints_and_other_files(setup, capsys):
    """torch.load reads a checkpoint whose bytes changed without a word (it checks no CRC):
    every prediction would be NaN or silently other. Weights that are NaN, and files that are
    not checkpoints at all, are refused as clearly."""
    import zipfile

    import torch

    tmp, image, out, model = setup
    with zipfile.ZipFile(model) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)  # the largest weight tensor
    data = bytearray(Path(model).read_bytes())
    names, extra = np.frombuffer(bytes(data[member.header_offset + 26:member.header_offset + 30]), "<u2")
    start = member.header_offset + 30 + int(names) + int(extra)  # its stored bytes, after the local header
    data[start:start + 8] = b"\xff" * 8
    (tmp / "damaged.pt").write_bytes(bytes(data))
    expect_error(capsys, ["predict", image, str(out), "--model", str(tmp / "damaged.pt")], "fails its checksum", out)
    payload = torch.load(model, weights_only=True)
    next(iter(payload["state_dict"].values()))[0] = float("nan")
    torch.save(payload, tmp / "nan.pt")
    expect_error(capsys, ["predict", image, str(out), "--model", str(tmp / "nan.pt")], "NaN or Inf weights", out)
    (tmp / "notes.pt").write_text("my model\n")
    expect_error(capsys, ["predict", image, str(out), "--model", str(tmp / "notes.pt")],
                 "notes.pt: not an overtile checkpoint", out)


def test_output_that_is_or_holds_the_input_is_refused_even_with_overwrite(setup, capsys):
    tmp, image, out, model = setup
    (tmp / "link.zarr").symlink_to(image)
    for source, output in ((image, image), (image, str(Path(image).parent)),  # itself, or a folder it is in
                           ("file://" + image, image), (image, str(tmp / "link.zarr"))):  # spelled otherwise
        expect_error(capsys, ["predict", source, output, "--model", str(model), "--overwrite"],
                     "which this run reads", Path(image))


def test_existing_output_of_other_shape(setup, capsys):
    tmp, _, out, model = setup
    image = write_zarr(tmp / "bigger.zarr", np.zeros((60, 50), np.uint8))
    expect_error(capsys, ["predict", image, str(out), "--model", str(model)], "existing output has shape (2, 40, 50)", out)


def test_existing_output_from_other_settings_is_not_mixed(setup, capsys, tmp_path):
    tmp, image, out, model = setup
    other = make_model(tmp / "other.pt", seed=1)
    assert main(["predict", image, str(tmp / "o.zarr"), "--model", str(model), "--block-size", "32", "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    expect_error(capsys, ["predict", image, str(tmp / "o.zarr"), "--model", str(other), "--block-size", "32"], "holds the output of a run with other settings", tmp / "o.zarr")


def test_too_small_tile_and_bad_numbers(setup, capsys):
    tmp, image, out, model = setup
    expect_error(capsys, ["predict", image, str(out), "--model", str(model), "--tile-size", "100"], "--tile-size 100", out)
    expect_error(capsys, ["predict", image, str(out), "--model", str(model), "--batch-size", "0"], "--batch-size", out)


def test_a_damaged_chunk_of_the_input_is_one_line(setup, capsys, tmp_path):
    """A chunk whose bytes do not decode (a broken copy): one line naming the input and where,
    exit 2, not the workers' tracebacks."""
    _, _, out, model = setup
    image = write_zarr(tmp_path / "damaged.zarr", np.full((40, 50), 7, np.uint8), chunks=(16, 16))
    chunk = next(p for p in sorted(Path(image).rglob("c/*/*")) if p.is_file())
    chunk.write_bytes(b"this is not a compressed chunk")
    assert main(["predict", image, str(tmp_path / "o.zarr"), "--model", str(model), "--block-size", "16",
                 "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("overtile: error: ") and err.count("\n") == 1, err
    assert f"{image}: stored chunks under" in err and "do not decode" in err


@pytest.mark.parametrize("option", [["--depth", "0"], ["--base-channels", "-3"], ["--base-channels", "0"],
                                    ["--in-channels", "0"], ["--classes", "1"]])
def test_model_init_refuses_nets_that_cannot_be(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as stop:
        main(["model", "init", str(tmp_path / "m.pt"), *option])
    assert stop.value.code == 2 and f"argument {option[0]}" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_a_tissue_threshold_without_a_tissue_mask_is_refused(setup, capsys):
    tmp, image, out, model = setup
    expect_error(capsys, ["predict", image, str(out), "--model", str(model), "--tissue-threshold", "0.5"],
                 "--tissue-threshold thresholds a computed tissue mask", out)


def test_precision_not_settings_names_decide_a_resume(setup, capsys, tmp_path):
    """On a CPU, autocast none and fp32 are the same float32: a run may resume the other's
    output. On a GPU, none is TF32 and a resume there of a CPU run's output is refused."""
    from pipeline.jobs.predict import precision

    tmp, image, _, model = setup
    out = str(tmp / "o.zarr")
    args = ["predict", image, out, "--model", str(model), "--block-size", "32", "--workers", "1", "--quiet"]
    assert main(args) == 0
    assert main(args + ["--autocast", "fp32"]) == 0
    assert precision("none", "cpu") == precision("fp32", "cpu") == precision("fp32", "cuda") == "float32"
    assert precision("none", "cuda") == "tf32" and precision("bf16", "cpu") == "bf16"


def test_a_mistyped_option_is_an_error_of_its_command_with_the_option_meant(capsys):
    """argparse said 'usage: overtile [-h] COMMAND ...' for a typo in a command's option."""
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "in.zarr", "out.zarr", "--model", "m.pt", "--block-szie", "64"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: overtile predict" in err
    assert "unrecognized arguments: --block-szie 64 (did you mean --block-size?)" in err
    with pytest.raises(SystemExit):
        main(["model", "info", "m.pt", "--wieghts", "onnx"])
    assert "overtile model info: error: unrecognized arguments: --wieghts onnx (did you mean --weights?)" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_prints_one_line_not_the_workers_tracebacks(tmp_path, model_2d):
    """A terminal's Ctrl-C interrupts the whole process group, a local cluster's worker
    processes too: each printed a KeyboardInterrupt traceback above overtile's one line."""
    import signal
    import time

    from pipeline.storage import Ledger

    url = write_zarr(tmp_path / "big.zarr", cells((1024, 1024)), chunks=(256, 256))
    script = ("import signal, sys\n"
              "if __name__ == '__main__':\n"
              "    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a test's may ignore it)\n"
              "    from pipeline.cli import main\n"
              "    sys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "cli.py").write_text(script)
    out = tmp_path / "o.zarr"
    run = subprocess.Popen([sys.executable, str(tmp_path / "cli.py"), "predict", url, str(out), "--model", str(model_2d),
                            "--block-size", "64", "--workers", "2", "--quiet"], stderr=subprocess.PIPE, text=True,
                           start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if (out / "ledger").exists() and Ledger(str(out / "ledger"), (16, 16)).done().sum() >= 2:
                break
            time.sleep(0.2)
        assert run.poll() is None, "the run ended before it could be interrupted"
        os.killpg(run.pid, signal.SIGINT)  # the terminal's Ctrl-C: every process of the group
        err = run.communicate(timeout=120)[1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "interrupted; finished blocks are kept" in err, err
    assert "Traceback" not in err, err
