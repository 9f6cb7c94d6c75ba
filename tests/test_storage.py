import numpy as np
import pytest
import zarr

from pipeline.errors import InputError
from pipeline.numerics.geometry import Box
from pipeline.storage import check_output, create_image, open_image

from conftest import write_zarr


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_array_both_formats(tmp_path, zarr_format):
    data = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    src = open_image(write_zarr(tmp_path / "a.zarr", data, zarr_format=zarr_format))
    assert src.axes == "yx" and src.spatial_shape == (20, 30) and src.channels == 1
    np.testing.assert_array_equal(src.read(Box((2, 3), (4, 5))), data[None, 2:6, 3:8])


@pytest.mark.parametrize("axes,shape", [("yxc", (20, 30, 3)), ("cyx", (3, 20, 30)), ("zyx", (4, 20, 30)), ("czyx", (2, 4, 20, 30)), ("zyxc", (4, 20, 30, 2))])
def test_explicit_axes_read_channel_first(tmp_path, axes, shape):
    data = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    src = open_image(write_zarr(tmp_path / "a.zarr", data), axes=axes)
    spatial = "".join(a for a in axes if a in "zyx")
    box = Box((1,) * len(spatial), (3,) * len(spatial))
    order = ([axes.index("c")] if "c" in axes else []) + [axes.index(a) for a in spatial]
    expected = data.transpose(order)
    if "c" not in axes:
        expected = expected[None]
    np.testing.assert_array_equal(src.read(box), expected[(slice(None), *box.slices())])


