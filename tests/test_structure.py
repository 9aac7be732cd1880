"""The package's layout keeps its architecture: layers along the data's path, no import circles, no module that
imports one of a higher layer, and every module importable on its own.

The layer map below is read against the modules' own imports (top-level and inside functions alike: a deferred
import is still a dependency). A module may import modules of lower layers and of its own group.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "iv2trt"

# lowest first; each entry is a group: a module belongs to the group of its longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    ("iv2trt.models.config", "iv2trt.models.pos_embed", "iv2trt.models.checkpoint",
     "iv2trt.models.deferred_norm"),                                              # the model's parts
    ("iv2trt.models.kernels",),                                                    # its fused GPU kernels
    ("iv2trt.models",),                                                            # the model, its factory
    ("iv2trt.version", "iv2trt.errors", "iv2trt.fileio", "iv2trt.settings", "iv2trt.compare",
     "iv2trt.transforms", "iv2trt.doorbell", "iv2trt.capture_guard"),                                      # what every stage uses
    ("iv2trt.model",),                                                             # settings -> PyTorch model
    ("iv2trt.export",),                                                            # stage 1
    ("iv2trt.engine",),                                                            # stage 2
    ("iv2trt.runners", "iv2trt.decode", "iv2trt.output"),                          # stage 3's pieces, side by side
    ("iv2trt.job",),                                                               # the executor core, local
    ("iv2trt.distributed",),                                                       # the Ray executor
    ("iv2trt.bench",),                                                             # benchmarks
    ("iv2trt.cli",),                                                               # the commands
    ("iv2trt",),                                                                   # the package's front door
]
# GPU-only packages a module may need at import (kernels written in them); absent on CPU installs and in CI
OPTIONAL_GPU_PACKAGES = {"cutlass", "quack", "flash_attn", "tensorrt", "pycuda", "PyNvVideoCodec"}
SIDE_BY_SIDE = {"iv2trt.runners", "iv2trt.decode", "iv2trt.output"}  # one layer: none imports another


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def group(module: str) -> tuple[int, str]:
    """(layer rank, group) of a module: the longest prefix of the layer map that it matches."""
    best = None
    for rank, entries in enumerate(LAYERS):
        for prefix in entries:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    assert best is not None, f"{module} is in no layer of tests/test_structure.py's map: add it"
    rank, prefix = best
    return (rank, prefix if prefix in SIDE_BY_SIDE or len(LAYERS[rank]) == 1 else f"layer {rank}")


def imports_of(module: str) -> set[str]:
    """The package's modules that `module` imports (resolved; `from pkg import submodule` counts the submodule)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_in_the_layer_map():
    for module in MODULES:
        group(module)


def test_no_module_imports_a_higher_layer_or_a_neighbour():
    bad = []
    for module, imported in GRAPH.items():
        rank, own = group(module)
        for other in imported:
            other_rank, other_group = group(other)
            if other_rank > rank or (other_rank == rank and other_group != own):
                bad.append(f"{module} ({own}) imports {other} ({other_group})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_circles():
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(GRAPH[module]):
            if state.get(other) == 1:
                circles.append(" -> ".join(stack[stack.index(other):] + [other]))
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not circles, "\n".join(circles)


def test_nothing_imports_the_commands():
    importers = sorted(m for m, imported in GRAPH.items() if not group(m)[1] == "iv2trt.cli"
                       and any(group(o)[1] == "iv2trt.cli" for o in imported))
    assert not importers, importers


@pytest.mark.parametrize("chunk", range(2))
def test_every_module_imports_on_its_own(chunk):
    """Each module in a fresh interpreter (a missing import hidden by import order shows up here); a module written
    in an optional GPU package may miss only that package."""
    mine = [m for i, m in enumerate(sorted(MODULES)) if i % 2 == chunk]
    code = "import importlib, sys; importlib.import_module(sys.argv[1])"

    def run(module: str):
        return module, subprocess.run([sys.executable, "-c", code, module], cwd=ROOT, capture_output=True, text=True,
                                      timeout=300)

    def optional_missing(stderr: str) -> bool:
        last = stderr.strip().splitlines()[-1]
        missing = re.fullmatch(r"ModuleNotFoundError: No module named '([\w.]+)'", last)
        return bool(missing) and missing.group(1).split(".")[0] in OPTIONAL_GPU_PACKAGES

    with ThreadPoolExecutor(2) as pool:
        failed = [f"{m}: {r.stderr.strip().splitlines()[-1]}" for m, r in pool.map(run, mine)
                  if r.returncode and not optional_missing(r.stderr)]
    assert not failed, "\n".join(failed)
