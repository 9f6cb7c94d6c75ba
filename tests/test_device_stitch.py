"""A block kept on the model's device from upload to stored form (the GPU path's post-processing),
run here on CPU tensors: it must store what the host path stores."""

import dataclasses

import numpy as np
import pytest
import torch
import zarr

from pipeline.jobs.inference import on_device, run_tiles
from pipeline.jobs.predict import PredictSettings, encode_output, plan_prediction, predict
from pipeline.numerics.geometry import Box
from pipeline.numerics.tiling import plan_tiles, predict_region
from pipeline.numerics.tta import predict_region_tta, read_box, transforms
from pipeline.numerics.unet import UNet

from conftest import cells

ENCODINGS = [("probabilities", "float32"), ("probabilities", "float16"), ("probabilities", "uint8"), ("labels", "uint8")]


def net(**kwargs) -> UNet:
    torch.manual_seed(3)
    return UNet(**{"base_channels": 4, **kwargs}).eval()


def assert_same_encoding(device: np.ndarray, host: np.ndarray, kind: str, dtype: str) -> None:
    assert device.dtype == host.dtype and device.shape == host.shape
    if kind == "labels":
        assert np.array_equal(device, host)
    elif dtype == "uint8":  # round(255·p) may fall the other side of a half
        difference = np.abs(device.astype(int) - host.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    else:
        np.testing.assert_allclose(device.astype(np.float32), host.astype(np.float32), rtol=0,
                                   atol=1e-6 if dtype == "float32" else 1e-3)


@pytest.mark.parametrize("kind,dtype", ENCODINGS)
@pytest.mark.parametrize("classes,activation", [(2, "softmax"), (4, "softmax"), (1, "sigmoid"), (3, "none")])
def test_encode_output_of_a_tensor_is_that_of_an_array(kind, dtype, classes, activation):
    rng = np.random.default_rng(classes)
    logits = rng.standard_normal((classes, 61, 47)).astype(np.float32) * 4
    if activation == "none":
        logits = np.abs(logits) / np.abs(logits).sum(axis=0)
    logits[:, :5] = logits[:1, :5]  # ties between all classes: the first wins on both paths
    host = encode_output(logits, kind, dtype, activation)
    device = encode_output(torch.from_numpy(logits), kind, dtype, activation).numpy()
    assert_same_encoding(device, host, kind, dtype)
    if kind == "labels" and activation == "sigmoid":  # p > 0.5 as the logit's sign: no rounding of exp
        assert np.array_equal(host[0], logits[0] > 0)


def test_encode_output_of_a_tensor_refuses_labels_beyond_uint8():
    with pytest.raises(ValueError, match="257 classes"):
        encode_output(torch.zeros(257, 2, 2), "labels", "uint8")


@pytest.mark.parametrize("model,tile,batch", [(net(), 236, 1), (net(), 300, 3), (net(depth=4, padding="same", num_classes=3), 96, 2),
                                               (net(dims=3, depth=3, base_channels=2), 52, 2)],
                         ids=["exact", "exact-batched", "blended", "3d"])
@pytest.mark.parametrize("kind,dtype", ENCODINGS)
def test_a_block_on_the_device_stores_what_the_host_path_stores(model, tile, batch, kind, dtype):
    """Cut, run, stitch (placed or blended) and encode as tensors; against the host path's
    numpy stitching and encoding of the same block."""
    block = Box.from_bounds((40, 24), (260, 230)) if model.config.dims == 2 else Box.from_bounds((8, 4, 12), (40, 50, 47))
    plan = plan_tiles(model, block, tile)
    image = cells(tuple(plan.read.shape), dtype=np.float32)[None]
    host = encode_output(predict_region(model, plan, image, batch, runner=run_tiles), kind, dtype)
    device = on_device(model, image, lambda x: encode_output(predict_region(model, plan, x, batch), kind, dtype))
    assert device.shape[1:] == tuple(block.shape)
    assert_same_encoding(device, host, kind, dtype)
    if kind == "labels" or dtype == "float32":  # the logits themselves are the same numbers
        logits = on_device(model, image, lambda x: predict_region(model, plan, x, batch))
        assert np.array_equal(logits, predict_region(model, plan, image, batch))


@pytest.mark.parametrize("model,tile,dims,names", [
    (net(), 236, 2, "all"), (net(depth=4, padding="same", num_classes=3), 96, 2, "all"),
    (net(dims=3, depth=3, base_channels=2), 52, 3, "identity,flip_z,flip_yx")], ids=["exact", "blended", "3d"])
def test_test_time_transforms_on_the_device_are_those_on_the_host(model, tile, dims, names):
    """Every transform of a block read, mirrored, flipped, transposed, run, stitched, activated
    and mapped back as tensors: the host's numbers (the transforms and stitching bit for bit,
    softmax within rounding)."""
    from pipeline.jobs.predict import activate

    shape = (230, 190) if dims == 2 else (30, 44, 41)
    region = Box.from_bounds((0, 40), (120, 190)) if dims == 2 else Box.from_bounds((4, 0, 12), (30, 30, 41))
    chosen = transforms(dims, names)
    held = read_box(model, region, shape, chosen, tile)
    image = cells(shape, dtype=np.float32)[None][(slice(None), *held.slices())]

    def augmented(x, activation):
        return predict_region_tta(model, region, shape, lambda box: x[(slice(None), *box.relative_to(held))], chosen, tile,
                                  activation=activation, batch_size=2)

    host = augmented(image, lambda y: activate(y, "softmax"))
    device = on_device(model, image, lambda x: augmented(x, lambda y: activate(y, "softmax")))
    assert device.dtype == host.dtype == np.float32 and device.shape == host.shape
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)
    same = on_device(model, image, lambda x: augmented(x, lambda y: y))  # logits: no activation to round
    assert np.array_equal(same, augmented(image, lambda y: y))


