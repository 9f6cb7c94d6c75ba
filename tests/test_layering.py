"""The architecture kept by a test (DESIGN §2): the parts of ``pipeline/`` and the edges allowed
between them, third-party imports each part may not make, and no cycles. Every import is read
with ``ast``, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# part -> the parts it may import (besides itself). errors is the one exception type users
# see: a leaf everything may raise.
ALLOWED = {
    "errors": set(),
    "numerics": {"errors"},
    "storage": {"numerics", "errors"},
    "clusters": {"errors"},  # where blocks run: worker settings, SLURM and Kubernetes specs
    "models": {"numerics", "errors"},  # every kind of model: detect, probe, load, export
    "jobs": {"clusters", "models", "storage", "numerics", "errors"},
    "top": {"jobs", "clusters", "models", "storage", "numerics", "errors"},  # cli, preview
    "package": set(),  # pipeline/__init__.py
    "flows": {"top", "jobs", "clusters", "models", "storage", "numerics", "errors", "flows"},
}
FORBIDDEN_THIRD_PARTY = {
    "numerics": {"dask", "distributed", "zarr", "fsspec", "prefect", "prefect_dask", "tifffile", "yaml"},
    "storage": {"distributed", "prefect", "prefect_dask", "yaml"},
    "clusters": {"prefect", "prefect_dask", "torch", "zarr"},
    "models": {"dask", "distributed", "zarr", "fsspec", "prefect", "prefect_dask", "yaml"},
    "jobs": {"prefect", "prefect_dask", "yaml"},
    "top": {"prefect", "prefect_dask", "yaml"},
    "errors": {"prefect"},
    "package": {"prefect"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part(module: str) -> str:
    names = module.split(".")
    if names[0] == "flows":
        return "flows"
    if len(names) == 1:
        return "package"
    if names[1] in ("numerics", "storage", "jobs", "clusters", "models", "errors"):
        return names[1]
    return "top"


MODULES = {module_name(p): p for root in ("pipeline", "flows") for p in sorted((ROOT / root).rglob("*.py"))}


def imported(module: str, path: Path) -> tuple[set[str], set[str]]:
    """The modules of ours that ``module`` imports (resolved to the module, or the package when
    a name is not a module of its own) and the third-party top-level packages."""
    ours, theirs = set(), set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for base, name in targets:
            top = base.split(".")[0]
            if top not in ("pipeline", "flows"):
                theirs.add(top)
                continue
            full = f"{base}.{name}" if name else base
            ours.add(full if full in MODULES else base)
    return ours, theirs


GRAPH = {m: imported(m, p)[0] for m, p in MODULES.items()}


def test_the_parts_are_there():
    assert {part(m) for m in MODULES} == set(ALLOWED)
    for folder in ("numerics", "storage", "jobs"):
        assert (ROOT / "pipeline" / folder / "__init__.py").is_file()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_allowed_edges(module):
    own = part(module)
    for target in GRAPH[module]:
        assert target in MODULES, f"{module} imports {target}, which does not exist"
        other = part(target)
        assert other == own or other in ALLOWED[own], f"{module} ({own}) may not import {target} ({other})"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if part(m) != "flows"))
def test_third_party_imports_fit_the_part(module):
    theirs = imported(module, MODULES[module])[1]
    assert not theirs & FORBIDDEN_THIRD_PARTY[part(module)], f"{module} imports {theirs & FORBIDDEN_THIRD_PARTY[part(module)]}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if part(m) == "numerics"))
def test_numerics_have_no_device_streams(module):
    """CUDA streams and pinned memory are the jobs' (pipeline.jobs.inference), not the numerics'."""
    text = MODULES[module].read_text()
    assert "cuda.Stream" not in text and "pin_memory" not in text


def test_no_module_reaches_into_another_modules_privates():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pipeline", "flows"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports private {private} from {node.module}"


def test_there_are_no_import_cycles():
    """Depth-first search for a back edge over every module of pipeline/ and flows/."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target in GRAPH and target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: a made-up cycle is found."""
    monkeypatch.setitem(GRAPH, "pipeline.numerics.geometry", GRAPH["pipeline.numerics.geometry"] | {"pipeline.numerics.unet"})
    monkeypatch.setitem(GRAPH, "pipeline.numerics.unet", GRAPH["pipeline.numerics.unet"] | {"pipeline.numerics.geometry"})
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_there_are_no_import_cycles()
