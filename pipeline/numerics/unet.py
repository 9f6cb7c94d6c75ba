"""The U-Net of Ronneberger et al. (2015), in 2D and 3D, with its size arithmetic.

The network reads like the paper's Figure 1: a contracting path of :class:`DoubleConv` and
:class:`Down` steps, an expanding path of :class:`Up` steps that concatenate the centre-cropped
feature map of the same level, and a 1×1 :class:`OutConv` to the classes.

With ``padding="valid"`` (the paper's) every 3×3 convolution shrinks its input, so the
output is smaller than the input by ``2 * margin`` per axis (572 → 388, margin 92, at depth 5);
this is what makes overlap-tile inference exact. With ``padding="same"`` sizes are kept and
tiles are blended instead.

A checkpoint is one file holding the model's config, its intensity normalisation and its
state dict; it is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.numerics.tiling import TileGeometry

CHECKPOINT_FORMAT = "overtile-unet"
CHECKPOINT_VERSION = 1


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d
    if dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d
    raise ValueError(f"dims must be 2 or 3, got {dims}")


class DoubleConv(nn.Module):
    """[3×3 conv → (BatchNorm) → ReLU] × 2; unpadded when ``padding="valid"``."""

    def __init__(self, dims: int, cin: int, cout: int, padding: str, batch_norm: bool):
        super().__init__()
        conv, _, _, norm = _layers(dims)
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(conv(c, cout, 3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(norm(cout))
            layers.append(nn.ReLU(inplace=True))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2×2 max-pool with stride 2, then a double conv that doubles the channels."""

    def __init__(self, dims: int, cin: int, cout: int, padding: str, batch_norm: bool):
        super().__init__()
        _, _, pool, _ = _layers(dims)
        self.pool = pool(2)
        self.conv = DoubleConv(dims, cin, cout, padding, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


def center_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (N, C, ...) to ``shape``, centred (the paper's skip crop)."""
    index = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], shape):
        start = (have - want) // 2
        index.append(slice(start, start + want))
    return x[tuple(index)]


class Up(nn.Module):
    """2×2 up-convolution halving the channels, concatenation with the cropped skip, double conv."""

    def __init__(self, dims: int, cin: int, cout: int, padding: str, batch_norm: bool):
        super().__init__()
        _, upconv, _, _ = _layers(dims)
        self.up = upconv(cin, cout, 2, stride=2)
        self.conv = DoubleConv(dims, 2 * cout, cout, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([center_crop(skip, tuple(x.shape[2:])), x], dim=1))