@pytest.mark.slow
def test_device_stitch_through_the_job_stores_what_the_host_path_stores(client, image_2d, model_2d, tmp_path):
    """The job's switch, on a real cluster: ``device_stitch`` keeps each block in torch from
    upload to stored form (on CPU here, what a GPU worker does by default); the uint8 image
    then travels as stored, read ahead too, and is normalised in torch."""
    url, data = image_2d
    assert data.dtype == np.uint8

    def run(name, **kwargs):
        settings = PredictSettings(input=url, output=str(tmp_path / name), model=str(model_2d), block_size=100,
                                   pyramid=False, **kwargs)
        _, summary = predict(settings, client=client)
        assert summary.done == 12
        return zarr.open_group(str(tmp_path / name), mode="r")["0"][...]

    np.testing.assert_allclose(run("on.zarr", device_stitch=True), run("off.zarr"), rtol=0, atol=1e-6)
    labels = run("labels-on.zarr", device_stitch=True, output_kind="labels", prefetch=True)
    assert np.array_equal(labels, run("labels-off.zarr", output_kind="labels"))
    augmented = run("tta-on.zarr", device_stitch=True, tta="identity,rot90,flip_x")
    np.testing.assert_allclose(augmented, run("tta-off.zarr", tta="identity,rot90,flip_x"), rtol=0, atol=1e-6)


def test_device_stitch_defaults_to_the_gpu(image_2d, model_2d, tmp_path):
    url, _ = image_2d
    common = {"input": url, "model": str(model_2d), "block_size": 100}
    job, _ = plan_prediction(PredictSettings(output=str(tmp_path / "a.zarr"), **common))
    assert not job.stitch_on_device and not job.normalise_on_device(np.uint8)  # on CPU the host does both by default
    assert job.read_block(job.blocks()[0]).dtype == np.float32
    assert dataclasses.replace(job, device="cuda").stitch_on_device  # a torch model on a GPU: on by default
    onnx = dataclasses.replace(job.model, weights="onnx")  # onnxruntime takes host arrays
    assert not dataclasses.replace(job, device="cuda", model=onnx).stitch_on_device
    job, _ = plan_prediction(PredictSettings(output=str(tmp_path / "b.zarr"), device_stitch=True, **common))
    assert job.stitch_on_device and job.normalise_on_device(np.uint8) and job.normalise_on_device(np.int16)
    assert job.read_block(job.blocks()[0]).dtype == np.uint8  # as stored: a quarter of the bytes to move
    assert not job.normalise_on_device(np.uint16) and not job.normalise_on_device(np.float32)  # read normalised
    job, _ = plan_prediction(PredictSettings(output=str(tmp_path / "c.zarr"), tta="all", device_stitch=True, **common))
    assert job.stitch_on_device and job.read_block(job.blocks()[0]).dtype == np.uint8  # the transforms' hull, as stored


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32"])
def test_the_device_normalises_an_image_as_stored_bit_for_bit(dtype):
    """overtile's normalisation on a tensor, where a block kept on the device applies it: the
    same float32 operations as on the host, so the same numbers to the last bit."""
    from pipeline.numerics.unet import Normalization

    image = (cells((70, 90), dtype=np.float32)[None] * 200).astype(dtype)
    for normalization in (Normalization(), Normalization(0.37, 0.21), Normalization(12.5, 3.0, scale_integers=False)):
        assert np.array_equal(normalization(torch.from_numpy(image)).numpy(), normalization(image))
    model = net()
    plan = plan_tiles(model, Box.from_bounds((0, 0), (60, 80)), 236)
    raw = cells(tuple(plan.read.shape))[None]  # uint8
    logits = lambda x: predict_region(model, plan, x)  # noqa: E731
    as_stored = on_device(model, raw, logits, normalize=model.normalization)
    assert np.array_equal(as_stored, on_device(model, model.normalization(raw), logits))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it where one is lent)")
