"""The shape of the house (docs/architecture.md): which module owns which outside library, no
import circles, size limits, and declared dependencies. Read from the source, nothing run."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"wsiseg": ROOT / "wsiseg", "wsiseg_train": ROOT / "training"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# import name -> distribution name in pyproject.toml, where they differ
DISTRIBUTION = {"skimage": "scikit-image", "PIL": "pillow", "openslide": "openslide-python"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for both packages."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth (inside functions too)."""
    tree = ast.parse(path.read_text())
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found |= {f"{stem}.{a.name}" for a in node.names}
    return found


ALL = modules()


def importers_of(library: str) -> set[str]:
    return {m for m, p in ALL.items()
            if any(i == library or i.startswith(library + ".") for i in imports(p, m))}


def test_one_module_per_outside_library():
    assert importers_of("openslide") == {"wsiseg.slide"}
    assert importers_of("onnxruntime") == {"wsiseg.engine"}
    wsiseg_torch = {m for m in importers_of("torch") if m.startswith("wsiseg.")}
    assert wsiseg_torch == set(), "the inference package must not import torch"


def test_no_import_circles():
    graph = {m: {i for i in imports(p, m) if i in ALL and i != m} for m, p in ALL.items()}
    # the package __init__ files are entry points, not layers
    graph = {m: {d for d in deps if d not in PACKAGES} for m, deps in graph.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert circles == [], f"modules on an import circle: {circles}"


def test_sizes():
    long_modules = {m: n for m, p in ALL.items()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long_modules == {}
    long_functions = []
    for m, p in ALL.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{m}.{node.name} ({n})")
    assert long_functions == []


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def test_imported_packages_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    names = set()
    for d in declared:
        name = d.split(";")[0].strip()
        for sep in "[<>=!~ ":
            name = name.split(sep)[0]
        names.add(_canonical(name))
    own = set(PACKAGES)
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for m, p in ALL.items():
        for i in imports(p, m):
            top = i.split(".")[0]
            if not top or top in own or top in stdlib or top == "__future__":
                continue
            if _canonical(DISTRIBUTION.get(top, top)) not in names:
                missing.add(f"{top} ({m})")
    assert missing == set()


def test_one_python_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # training reads TOML with tomllib


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