class OutConv(nn.Module):
    """1×1 convolution to the class scores."""

    def __init__(self, dims: int, cin: int, classes: int):
        super().__init__()
        conv, _, _, _ = _layers(dims)
        self.conv = conv(cin, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation, stored with the model and applied identically everywhere.

    Integer input is first divided by its dtype's maximum (``scale_integers``), float input
    passes unchanged; then ``(x - mean) / std``. Never computed from a tile or block: that
    would make seams.
    """

    mean: float = 0.0
    std: float = 1.0
    scale_integers: bool = True

    def __call__(self, array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Return ``array`` as float32, normalised. A torch tensor is normalised where it lies
        (a block on the GPU), by the same float32 operations: bit for bit the same numbers."""
        tensor = isinstance(array, torch.Tensor)
        out = array.to(torch.float32, copy=True) if tensor else array.astype(np.float32, copy=True)

        def f32(value: float) -> Any:  # the float32 value; for torch as a Python float that holds it exactly
            return float(np.float32(value)) if tensor else np.float32(value)

        integer = not array.dtype.is_floating_point if tensor else np.issubdtype(array.dtype, np.integer)
        if self.scale_integers and integer:
            out *= f32(1.0 / (torch.iinfo(array.dtype) if tensor else np.iinfo(array.dtype)).max)
        if self.mean != 0.0:
            out -= f32(self.mean)
        if self.std != 1.0:
            out *= f32(1.0 / self.std)
        return out


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    num_classes: int = 2
    dims: int = 2
    depth: int = 5
    base_channels: int = 64
    padding: Literal["valid", "same"] = "valid"
    batch_norm: bool = False
    dropout: float = 0.0


class UNet(nn.Module):
    """The U-Net, 2D or 3D, valid (the paper's) or same padding.

    Parameters
    ----------
    in_channels, num_classes : int
        Image channels in, class scores out (logits; softmax is applied by the caller).
    dims : {2, 3}
    depth : int
        Number of resolution levels; the paper's net has 5 (4 poolings).
    base_channels : int
        Channels at the first level, doubled at each level down (64 in the paper).
    padding : {"valid", "same"}
    batch_norm : bool
        Conv → BatchNorm → ReLU, a common variant; off in the paper.
    dropout : float
        Dropout at the end of the contracting path, as in the paper.

    Examples
    --------
    >>> net = UNet(base_channels=8)
    >>> net.margin, net.output_size(572), net.min_input_size(388)
    (92, 388, 572)
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        dims: int = 2,
        depth: int = 5,
        base_channels: int = 64,
        padding: Literal["valid", "same"] = "valid",
        batch_norm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.config = UNetConfig(
            in_channels, num_classes, dims, depth, base_channels, padding, batch_norm, dropout
        )
        self.normalization = Normalization()
        widths = [base_channels * 2**level for level in range(depth)]
        self.inc = DoubleConv(dims, in_channels, widths[0], padding, batch_norm)
        self.downs = nn.ModuleList(
            Down(dims, a, b, padding, batch_norm) for a, b in zip(widths, widths[1:])
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(
            Up(dims, a, b, padding, batch_norm) for a, b in zip(widths[::-1], widths[-2::-1])
        )
        self.outc = OutConv(dims, widths[0], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation, N(0, sqrt(2/N)) with N the incoming nodes, as in the paper."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # for a transposed conv the incoming nodes of an output pixel are
                # in_channels * kernel (weight layout is (in, out, *k): fan_out in torch's terms)
                mode = "fan_out" if isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) else "fan_in"
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)

    # --- size arithmetic -------------------------------------------------------------
    @property
    def dims(self) -> int:
        return self.config.dims

    @property
    def factor(self) -> int:
        """Total down-sampling, 2^(depth-1): tiles must start on this grid to be exact."""
        return 2 ** (self.config.depth - 1)

    @property
    def margin(self) -> int:
        """Context lost per side by a valid net (92 at depth 5); 0 for same padding.

        Each 3×3 conv loses one pixel per side at its level's resolution, i.e. 2^level
        pixels of the input; two convs per level, down and up again plus the bottom level:
        2·2·(f−1) + 2·f = 6f − 4 with f the factor.
        """
        return 0 if self.config.padding == "same" else 6 * self.factor - 4

    @property
    def output_remainder(self) -> int:
        """Valid output sizes are ≡ this modulo the factor (4 for the paper's net)."""
        return 0 if self.config.padding == "same" else (-4 * (self.factor - 1)) % self.factor

    @property
    def geometry(self) -> TileGeometry:
        """The size arithmetic tiling uses: valid nets are tiled exactly on the factor grid,
        same-padding nets (not equivariant at their zero-padded borders) are blended."""
        r, f = self.output_remainder, self.factor
        return TileGeometry(self.margin, f, r, r if r > 0 else f, blend=self.config.padding == "same")

    def is_valid_input(self, size: int) -> bool:
        return self.geometry.is_valid_input(size)

    def output_size(self, size: int) -> int:
        """Output size along one axis for an input of ``size``; raises if not valid."""
        return self.geometry.output_size(size)

    def min_input_size(self, output: int) -> int:
        """Smallest valid input whose output is at least ``output`` pixels."""
        return self.geometry.min_input_size(output)

    def max_input_size(self, limit: int) -> int:
        """Largest valid input size not above ``limit``; raises if there is none."""
        return self.geometry.max_input_size(limit)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_from_config(config: dict[str, Any]) -> UNet:
    return UNet(**config)


def checkpoint_payload(model: UNet) -> dict[str, Any]:
    """The dict stored in a checkpoint: plain types and tensors only (``weights_only`` safe)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(model.config),
        "normalization": asdict(model.normalization),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_model(model: UNet, path: str | os.PathLike) -> None:
    """Write ``model`` (config, normalisation, weights) to one checkpoint file."""
    atomic_save(checkpoint_payload(model), path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's dict safely; any failure is an :class:`InputError` naming the file."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:  # torch.save writes a zip archive, and torch.load does not check its members' CRCs
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # begins as one: cut short or damaged
                raise InputError(f"{path}: not a readable checkpoint (a truncated or damaged archive)") from None
        raise InputError(f"{path}: not an overtile checkpoint (not a torch.save archive)") from None
    except OSError as exc:
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if damaged is not None:
        raise InputError(f"{path}: a damaged checkpoint ({damaged} fails its checksum: a broken copy or download)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise InputError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an overtile U-Net checkpoint")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: checkpoint version {payload['version']} is newer than this overtile "
            f"understands ({CHECKPOINT_VERSION})"
        )
    return payload


def model_from_payload(payload: dict[str, Any], source: str | os.PathLike = "checkpoint") -> UNet:
    try:
        model = model_from_config(payload["config"])
        model.normalization = Normalization(**payload.get("normalization", {}))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{source}: incompatible checkpoint ({str(exc).splitlines()[0]})") from None
    bad = next((name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad is not None:  # a diverged training run, or damage: every prediction would be NaN
        raise InputError(f"{source}: NaN or Inf weights ({bad})")
    return model


def load_model(path: str | os.PathLike) -> UNet:
    """Read a checkpoint written by :func:`save_model`; the model is returned in eval mode."""
    return model_from_payload(read_checkpoint(path), path).eval()


__all__ = [
    "UNet",
    "UNetConfig",
    "Normalization",
    "save_model",
    "load_model",
    "read_checkpoint",
    "model_from_payload",
    "num_parameters",
    "atomic_save",
]