@pytest.mark.parametrize("kind,dtype", ENCODINGS)
def test_on_a_gpu_a_block_kept_there_stores_what_the_host_path_stores(kind, dtype):
    """The CUDA path proper: pinned upload of the block as stored, normalisation, stitching and
    encoding on the GPU, against the host path (streamed tiles, numpy stitching) with the same
    model on the same GPU, in strict, deterministic float32 so the logits can be compared."""
    tf32, deterministic = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = False, True
    try:
        model = net().cuda().to(memory_format=torch.channels_last)
        plan = plan_tiles(model, Box.from_bounds((40, 24), (260, 230)), 236)
        raw = cells(tuple(plan.read.shape))[None]  # uint8, as stored
        for dt in ("uint8", "int16"):
            stored = torch.from_numpy(raw.astype(dt)).cuda()
            assert np.array_equal(model.normalization(stored).cpu().numpy(), model.normalization(raw.astype(dt)))
        host = encode_output(predict_region(model, plan, model.normalization(raw), 2, runner=run_tiles), kind, dtype)
        device = on_device(model, raw, lambda x: encode_output(predict_region(model, plan, x, 2, runner=run_tiles), kind, dtype),
                           normalize=model.normalization)
        assert_same_encoding(device, host, kind, dtype)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = tf32, deterministic


@pytest.mark.parametrize("kind,dtype", [("labels", "uint8"), ("probabilities", "uint8")])
def test_augmented_blocks_take_the_device_branch_and_store_the_hosts_encoding(image_2d, model_2d, tmp_path, monkeypatch,
                                                                                kind, dtype):
    """run_block with test-time transforms and ``device_stitch``, in this process: it goes
    through ``on_device``, and stores what the host stores. Averaged probabilities differ by
    float rounding (torch's softmax against numpy's), so a label may differ only where the two
    classes are within 1e-5 of each other, and round(255·p) by one level at a half."""
    from pipeline.jobs import predict as module

    url, _ = image_2d
    calls = []
    monkeypatch.setattr(module, "on_device", lambda *a, **k: calls.append(1) or on_device(*a, **k))

    def run(name, **kwargs):
        settings = PredictSettings(input=url, output=str(tmp_path / name), model=str(model_2d), block_size=160,
                                   tta="identity,rot90,flip_x", pyramid=False, **kwargs)
        job, pending = plan_prediction(settings)
        for block in pending.blocks:
            job.run_block(block)
        return zarr.open_group(str(tmp_path / name), mode="r")["0"][...], len(pending.blocks)

    device, blocks = run("on.zarr", device_stitch=True, output_kind=kind, dtype=dtype)
    assert len(calls) == blocks
    host, _ = run("off.zarr", output_kind=kind, dtype=dtype)
    assert len(calls) == blocks  # the host path did not call it
    if kind == "labels":
        p, _ = run("p.zarr")
        assert np.all((device == host) | (np.abs(p[0] - p[1]) < 1e-5))
    else:
        assert np.abs(device.astype(int) - host.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it where one is lent)")
def test_on_a_gpu_test_time_transforms_kept_there_are_the_hosts():
    """Mirrored reads, flips and transposes, stitching and averaging on the GPU, against the
    host path with the same model on the same GPU (strict, deterministic float32)."""
    from pipeline.jobs.predict import activate

    tf32, deterministic = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = False, True
    try:
        model = net().cuda().to(memory_format=torch.channels_last)
        shape, region, chosen = (230, 190), Box.from_bounds((0, 40), (120, 190)), transforms(2, "all")
        held = read_box(model, region, shape, chosen, 236)
        image = cells(shape, dtype=np.float32)[None][(slice(None), *held.slices())]

        def augmented(x):
            return predict_region_tta(model, region, shape, lambda box: x[(slice(None), *box.relative_to(held))], chosen,
                                      236, activation=lambda y: activate(y, "softmax"), batch_size=2, runner=run_tiles)

        np.testing.assert_allclose(on_device(model, image, augmented), augmented(image), rtol=0, atol=1e-6)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = tf32, deterministic
