"""A trained overtile U-Net for other tools: TorchScript, ONNX, or a bioimage.io package.

A bare TorchScript or ONNX file carries no metadata, so the model's mean/std normalisation is
built into it: it takes float images scaled to 0-1 (integers divided by their dtype's
maximum), which is also what overtile feeds a bare file. A bioimage.io package declares its
preprocessing instead (``scale_linear``), with axes, the valid tile sizes, the crop (an output
of ``input - 2·margin``, in the spec's words a size offset), softmax postprocessing,
TorchScript, ONNX and state-dict weights, and a test input and output computed here by the
native model; bioimageio.spec validates it before it is written.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from pipeline.errors import InputError
from pipeline.numerics.unet import Normalization, UNet, load_model

Format = Literal["bioimageio", "onnx", "torchscript"]
ONNX_OPSET = 17
UNET_DOI = "10.1007/978-3-319-24574-4_28"


class Normalized(nn.Module):
    """The U-Net with its mean/std normalisation in front: what a bare file holds. The same
    float32 arithmetic as :class:`~pipeline.numerics.unet.Normalization` (subtract, then
    multiply by the reciprocal)."""

    def __init__(self, net: UNet, normalization: Normalization):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(np.float32(1.0 / normalization.std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * self.scale)


def _bare(net: UNet) -> nn.Module:
    n = net.normalization
    return net if (n.mean, n.std) == (0.0, 1.0) else Normalized(net, n).eval()


def _example(net: UNet, outputs: int = 2) -> torch.Tensor:
    size = net.min_input_size(outputs * net.factor + net.output_remainder)
    return torch.zeros((1, net.config.in_channels) + (size,) * net.config.dims)


def write_torchscript(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace ``net`` (sizes stay symbolic: the trace runs at any valid tile size) and save it."""
    with torch.no_grad(), warnings.catch_warnings():  # torch deprecates TorchScript; napari, ilastik, deepImageJ read it
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(str(path))