def ome_group(path, version: str, axes: str, data: np.ndarray):
    zarr_format = 3 if version == "0.5" else 2
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    g.create_array("s0", shape=data.shape, chunks=data.shape, dtype=data.dtype)[...] = data
    ms = {"version": version, "axes": [{"name": a, "type": "space" if a in "zyx" else {"c": "channel", "t": "time"}[a], **({"unit": "micrometer"} if a in "yx" else {})} for a in axes],
          "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [0.5] * len(axes)}]}]}
    if version == "0.5":
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        g.attrs["multiscales"] = [ms]
    return str(path)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_axes_from_metadata(tmp_path, version):
    data = np.random.default_rng(0).random((1, 2, 10, 12)).astype(np.float32)
    url = ome_group(tmp_path / "img.ome.zarr", version, "tcyx", data)
    src = open_image(url)
    assert src.axes == "tcyx" and src.channels == 2 and src.spatial_shape == (10, 12)
    assert src.scale["x"] == 0.5 and src.units["x"] == "micrometer"
    np.testing.assert_array_equal(src.read(Box.from_shape((10, 12))), data[0])
    assert open_image(url, axes="tcyx").axes == "tcyx"
    assert open_image(url, axes="cyx").axes == "tcyx"  # the same data: its one time point left unsaid
    for wrong in ("yx", "yxc"):  # two channels are not nothing; nor in another order
        with pytest.raises(InputError, match="OME-Zarr metadata says 'tcyx'"):
            open_image(url, axes=wrong)


def test_fsspec_memory_url():
    data = np.ones((8, 9), np.float32)
    write_zarr("memory://overtile-test/a.zarr", data)
    assert open_image("memory://overtile-test/a.zarr").read(Box.from_shape((8, 9))).sum() == 72


def test_output_is_ome_zarr_with_block_chunks(tmp_path):
    url = str(tmp_path / "out.zarr")
    arr = create_image(url, (2, 100, 90), (2, 64, 64), "float32", "cyx", scale=[1, 0.5, 0.5], units={"y": "micrometer"})
    assert arr.chunks == (2, 64, 64)
    g = zarr.open_group(url, mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert g.attrs["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1, 0.5, 0.5]
    # and it opens back as an image
    assert open_image(url).axes == "cyx"


def test_bad_inputs_name_the_input(tmp_path):
    with pytest.raises(InputError, match="nope.zarr: no such file"):
        open_image(str(tmp_path / "nope.zarr"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="plain: not a Zarr"):
        open_image(str(tmp_path / "plain"))
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(InputError, match="file.txt"):
        open_image(str(tmp_path / "file.txt"))
    url = write_zarr(tmp_path / "a.zarr", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(InputError, match="3-D array; say what its axes are"):
        open_image(url)
    with pytest.raises(InputError, match="axes 'yx' do not match the array's 3 dimensions"):
        open_image(url, axes="yx")
    with pytest.raises(InputError, match="not valid"):
        open_image(url, axes="abc")
    for dtype in (bool, np.complex64):
        with pytest.raises(InputError, match="unsupported dtype"):
            open_image(write_zarr(tmp_path / f"{np.dtype(dtype).name}.zarr", np.zeros((4, 4), dtype)))
    with pytest.raises(InputError, match="empty"):
        open_image(write_zarr(tmp_path / "empty.zarr", np.zeros((0, 4), np.uint8), chunks=(1, 4)))
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w").create_array("x", shape=(2, 2), dtype="u1")
    with pytest.raises(InputError, match="without OME-Zarr multiscales metadata.*members: x"):
        open_image(str(tmp_path / "group.zarr"))


def test_existing_output_of_other_shape_is_refused_unless_overwrite(tmp_path):
    url = str(tmp_path / "out.zarr")
    create_image(url, (2, 10, 10), (2, 10, 10), "float32", "cyx")
    assert check_output(url, (2, 10, 10), "float32", overwrite=False) is True
    with pytest.raises(InputError, match=r"existing output has shape \(2, 10, 10\)"):
        check_output(url, (2, 12, 10), "float32", overwrite=False)
    assert check_output(url, (2, 12, 10), "float32", overwrite=True)
    assert check_output(str(tmp_path / "new.zarr"), (1,), "uint8", overwrite=False) is False


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_place_holding_other_things_is_never_taken_for_an_output(tmp_path, where):
    """An output that exists but is not Zarr (a results folder, a bucket's prefix) is refused,
    with --overwrite too: replacing it would delete everything in it."""
    if where == "local":
        url = str(tmp_path / "results")
        (tmp_path / "results" / "sub").mkdir(parents=True)
        (tmp_path / "results" / "sub" / "keep.txt").write_text("x")
        kept = tmp_path / "results" / "sub" / "keep.txt"
    else:
        import fsspec

        url = "memory://results-of-a-study"
        fsspec.filesystem("memory").pipe("/results-of-a-study/study.csv", b"slide,cells\n")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="exists and is not a Zarr image"):
            check_output(url, (1, 4, 4), "float32", overwrite=overwrite)
    if where == "local":
        assert kept.exists()
        empty = tmp_path / "empty"
        empty.mkdir()
        assert check_output(str(empty), (1, 4, 4), "float32", overwrite=False) is False  # an empty folder is fine


def test_an_output_inside_what_the_run_reads_is_refused_but_labels_of_an_image(tmp_path):
    """An OME-Zarr input is read from IMAGE/0: an output there would replace the pixels."""
    image = str(tmp_path / "image.zarr")
    create_image(image, (1, 8, 8), (1, 8, 8), "uint8", "cyx")
    with pytest.raises(InputError, match="is inside .*image.zarr, which this run reads"):
        check_output(f"{image}/0", (1, 8, 8), "uint8", overwrite=True, reads=(image,))
    assert check_output(f"{image}/labels/cells", (1, 8, 8), "uint8", overwrite=True, reads=(image,)) is False


def test_a_url_is_one_place_with_or_without_its_trailing_slash():
    from pipeline.storage import absolute

    assert absolute("s3://bucket/in.zarr/") == absolute("s3://bucket/in.zarr") == "s3://bucket/in.zarr"
    assert absolute("s3://") == "s3://"


def test_a_one_channel_stack_may_be_named_zyx(tmp_path):
    """Ingest writes a TIFF stack as czyx with one channel; README's commands say --axes zyx."""
    url = str(tmp_path / "stack.zarr")
    create_image(url, (1, 3, 8, 8), (1, 1, 8, 8), "uint8", "czyx")[...] = 7
    source = open_image(url, axes="zyx")
    assert source.axes == "czyx" and source.spatial_shape == (3, 8, 8) and source.channels == 1
