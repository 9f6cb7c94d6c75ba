"""Object outlines (pipeline.numerics.outlines) and their GeoJSON export (pipeline.storage.geojson)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import shape

from pipeline.numerics.outlines import merge_pieces, outline_parts, outlines
from pipeline.storage.geojson import FeatureWriter, read_features


def pixels(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> shapely.Geometry:
    """The reference: the union of the pixels' squares."""
    r, c = np.nonzero(mask)
    r, c = r + offset[0], c + offset[1]
    return shapely.union_all(shapely.box(c, r, c + 1, r + 1))


def assert_well_formed(polygon: shapely.Geometry) -> None:
    assert polygon.geom_type == "Polygon" and polygon.is_valid, shapely.is_valid_reason(polygon)
    assert polygon.exterior.is_ccw and not any(ring.is_ccw for ring in polygon.interiors)


def random_labels(seed: int) -> np.ndarray:
    """Blobs of a few ids, 4-connected or not, touching each other and the border."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 24, 2)
    labels = rng.integers(0, rng.integers(2, 6), (h, w)).astype(np.uint32)
    return ndimage.zoom(labels, 2, order=0) if seed % 2 else labels


@pytest.mark.parametrize("seed", range(40))
def test_parts_are_exactly_the_pixels_of_each_id(seed):
    labels = random_labels(seed)
    parts = outline_parts(labels, offset=(5, -3))
    assert sorted(parts) == np.unique(labels[labels > 0]).tolist()
    for i, polygons in parts.items():
        assert len(polygons) == ndimage.label(labels == i)[1]
        for polygon in polygons:
            assert_well_formed(polygon)
        assert sum(p.area for p in polygons) == (labels == i).sum()
        assert shapely.union_all(polygons).equals(pixels(labels == i, (5, -3)))


def test_largest_part_of_an_id_that_is_not_4_connected():
    labels = np.array([[1, 0, 0],
                       [0, 1, 1],
                       [0, 1, 0]], np.uint64)
    polygon = outlines(labels)[1]
    assert_well_formed(polygon)
    assert polygon.area == 3 and polygon.equals(pixels(labels[1:] == 1, (1, 0)))
    assert [p.area for p in outline_parts(labels)[1]] == [1, 3]


# Each: the label array, the id, its number of holes.
TRICKY = {
    "hole_touching_the_exterior_at_a_vertex": (np.array([[1, 1, 1, 0],
                                                          [1, 1, 0, 1],
                                                          [1, 1, 1, 1]]), 1, 1),
    "two_holes_touching_at_a_vertex": (np.array([[1, 1, 1, 1],
                                                 [1, 0, 1, 1],
                                                 [1, 1, 0, 1],
                                                 [1, 1, 1, 1]]), 1, 2),
    "a_chain_of_holes_touching_the_exterior": (np.array([[1, 1, 1, 0],
                                                         [1, 1, 0, 1],
                                                         [1, 0, 1, 1],
                                                         [1, 1, 1, 1]]), 1, 2),
    "one_pixel_wide_diagonal_staircase": (np.array([[1, 1, 0, 0, 0],
                                                    [0, 1, 1, 0, 0],
                                                    [0, 0, 1, 1, 0],
                                                    [0, 0, 0, 1, 1]]), 1, 0),
    "staircase_loop_around_a_hole": (np.array([[0, 1, 1, 1, 0],
                                               [1, 1, 0, 1, 1],
                                               [1, 0, 0, 0, 1],
                                               [1, 1, 0, 1, 1],
                                               [0, 1, 1, 1, 0]]), 1, 1),
    "hole_holding_another_object": (np.array([[1, 1, 1, 1, 1],
                                              [1, 2, 2, 0, 1],
                                              [1, 2, 3, 0, 1],
                                              [1, 1, 1, 1, 1]]), 1, 1),
    "ring": (np.pad(np.pad(np.zeros((3, 4), int), 2, constant_values=5), 1), 5, 1),
}


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_tricky_shapes_give_one_valid_polygon(case):
    labels, i, holes = TRICKY[case]
    polygon = outlines(labels)[i]
    assert_well_formed(polygon)
    assert polygon.area == (labels == i).sum()
    assert len(polygon.interiors) == holes
    assert polygon.equals(pixels(labels == i))


def test_ring_area_is_its_pixel_count_and_its_hole_is_kept():
    labels, i, _ = TRICKY["ring"]
    polygon = outlines(labels)[i]
    assert polygon.area == (labels == i).sum() == 8 * 7 - 3 * 4
    assert shapely.Polygon(polygon.interiors[0]).area == 12


def test_offset_ids_and_coordinates():
    labels = np.zeros((6, 8), np.uint64)
    labels[1:3, 2:5] = 2**63 + 1
    labels[4, 0] = 3
    polygons = outlines(labels, offset=(100, 200), ids=[2**63 + 1, 9])
    assert list(polygons) == [2**63 + 1]
    assert polygons[2**63 + 1].bounds == (202, 101, 205, 103)
    assert outlines(np.zeros((3, 3), np.uint32)) == {}
    assert outlines(labels[4:, :1] == 3)[1].area == 1  # a boolean mask is id 1


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 3), np.uint32), np.zeros((3, 3), np.float32)])
def test_outlines_refuse_what_is_not_a_2d_label_array(bad):
    with pytest.raises(ValueError, match="outlines"):
        outlines(bad)


@pytest.mark.parametrize("seed", range(12))
def test_pieces_from_blocks_merge_to_the_whole_outline(seed):
    rng = np.random.default_rng(seed)
    labels = ndimage.label(random_labels(seed + 100) > 0)[0]  # 4-connected objects
    block = rng.integers(1, 7, 2)
    pieces: dict[int, list] = {}
    for r0 in range(0, labels.shape[0], block[0]):
        for c0 in range(0, labels.shape[1], block[1]):
            for i, parts in outline_parts(labels[r0:r0 + block[0], c0:c0 + block[1]], (r0, c0)).items():
                pieces.setdefault(i, []).extend(parts)
    for i, whole in outlines(labels).items():
        merged = merge_pieces(pieces[i])
        assert_well_formed(merged)
        assert merged.area == sum(p.area for p in pieces[i]) == whole.area
        assert merged.equals(whole)
        assert shapely.get_num_coordinates(merged) == shapely.get_num_coordinates(whole)  # seams leave no vertex


def test_u_shaped_object_cut_by_a_block_edge_keeps_both_arms():
    labels = np.array([[1, 0, 1],
                       [1, 0, 1],
                       [1, 1, 1]])
    top = outline_parts(labels[:2], (0, 0))[1]
    bottom = outline_parts(labels[2:], (2, 0))[1]
    assert len(top) == 2
    assert merge_pieces(top + bottom).equals(outlines(labels)[1])


def write_cells(url: str) -> None:
    labels = np.zeros((8, 9), np.uint32)
    labels[1:6, 1:6] = 4
    labels[3, 3] = 0
    labels[6:, 7:] = 9
    polygons = outlines(labels, offset=(1000, 2000))
    with FeatureWriter(url) as out:
        out.write(4, polygons[4], ("Tumor", (200, 0, 0)), {"Area px": 24.0, "Mean": math.nan})
        out.write(9, shapely.Polygon(polygons[9].exterior.coords[::-1]), None, {"Area px": np.float32(4)})


@pytest.mark.parametrize("name", ["cells.geojson", "cells.geojson.gz"])
def test_features_are_qupath_detections_with_valid_ccw_polygons(tmp_path, name):
    path = tmp_path / "out" / name
    write_cells(str(path))
    raw = path.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    document = json.loads(raw)
    assert document["type"] == "FeatureCollection"
    assert document["features"] == read_features(path)
    first, second = document["features"]
    assert first["properties"] == {"objectType": "detection", "object_id": 4, "measurements": {"Area px": 24.0},
                                   "classification": {"name": "Tumor", "color": [200, 0, 0]}}
    assert "classification" not in second["properties"]
    assert first["id"] != second["id"] and len(first["id"]) == 36
    assert isinstance(first["geometry"]["coordinates"][0][0][0], int)
    for feature in (first, second):
        polygon = shape(feature["geometry"])
        assert_well_formed(polygon)
    assert shape(first["geometry"]).area == 24 and len(shape(first["geometry"]).interiors) == 1
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == [name]


def test_reruns_write_the_same_bytes(tmp_path):
    write_cells(str(tmp_path / "a.geojson.gz"))
    write_cells(str(tmp_path / "b.geojson.gz"))
    assert (tmp_path / "a.geojson.gz").read_bytes() == (tmp_path / "b.geojson.gz").read_bytes()


def test_a_failing_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureWriter(str(tmp_path / "cells.geojson.gz")) as out:
            out.write(1, shapely.box(0, 0, 1, 1), None, {})
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="MultiPolygon"):
        with FeatureWriter(str(tmp_path / "cells.geojson")) as out:
            out.write(1, shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)]), None, {})
    assert list(tmp_path.iterdir()) == []


def test_writer_streams_to_an_fsspec_url():
    import fsspec

    url = "memory://geojson-test/cells.geojson"
    write_cells(url)
    assert [f["properties"]["object_id"] for f in read_features(url)] == [4, 9]
    assert fsspec.filesystem("memory").ls("/geojson-test", detail=False) == ["/geojson-test/cells.geojson"]
