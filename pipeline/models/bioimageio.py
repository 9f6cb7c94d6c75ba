"""bioimage.io model packages, read with bioimageio.spec: what overtile needs from the rdf.

A package (a zip, or a folder with ``rdf.yaml``) declares its tensors' axes and sizes, a halo,
intensity preprocessing, postprocessing and weights in several formats. :func:`read_package`
turns that into plain values and refuses, in one line, what overtile cannot run: several
inputs or outputs, time or index axes, weights only as code it would have to import.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.models import preprocessing as pre
from pipeline.models.probe import Declared

# Our own U-Net as a package's pytorch_state_dict architecture: rebuilt from its kwargs, the
# weights loaded with weights_only=True; no code from the package is imported.
OWN_ARCHITECTURE = ("pipeline.numerics.unet", "UNet")
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


def rdf_name(names: list[str]) -> str | None:
    """The package's description among the top-level file names, if any."""
    for name in names:
        if "/" not in name.strip("/") and (name in RDF_NAMES or name.endswith(".bioimageio.yaml")):
            return name
    return None


@dataclass(frozen=True)
class Package:
    """What overtile runs of a package. ``weights``: format -> file inside the package."""

    root: str  # the zip file or the folder
    name: str
    input_axes: str  # e.g. "bcyx": b batch, c channel, z y x space
    output_axes: str
    in_channels: int
    num_classes: int
    declared: Declared
    margin: int  # context the model crops itself (declared by a negative size offset)
    halo: int  # what to crop from its output (declared halo)
    preprocessing: pre.Preprocessing
    activation: str  # softmax | sigmoid | none
    weights: dict[str, str] = field(default_factory=dict)
    unet: dict[str, Any] | None = None  # our U-Net's kwargs, when the state dict is ours

    @property
    def dims(self) -> int:
        return sum(a in "zyx" for a in self.input_axes)

    def read(self, member: str) -> bytes:
        """The bytes of a file of the package."""
        return read_member(self.root, member)


def package_root(path: str) -> str:
    """The zip file or the folder of a package given as a zip, a folder or its rdf.yaml."""
    target = Path(path)
    return str(target.parent if target.is_file() and not zipfile.is_zipfile(target) else target)


def read_member(path: str, member: str) -> bytes:
    """The bytes of the file ``member`` of the package at ``path``, without reading its
    description: what a worker does to load the weights a plan chose."""
    root = Path(package_root(path))
    if root.is_dir():
        return (root / member).read_bytes()
    with zipfile.ZipFile(root) as z:
        return z.read(member)


def _axes(tensor: Any, source: str, what: str) -> str:
    letters = []
    for axis in tensor.axes:
        kind = axis.type
        if kind == "batch":
            letters.append("b")
        elif kind == "channel":
            letters.append("c")
        elif kind == "space" and str(axis.id) in ("z", "y", "x"):
            letters.append(str(axis.id))
        else:
            raise InputError(f"{source}: {what} axis '{axis.id}' ({kind}); overtile runs models over space axes z, y, x")
    spatial = "".join(a for a in letters if a in "zyx")
    if spatial not in ("yx", "zyx"):
        raise InputError(f"{source}: {what} space axes '{spatial}'; overtile runs 2-D (yx) or 3-D (zyx) models")
    return "".join(letters)


def _declared_sizes(tensor: Any, source: str) -> Declared:
    """The input sizes the package declares; every space axis alike (what overtile tiles)."""
    sizes = set()
    for axis in tensor.axes:
        if axis.type != "space":
            continue
        size = axis.size
        if isinstance(size, int):
            sizes.add((size, 0))
        elif hasattr(size, "step"):
            sizes.add((int(size.min), int(size.step)))
        # a SizeReference to another input axis: as large as that one
    if len(sizes) != 1:
        raise InputError(f"{source}: its space axes take different sizes ({sorted(sizes)}); overtile tiles alike on every axis")
    lo, step = sizes.pop()
    return Declared(lo, step)