def write_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``net`` to ONNX with the batch and every spatial axis dynamic (torch's
    TorchScript-based exporter: a second, against the minutes of the torch.export one).

    The output's spatial axes have names of their own (``out_y``, ...): a valid net's output
    is smaller than its input, and a shared name would tell ONNX tools they are equal."""
    spatial = "zyx"[-(example.ndim - 2):]
    inputs = {0: "batch", **{i + 2: a for i, a in enumerate(spatial)}}
    outputs = {0: "batch", **{i + 2: f"out_{a}" for i, a in enumerate(spatial)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": inputs, "logits": outputs}, opset_version=ONNX_OPSET, dynamo=False)


def sample_input(net: UNet, seed: int = 0) -> np.ndarray:
    """A deterministic test input ``(1, C, *spatial)`` in 0-1, of smooth blobs (cell-like, so
    the output shows structure), a few steps larger than the smallest tile."""
    from scipy import ndimage

    size = net.min_input_size(4 * net.factor + net.output_remainder)
    rng = np.random.default_rng(seed)
    shape = (1, net.config.in_channels) + (size,) * net.config.dims
    image = ndimage.gaussian_filter(rng.random(shape), (0, 0) + (3,) * net.config.dims)
    image = (image - image.min()) / (np.ptp(image) + 1e-9)
    return image.astype(np.float32)


def export(checkpoint: str, out: str, fmt: Format, name: str | None = None, description: str | None = None,
           authors: tuple[str, ...] = (), license: str = "CC-BY-4.0") -> str:
    """Write the checkpoint's model as ``fmt`` to ``out``; returns a line saying what was written.

    ``bioimageio``: ``out`` ending in ``.zip`` is the package as one zip, anything else a folder.
    """
    net = load_model(checkpoint)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(net)
    if fmt == "torchscript":
        write_torchscript(_bare(net), example, path)
        return f"TorchScript written to {path} (takes float input scaled to 0-1; normalisation built in)"
    if fmt == "onnx":
        write_onnx(_bare(net), example, path)
        return f"ONNX (opset {ONNX_OPSET}) written to {path} (takes float input scaled to 0-1; normalisation built in)"
    stem = "".join(ch if ch.isalnum() or ch in "-_ " else "-" for ch in Path(checkpoint).stem)
    return write_package(net, checkpoint, path, name or f"overtile U-Net {stem}"[:64], description, authors, license)


def write_package(net: UNet, checkpoint: str, out: Path, name: str, description: str | None,
                  authors: tuple[str, ...], license: str) -> str:
    """The bioimage.io package of ``net``: build the description, validate it, write it."""
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5 as spec

    c, g = net.config, net.geometry
    spatial = "zyx"[-c.dims:]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        x = sample_input(net)
        with torch.inference_mode():
            y = torch.softmax(net(torch.from_numpy(net.normalization(x[0]))[None]), dim=1).numpy()
        np.save(folder / "test_input.npy", x)
        np.save(folder / "test_output.npy", y)
        torch.save(net.state_dict(), folder / "weights.pt")
        write_torchscript(net, torch.from_numpy(x), folder / "weights.torchscript.pt")
        write_onnx(net, torch.from_numpy(x), folder / "weights.onnx")
        readme = folder / "README.md"
        readme.write_text(_readme(net, name))
        torch_version = spec.Version(torch.__version__.split("+")[0])
        n = net.normalization
        preprocessing = [] if (n.mean, n.std) == (0.0, 1.0) else [
            spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=float(1 / n.std), offset=float(-n.mean / n.std)))]
        sizes = spec.ParameterizedSize(min=g.min_input_size(1), step=g.factor)
        inputs = spec.InputTensorDescr(
            id=spec.TensorId("raw"),
            description="image, float32; overtile divides integer images by their dtype's maximum first",
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(f"channel{i}") for i in range(c.in_channels)]),
                  *[spec.SpaceInputAxis(id=spec.AxisId(a), size=sizes) for a in spatial]],
            test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=preprocessing,
        )
        outputs = spec.OutputTensorDescr(
            id=spec.TensorId("probabilities"),
            description="class probabilities (softmax over the channel axis)",
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(f"class{i}") for i in range(c.num_classes)]),
                  *[spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(
                      tensor_id=spec.TensorId("raw"), axis_id=spec.AxisId(a), offset=-2 * g.margin)) for a in spatial]],
            test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            postprocessing=[spec.SoftmaxDescr(kwargs=spec.SoftmaxKwargs(axis=spec.AxisId("channel")))],
        )
        weights = spec.WeightsDescr(
            pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=folder / "weights.pt", pytorch_version=torch_version,
                architecture=spec.ArchitectureFromLibraryDescr(
                    callable=spec.Identifier("UNet"), import_from="pipeline.numerics.unet", kwargs=asdict(c))),
            torchscript=spec.TorchscriptWeightsDescr(source=folder / "weights.torchscript.pt", pytorch_version=torch_version,
                                                     parent="pytorch_state_dict"),
            onnx=spec.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=ONNX_OPSET, parent="pytorch_state_dict"),
        )
        from bioimageio.spec.generic.v0_3 import Author, CiteEntry, Doi

        crop = (f"a valid U-Net: its output is the input less {g.margin} px on each side, and tiles whose outputs "
                f"start on a {g.factor}-px grid are exact") if not g.blend else "a same-padding U-Net: blend overlapping tiles"
        try:
            descr = spec.ModelDescr(
                name=name,
                description=description or f"{c.dims}-D U-Net (Ronneberger et al. 2015) trained with overtile; {crop}.",
                authors=[Author(name=a) for a in (authors or ("overtile",))],
                cite=[CiteEntry(text="Ronneberger, Fischer, Brox: U-Net, MICCAI 2015", doi=Doi(UNET_DOI))],
                license=spec.LicenseId(license),
                documentation=spec.FileDescr(source=readme),
                tags=["unet", "segmentation", "overtile", f"{c.dims}d"],
                inputs=[inputs],
                outputs=[outputs],
                weights=weights,
                config={"overtile": {"scale_integers": n.scale_integers, "margin": g.margin, "step": g.factor,
                                     "checkpoint": Path(checkpoint).name}},
            )
        except ValidationError as exc:  # the spec's first complaint, in one line
            err = exc.errors()[0]
            raise InputError(f"{out}: the package does not validate ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None
        if out.suffix == ".zip":
            save_bioimageio_package(descr, output_path=out)
        else:
            save_bioimageio_package_as_folder(descr, output_path=out)
    return (f"bioimage.io package written to {out} (rdf.yaml, state-dict, TorchScript and ONNX weights, test input "
            f"{'×'.join(map(str, x.shape))} and output; tile sizes {sizes.min} + k·{sizes.step} px, output = input − "
            f"{2 * g.margin} px)")


def _readme(net: UNet, name: str) -> str:
    c, g = net.config, net.geometry
    return f"""# {name}

A {c.dims}-D U-Net (Ronneberger et al. 2015), depth {c.depth}, {c.base_channels} base channels,
{c.padding} padding, {c.in_channels} input channel(s), {c.num_classes} classes; exported by overtile.

Input: float32, integer images divided by their dtype's maximum; then `{net.normalization}`.
Tile sizes {g.min_input_size(1)} + k·{g.factor} px; the output is the input less {g.margin} px on each side.
{"Tiles whose outputs start on a " + str(g.factor) + "-px grid of the image compute exactly what one pass over the whole image computes." if not g.blend else "Same padding: overlapping tiles should be blended."}

## Validation

The test output is the model's own prediction on the test input (softmax over classes).
Validate on held-out images of your own before use.
"""
