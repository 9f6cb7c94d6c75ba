"""Every kind of model overtile runs, behind one interface: detect, describe, load.

Kinds, told apart by the file's content, never by its name or by trust:

- an **overtile checkpoint** (a ``torch.save`` zip with ``data.pkl``): config, normalisation
  and state dict, read with ``weights_only=True``; geometry from the U-Net's arithmetic;
- a **TorchScript** file (a zip with ``constants.pkl``), loaded with ``torch.jit.load``;
- an **ONNX** file (a protobuf), run by onnxruntime;
- a **bioimage.io package** (a zip or folder with ``rdf.yaml``), read with bioimageio.spec:
  its TorchScript or ONNX weights, or a state dict of overtile's own U-Net.

Nothing is unpickled from a foreign file. TorchScript and ONNX models get their geometry from
:func:`pipeline.models.probe.probe` (and a package's declared sizes and crop are checked
against it); a model is tiled exactly when the probe finds it translation equivariant on
a grid, and blended otherwise. :func:`describe` does that once, where a run is planned;
the :class:`ModelInfo` it returns is small and travels with the job, and :func:`load` builds
the runnable :class:`Model` from it on each worker, without probing again.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.models import bioimageio
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.probe import Declared, Probe, probe
from pipeline.numerics.tiling import TileGeometry
from pipeline.numerics.unet import Normalization, UNet, model_from_config, model_from_payload, read_checkpoint

Kind = Literal["overtile", "torchscript", "onnx", "bioimageio"]
KIND_NAMES = {"overtile": "overtile checkpoint", "torchscript": "TorchScript model", "onnx": "ONNX model",
              "bioimageio": "bioimage.io package"}
# The weights a package's model runs from, first found first: our own U-Net's state dict
# (channels_last and torch.compile apply), then TorchScript, then ONNX. bench/models.py, 2 CPU
# cores, 16-base U-Net, 1212² tiles, one thread per task slot: torch channels_last 1.10× of
# onnxruntime per tile, 1.09× end to end (TorchScript in between).
WEIGHTS_ORDER = ("pytorch_state_dict", "torchscript", "onnx")


def detect(path: str | os.PathLike) -> Kind:
    """The kind of model at ``path``, from what the file or folder holds."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such model file or folder")
    if p.is_dir():
        if bioimageio.rdf_name([c.name for c in p.iterdir()]):
            return "bioimageio"
        raise InputError(f"{path}: a folder without rdf.yaml: not a bioimage.io model package")
    if p.name in bioimageio.RDF_NAMES or p.name.endswith(".bioimageio.yaml"):
        return "bioimageio"
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{path}: a broken zip file ({exc})") from None
        if bioimageio.rdf_name(names):
            return "bioimageio"
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "overtile"
        raise InputError(f"{path}: a zip file that is no model overtile knows "
                         f"(overtile checkpoint, TorchScript, bioimage.io package)")
    with open(p, "rb") as f:
        head = f.read(1)
    if head == b"\x08":  # a protobuf whose first field is ModelProto.ir_version
        return "onnx"
    return "overtile"  # an old-style torch.save file, or junk: read_checkpoint says which


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know of a model, measured once where the run is planned.

    ``weights``: the form that runs (``overtile``, ``pytorch_state_dict``, ``torchscript``,
    ``onnx``), ``member`` its file inside a package. ``axes``: the model's input and output
    axes (``bcyx`` for ours). ``halo``: what is cropped from each side of the model's output
    (a package's declared halo). ``activation``: how the outputs become probabilities
    (``softmax`` of logits, ``sigmoid``, or ``none``: they already are); ``probabilities``:
    the probe found a bare file's outputs already are (its graph ends in a sigmoid or softmax).
    ``tiling``: exact or blended, and why.
    """

    path: str
    kind: Kind
    weights: str
    dims: int
    in_channels: int
    num_classes: int
    geometry: TileGeometry
    normalization: Normalization | Preprocessing
    activation: str
    tiling: str
    member: str = ""
    axes: tuple[str, str] = ("", "")
    halo: int = 0
    unet: tuple[tuple[str, Any], ...] = ()  # our U-Net's config, for state-dict weights
    probabilities: bool = False

    @property
    def exact(self) -> bool:
        return not self.geometry.blend

    @property
    def compilable(self) -> bool:
        """torch.compile applies to plain torch modules (our U-Net), not TorchScript or ONNX."""
        return self.weights in ("overtile", "pytorch_state_dict")

    def with_statistics(self, sample: np.ndarray) -> ModelInfo:
        """This model with its preprocessing's statistics taken from ``sample`` (the image)."""
        if isinstance(self.normalization, Preprocessing) and self.normalization.needs_statistics:
            return replace(self, normalization=self.normalization.fixed(sample))
        return self

    @property
    def needs_statistics(self) -> bool:
        return isinstance(self.normalization, Preprocessing) and self.normalization.needs_statistics

    def summary(self) -> str:
        """One line: kind, dimensions, channels, crop and step."""
        g = self.geometry
        weights = f" ({self.weights} weights)" if self.kind == "bioimageio" else ""
        sizes = f"fixed input size {g.input_size} px" if g.fixed else \
            f"tile sizes {g.min_input_size(g.factor + g.remainder)} + k·{g.factor} px"  # as the tiler takes them
        activation = self.activation
        if self.probabilities and activation == "none":
            activation = "none: its outputs already are probabilities"
        return (f"{KIND_NAMES[self.kind]}{weights}, {self.dims}-D, {self.in_channels} → {self.num_classes} channels "
                f"({activation}), margin {g.margin} px, {sizes}")


def logit_activation(num_classes: int) -> str:
    """What makes a bare file's logits probabilities: softmax over several channels, sigmoid of one."""
    return "softmax" if num_classes > 1 else "sigmoid"


class OnnxNet(nn.Module):
    """An ONNX model run by onnxruntime, called like a torch module on ``(N, C, ...)`` tensors.

    A model exported with a fixed batch of 1 is run tile by tile. ``threads``: onnxruntime's
    intra-op threads (1 on a worker: parallelism comes from Dask's task slots, as for torch).
    """

    def __init__(self, data: bytes, source: str, threads: int | None = None, device: str = "cpu"):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # the probe's failed sizes are expected: no log lines for them
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            # the GPU torch's "cuda" means in this process (a worker's, set by inference.cached_model)
            gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu}))
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise InputError(f"{source}: not a readable ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise InputError(f"{source}: an ONNX model with {len(inputs)} inputs; overtile runs models with one input")
        if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
            raise InputError(f"{source}: ONNX input of type {inputs[0].type}; overtile feeds float32 images")
        if outputs[0].type not in ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"):
            raise InputError(f"{source}: ONNX output of type {outputs[0].type}; overtile needs floating-point "
                             f"logits or probabilities")
        self.input_name = inputs[0].name
        self.input_shape = inputs[0].shape
        self.half = inputs[0].type == "tensor(float16)"
        self.one_at_a_time = self.input_shape[:1] == [1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy()
        array = array.astype(np.float16 if self.half else np.float32, copy=False)
        batches = [array[i : i + 1] for i in range(len(array))] if self.one_at_a_time else [array]
        outs = [self.session.run(None, {self.input_name: b})[0] for b in batches]
        y = np.concatenate(outs) if len(outs) > 1 else outs[0]
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(x.device)


class Model(nn.Module):
    """Any model as the tiles see it: ``(N, C, *spatial)`` in, ``(N, K, *spatial)`` out, with
    its :class:`ModelInfo` (``geometry``, ``normalization``). Puts a package's axes in its
    order and back, and crops its declared halo."""

    def __init__(self, net: nn.Module, info: ModelInfo):
        super().__init__()
        self.net = net
        self.info = info
        self.ours = "bc" + "zyx"[-info.dims:]

    @property
    def geometry(self) -> TileGeometry:
        return self.info.geometry

    @property
    def normalization(self) -> Normalization | Preprocessing:
        return self.info.normalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, out = self.info.axes
        if inp and "b" not in inp and len(x) > 1:  # a model without a batch axis: one tile at a time
            return torch.cat([self(x[i : i + 1]) for i in range(len(x))])
        y = self.net(_to_axes(x, self.ours, inp) if inp else x)
        if out:
            y = _to_axes(y, out, self.ours)
        h = self.info.halo
        if h:
            y = y[(slice(None), slice(None), *(slice(h, -h),) * self.info.dims)]
        return y


def _to_axes(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """``x`` with axes ``src`` (letters b, c, z, y, x) as axes ``dst``: a batch or channel axis
    that ``dst`` lacks is dropped (it has length 1), one that ``src`` lacks is added."""
    for a in "bc":
        if a in src and a not in dst:
            x, src = x.squeeze(src.index(a)), src.replace(a, "")
        elif a in dst and a not in src:
            x, src = x.unsqueeze(0), a + src
    order = [src.index(a) for a in dst]
    return x if order == sorted(order) else x.permute(*order)


# --- reading each kind ------------------------------------------------------------------------


def _torchscript(data: bytes, source: str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript; the model zoo still ships it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a corrupt archive
        raise InputError(f"{source}: not a readable TorchScript model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None


def _state_dict_unet(data: bytes, config: dict[str, Any], source: str) -> UNet:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        net = model_from_config(config)
        net.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a corrupt or mismatched state dict
        raise InputError(f"{source}: state dict does not fit its U-Net ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    return net.eval()


def _first_weight(net: nn.Module) -> torch.Tensor | None:
    """The first convolution's weight ``(out, in, *kernel)``: the dimensions and input channels
    of a TorchScript model, which declares neither."""
    return next((p for p in net.parameters() if p.ndim in (4, 5)), None)


def _forward(model: Model) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y = model(torch.from_numpy(x))
        if not y.is_floating_point():  # labels, say: stitching, activation and encoding need scores
            raise InputError(f"{model.info.path}: output of type {y.dtype}; overtile needs floating-point logits "
                             f"or probabilities")
        return y.float().numpy()

    return run


def _unet_reason(net: UNet) -> str:
    g = net.geometry
    if g.blend:
        return "blended: same padding (zero-padded tile borders are not translation equivariant)"
    return f"exact: a valid U-Net, output = input − {2 * g.margin} px, tiles on its {g.factor}-px grid"


def _check_declared(package: bioimageio.Package, geometry: TileGeometry, source: str, sizes: bool = False) -> None:
    """A package's declared crop (and, with ``sizes``, its input sizes) against what the model
    does. (The probe has run a foreign model at the declared sizes already.)"""
    margin = geometry.margin - package.halo
    if margin != package.margin:
        raise InputError(f"{source}: declares output = input − {2 * package.margin} px, but the model's output is "
                         f"input − {2 * margin} px")
    d = package.declared
    for n in (d.min, d.min + d.step) if sizes else ():
        if not geometry.is_valid_input(n):
            raise InputError(f"{source}: declares {d}, but its U-Net takes "
                             f"{geometry.min_input_size(1)} + k·{geometry.factor} px")
    if package.halo and 2 * package.halo >= d.min - 2 * package.margin:
        raise InputError(f"{source}: declares a halo of {package.halo} px, as large as its smallest output")


def describe(path: str | os.PathLike, weights: str | None = None, dims: int = 2, channels: int = 1) -> tuple[ModelInfo, Model]:
    """Detect the kind, read the model, measure its geometry: the model's :class:`ModelInfo`
    and the model itself, on the CPU.

    ``weights``: for a package, the weights to run (default the first of
    :data:`WEIGHTS_ORDER` it has). ``dims`` and ``channels``: what to probe a TorchScript or
    ONNX model with where the file leaves them open (the image's, when a run is planned).
    """
    path = str(path)
    kind = detect(path)
    if kind == "overtile":
        net = model_from_payload(read_checkpoint(path), path).eval()
        c = net.config
        info = ModelInfo(path, kind, "overtile", c.dims, c.in_channels, c.num_classes, net.geometry,
                         net.normalization, "softmax", _unet_reason(net), unet=tuple(sorted(_config(net).items())))
        return info, Model(net, info)
    if kind == "bioimageio":
        return _describe_package(path, weights)
    data = Path(path).read_bytes()
    declared = None
    if kind == "torchscript":
        net = _torchscript(data, path)
        weight = _first_weight(net)
        if weight is not None:
            dims, channels = weight.ndim - 2, int(weight.shape[1])
    else:
        net = OnnxNet(data, path)
        shape = net.input_shape
        if len(shape) in (4, 5):
            dims = len(shape) - 2
            if isinstance(shape[1], int):
                channels = shape[1]
        declared = _static_size(shape[2:], path)
    base = ModelInfo(path, kind, kind, dims, channels, 0, TileGeometry(0, 1, 0, 1), Normalization(), "softmax", "")
    found = probe(_forward(Model(net, base)), dims, channels, path, declared=declared)
    info = replace(base, num_classes=found.num_classes, geometry=found.geometry, tiling=found.reason(),
                   activation="none" if found.probabilities else logit_activation(found.num_classes),
                   probabilities=found.probabilities)
    return info, Model(net, info)


def _static_size(spatial: list[Any], source: str) -> Declared | None:
    """The one input size of an ONNX model exported with static spatial axes (``None``: the
    axes are dynamic, the probe scans for the sizes it takes)."""
    if not spatial or not all(isinstance(n, int) and n > 0 for n in spatial):
        return None
    if len(set(spatial)) > 1:
        raise InputError(f"{source}: an ONNX model with a fixed input size {'×'.join(map(str, spatial))} px; overtile "
                         f"tiles alike on every axis, so it needs one size on all (or export it with dynamic axes)")
    return Declared(spatial[0], 0)


def _config(net: UNet) -> dict[str, Any]:
    return asdict(net.config)


def _describe_package(path: str, weights: str | None) -> tuple[ModelInfo, Model]:
    package = bioimageio.read_package(path)
    order = [weights] if weights else [w for w in WEIGHTS_ORDER if w in package.weights]
    if weights and weights not in package.weights:
        raise InputError(f"{path}: no {weights} weights overtile can run in this package (it has: "
                         f"{', '.join(package.weights)})")
    fmt = order[0]
    member = package.weights[fmt]
    data = package.read(member)
    base = ModelInfo(path, "bioimageio", fmt, package.dims, package.in_channels, package.num_classes,
                     TileGeometry(0, 1, 0, 1), package.preprocessing, package.activation, "", member=member,
                     axes=(package.input_axes, package.output_axes), halo=package.halo)
    if fmt == "pytorch_state_dict":
        unet = _state_dict_unet(data, package.unet or {}, path)
        g = unet.geometry
        h = package.halo  # cropped from the output: the same grid, a smaller output
        smallest = g.smallest - 2 * h
        smallest += -(-max(0, 1 - smallest) // g.factor) * g.factor
        geometry = replace(g, margin=g.margin + h, remainder=(g.remainder - 2 * h) % g.factor, smallest=smallest)
        info = replace(base, geometry=geometry, tiling=_unet_reason(unet), unet=tuple(sorted(_config(unet).items())))
        if package.halo:  # a crop beyond the U-Net's own margin keeps the same arithmetic
            info = replace(info, tiling=info.tiling + f"; its declared halo of {package.halo} px cropped too")
        _check_declared(package, geometry, path, sizes=True)
        _check_classes(unet.config.num_classes, package, path)
        return info, Model(unet, info)
    net = _torchscript(data, path) if fmt == "torchscript" else OnnxNet(data, path)
    model = Model(net, base)
    found: Probe = probe(_forward(model), package.dims, package.in_channels, path, declared=package.declared)
    _check_declared(package, found.geometry, path)
    _check_classes(found.num_classes, package, path)
    info = replace(base, geometry=found.geometry, tiling=found.reason())
    return info, Model(net, info)


def _check_classes(found: int, package: bioimageio.Package, source: str) -> None:
    if found != package.num_classes:
        raise InputError(f"{source}: declares {package.num_classes} output channel(s), but the model gives {found}")


def load(info: ModelInfo, device: str = "cpu", channels_last: bool = False, threads: int | None = None) -> Model:
    """The runnable model of ``info`` on ``device``, in eval mode: what each worker builds once."""
    source = info.path
    if info.weights == "overtile":
        net: nn.Module = model_from_payload(read_checkpoint(source), source)
    else:
        data = bioimageio.read_member(source, info.member) if info.kind == "bioimageio" else Path(source).read_bytes()
        if info.weights == "pytorch_state_dict":
            net = _state_dict_unet(data, dict(info.unet), source)
        elif info.weights == "torchscript":
            net = _torchscript(data, source)
        else:
            return Model(OnnxNet(data, source, threads, device), info).eval()
    net = net.eval().to(device)
    if channels_last and info.weights != "onnx":
        fmt = torch.channels_last if info.dims == 2 else torch.channels_last_3d
        net = net.to(memory_format=fmt)
    return Model(net, info).eval()


def _is_rdf(p: Path) -> bool:
    """Whether ``p`` is a package's description file (which stands for the package)."""
    return p.is_file() and (p.name in bioimageio.RDF_NAMES or p.name.endswith(".bioimageio.yaml"))


def _model_files(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """A model's files and the folder their names are relative to: the file; a package
    folder's files; or, for a package given as its rdf.yaml, that file and the files beside it
    that it names (its weights, test tensors, ...), not whatever else shares its folder (the
    run's own output, say, which would change the digest as it is written)."""
    p = Path(path)
    if _is_rdf(p):
        root = Path(bioimageio.package_root(str(p)))
        try:
            words = set(re.findall(r"[\w.\-/]+", p.read_text(errors="replace")))  # file names among them
        except OSError:
            words = set()
        inside = root.resolve()
        named = {(root / w).resolve() for w in words
                 if len(w) < 512 and not w.startswith("/") and (root / w).is_file()
                 and (root / w).resolve().is_relative_to(inside)}  # the package's own files only
        return root, sorted({p.resolve(), *named})
    if p.is_dir():
        return p, sorted(q for q in p.rglob("*") if q.is_file())
    return p.parent, [p] if p.exists() else []


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a model file, or of a package folder (its files' names and contents; a
    package's rdf.yaml stands for its folder): what a run's fingerprint holds, so that a
    changed model, its weights included, reruns every block."""
    if not Path(path).exists():
        raise InputError(f"{path}: no such model file or folder")
    if Path(path).is_file() and not _is_rdf(Path(path)):
        return _file_digest(Path(path))
    root, files = _model_files(path)
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, root).encode() + b"\0" + _file_digest(f).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp(path: str | os.PathLike) -> tuple[Any, ...]:
    """Modification times and sizes of a model's files (a package's, given its rdf.yaml): a
    cache key that changes with them."""
    files = _model_files(path)[1]
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
