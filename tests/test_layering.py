"""The architecture kept by a test: pipeline/ never imports the Prefect layer, and the
numerics never import I/O or execution libraries."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMERICS = {"geometry", "tiling", "unet", "weights", "metrics"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").rglob("*.py")), ids=lambda p: p.name)
def test_pipeline_does_not_import_prefect_or_flows(path):
    assert not imports(path) & {"prefect", "prefect_dask", "flows"}


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "pipeline").glob("*.py") if p.stem in NUMERICS), ids=lambda p: p.name)
def test_numerics_do_not_import_io_or_execution(path):
    assert not imports(path) & {"dask", "distributed", "zarr", "prefect", "fsspec"}
