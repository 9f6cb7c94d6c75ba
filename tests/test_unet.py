import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.numerics.unet import Normalization, UNet, load_model, num_parameters, read_checkpoint, save_model


def test_paper_geometry_572_to_388():
    net = UNet()  # the paper's net: depth 5, 64 base channels, valid convolutions
    assert net.margin == 92
    assert net.output_size(572) == 388
    assert net.min_input_size(388) == 572
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 19  # + 4 up-convs = 23 layers
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules()) == 4
    assert net.outc.conv.out_channels == 2 and net.downs[-1].conv.block[-2].out_channels == 1024


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_size_arithmetic_agrees_with_the_network(depth):
    net = UNet(depth=depth, base_channels=1).eval()
    for size in range(1, 240):
        if net.is_valid_input(size):
            with torch.no_grad():
                out = net(torch.zeros(1, 1, size, size))
            assert out.shape[-1] == net.output_size(size), size
        else:
            with pytest.raises(ValueError):
                net.output_size(size)
    for want in (1, 5, 37, 100):
        size = net.min_input_size(want)
        assert net.is_valid_input(size) and net.output_size(size) >= want
        assert not any(net.is_valid_input(s) and s - 2 * net.margin >= want for s in range(1, size))
    assert net.max_input_size(239) <= 239 and net.is_valid_input(net.max_input_size(239))


def test_3d_valid_and_same_shapes():
    net = UNet(dims=3, depth=3, base_channels=2, num_classes=3).eval()
    x = torch.zeros(1, 1, 44, 60, 52)
    assert net(x).shape == (1, 3, 4, 20, 12)
    same = UNet(dims=3, depth=3, base_channels=2, padding="same").eval()
    assert same(torch.zeros(1, 1, 16, 24, 8)).shape == (1, 2, 16, 24, 8)


def test_same_padding_keeps_size():
    net = UNet(depth=4, base_channels=2, padding="same", batch_norm=True, dropout=0.5).eval()
    assert net(torch.zeros(2, 1, 64, 40)).shape == (2, 2, 64, 40)
    assert net.margin == 0 and net.min_input_size(33) == 40


def test_he_initialisation():
    torch.manual_seed(0)
    net = UNet(base_channels=32, depth=3)
    w = net.downs[1].conv.block[0].weight  # 64 -> 128 channels, 3x3
    fan_in = w.shape[1] * 9
    assert w.std().item() == pytest.approx(np.sqrt(2 / fan_in), rel=0.05)
    assert all((m.bias == 0).all() for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_checkpoint_round_trip(tmp_path):
    net = UNet(in_channels=3, num_classes=4, depth=3, base_channels=4, padding="same", batch_norm=True)
    net.normalization = Normalization(mean=0.5, std=0.25)
    save_model(net, tmp_path / "m.pt")
    # the file is plain tensors and types: loadable with weights_only=True
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["config"]["in_channels"] == 3
    back = load_model(tmp_path / "m.pt")
    assert back.config == net.config and back.normalization == net.normalization
    assert not back.training
    x = torch.rand(1, 3, 32, 32)
    net.eval()
    assert torch.equal(back(x), net(x))
    assert num_parameters(back) == num_parameters(net)


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="junk.pt: not an overtile checkpoint"):
        load_model(tmp_path / "junk.pt")
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an overtile U-Net checkpoint"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(InputError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")
    save_model(UNet(depth=2, base_channels=2), tmp_path / "ok.pt")
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["config"]["base_channels"] = 3  # weights no longer fit
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="bad.pt: incompatible checkpoint"):
        load_model(tmp_path / "bad.pt")


def test_default_normalisation_scales_integers_by_dtype_max_and_passes_floats():
    norm = Normalization()
    assert norm(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert norm(np.array([65535], np.uint16)).tolist() == [1.0]
    assert norm(np.array([3.5], np.float64)).tolist() == [3.5]
    assert norm(np.array([3], np.uint8)).dtype == np.float32