def _output_crop(tensor: Any, inp: Any, source: str) -> tuple[int, int]:
    """(margin, halo) declared by the output's space axes and a halo to crop from the output.

    The crop: a size ``input + offset`` with ``offset = -2 * margin`` (cropped by the model),
    or, where the input axis has one size, a fixed output size ``input - 2 * margin``. The
    spec's output size is ``input size × input scale / output scale + offset``: an output at
    the input's scale (whatever its physical size, 0.5 µm on both, say) is a plain crop.
    """
    inputs = {str(a.id): a for a in inp.axes if a.type == "space"}
    crops = set()
    for axis in tensor.axes:
        if axis.type != "space":
            continue
        size, ref = axis.size, inputs.get(str(axis.id))
        if isinstance(size, int) and ref is not None and isinstance(ref.size, int):
            offset = size - ref.size  # a fixed shape: the crop is what the sizes differ by
        elif hasattr(size, "tensor_id") and str(size.tensor_id) == str(inp.id) and str(size.axis_id) == str(axis.id):
            offset = size.offset
        else:
            raise InputError(f"{source}: output axis '{axis.id}' is not sized by the input's '{axis.id}'; "
                             f"overtile needs outputs that follow the input's size")
        scale, input_scale = getattr(axis, "scale", 1.0), getattr(ref, "scale", 1.0)
        if not math.isclose(scale, input_scale):
            raise InputError(f"{source}: output axis '{axis.id}' has scale {scale}, its input's {input_scale}; "
                             f"overtile needs outputs at the input's resolution")
        if offset > 0 or offset % 2:
            raise InputError(f"{source}: output axis '{axis.id}' is the input {offset:+d} px: not a crop of the same width on each side")
        crops.add((-offset // 2, int(getattr(axis, "halo", 0) or 0)))
    if len(crops) != 1:
        raise InputError(f"{source}: its output axes are cropped differently ({sorted(crops)})")
    return crops.pop()


def _per_channel(kwargs: Any, name: str) -> tuple[float, ...]:
    value = getattr(kwargs, name)
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def _preprocessing(tensor: Any, scale_integers: bool, source: str) -> pre.Preprocessing:
    steps: list[pre.Step] = []
    for step in tensor.preprocessing:
        kind, kw = step.id, getattr(step, "kwargs", None)
        if kind == "ensure_dtype":
            if str(kw.dtype) not in ("float32", "float64"):
                raise InputError(f"{source}: preprocessing ensure_dtype {kw.dtype}; overtile feeds float32")
        elif kind == "scale_linear":
            steps.append(pre.ScaleLinear(_per_channel(kw, "gain"), _per_channel(kw, "offset")))
        elif kind == "fixed_zero_mean_unit_variance":
            steps.append(pre.FixedZeroMeanUnitVariance(_per_channel(kw, "mean"), _per_channel(kw, "std")))
        elif kind == "zero_mean_unit_variance":
            steps.append(pre.ZeroMeanUnitVariance(per_channel=_per_channel_axes(kw), eps=float(kw.eps)))
        elif kind == "scale_range":
            steps.append(pre.ScaleRange(float(kw.min_percentile), float(kw.max_percentile),
                                        per_channel=_per_channel_axes(kw), eps=float(kw.eps)))
        elif kind == "clip":
            steps.append(pre.Clip(kw.min, kw.max))
        else:
            raise InputError(f"{source}: preprocessing '{kind}' is not one overtile applies "
                             f"(it does scale_linear, zero_mean_unit_variance, scale_range, clip)")
    return pre.Preprocessing(tuple(steps), scale_integers)


def _per_channel_axes(kwargs: Any) -> bool:
    """Statistics per channel: the reduced axes leave the channel axis out (default: all axes)."""
    axes = getattr(kwargs, "axes", None)
    return axes is not None and "channel" not in [str(a) for a in axes]


def _activation(tensor: Any, source: str) -> str:
    kinds = [step.id for step in tensor.postprocessing if step.id != "ensure_dtype"]
    if not kinds:
        return "none"
    if kinds in (["softmax"], ["sigmoid"]):
        return kinds[0]
    raise InputError(f"{source}: postprocessing {kinds}; overtile applies softmax or sigmoid, or none")


def read_package(path: str) -> Package:
    """Read a package's description (offline: no downloads, no hash checks of remote files)."""
    from bioimageio.spec import InvalidDescr, load_description

    target = Path(path)
    if target.is_dir():
        name = rdf_name([p.name for p in target.iterdir()])
        source = target / name if name else target
    else:
        source = target
    try:
        descr = load_description(source, perform_io_checks=False, format_version="latest")
    except Exception as exc:  # noqa: BLE001 - the spec library raises many kinds for a broken package
        raise InputError(f"{path}: not a readable bioimage.io model package ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    if isinstance(descr, InvalidDescr):
        errors = descr.validation_summary.errors
        first = f" ({'.'.join(map(str, errors[0].loc))}: {errors[0].msg})" if errors else ""
        raise InputError(f"{path}: not a valid bioimage.io model description{first}")
    if getattr(descr, "type", None) != "model":
        raise InputError(f"{path}: a bioimage.io {getattr(descr, 'type', 'resource')}, not a model")
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise InputError(f"{path}: {len(descr.inputs)} input and {len(descr.outputs)} output tensors; overtile runs models with one of each")
    inp, out = descr.inputs[0], descr.outputs[0]
    input_axes, output_axes = _axes(inp, path, "input"), _axes(out, path, "output")
    if "".join(a for a in input_axes if a in "zyx") != "".join(a for a in output_axes if a in "zyx"):
        raise InputError(f"{path}: input axes '{input_axes}' and output axes '{output_axes}' have different space axes")
    channels = [a for a in inp.axes if a.type == "channel"]
    classes = [a for a in out.axes if a.type == "channel"]
    margin, halo = _output_crop(out, inp, path)
    config = (descr.config.model_dump() if hasattr(descr.config, "model_dump") else dict(descr.config)) or {}
    ours = config.get("overtile") or {}
    weights: dict[str, str] = {}
    unet = None
    for fmt in ("pytorch_state_dict", "torchscript", "onnx"):
        entry = getattr(descr.weights, fmt, None)
        if entry is None:
            continue
        src = entry.source
        if not hasattr(src, "path") or "://" in str(src):
            continue  # remote weights: no network at run time
        if fmt == "pytorch_state_dict":
            arch = entry.architecture
            if (getattr(arch, "import_from", None), str(getattr(arch, "callable", ""))) != OWN_ARCHITECTURE:
                continue  # another library's code: overtile imports none
            unet = dict(arch.kwargs)
        weights[fmt] = str(src.path)
    if not weights:
        have = [f for f in ("pytorch_state_dict", "torchscript", "onnx", "keras_hdf5", "tensorflow_saved_model_bundle")
                if getattr(descr.weights, f, None) is not None]
        raise InputError(f"{path}: no weights overtile can run (the package has {', '.join(have) or 'none'}; overtile "
                         f"runs torchscript, onnx, and state dicts of its own U-Net, all inside the package)")
    return Package(
        root=package_root(path),
        name=str(descr.name),
        input_axes=input_axes,
        output_axes=output_axes,
        in_channels=len(channels[0].channel_names) if channels else 1,
        num_classes=len(classes[0].channel_names) if classes else 1,
        declared=_declared_sizes(inp, path),
        margin=margin,
        halo=halo,
        preprocessing=_preprocessing(inp, bool(ours.get("scale_integers", False)), path),
        activation=_activation(out, path),
        weights=weights,
        unet=unet,
    )
