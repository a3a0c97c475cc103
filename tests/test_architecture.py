"""The import contract (pyproject.toml, ``[tool.importlinter]``) and the error hierarchy.

Layers only point down: ``harvest.cli`` > ``organisms`` > ``analysis`` | ``cluster`` >
``harvest.runner`` > ``sharding`` > the core (every other module of ``harvest``); no package has an
import cycle between its modules. A circle or an upward import fails ``make test`` here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("harvest", "sharding", "analysis", "cluster", "organisms", "jobs")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root``, in a fresh interpreter (its own import graph)."""
    script = "import sys\nfrom importlinter.cli import lint_imports\nsys.exit(lint_imports(no_cache=True))\n"
    return subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line", [
    ("harvest/spec.py", "import analysis.query"),  # the core importing an analysis
    ("sharding/plan.py", "from harvest import runner"),  # sharding importing the runner above it
    ("harvest/store.py", "import harvest.summary"),  # a circle inside the core (summary imports store)
])
def test_an_upward_import_or_a_circle_breaks_the_contract(tmp_path, module, line):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout


def test_no_module_imports_itself_through_others():
    """Zero import cycles, package ``__init__`` modules and imports inside functions included."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    assert [m for m in sorted(graph.modules) if reaches(m, m)] == []


def test_every_harvest_module_is_in_a_layer():
    """A new module of harvest must be placed in the contract, or nothing would check it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    named = {m.strip().strip("()") for layer in layers for m in layer.replace("|", ":").split(":")}
    harvest = importlib.import_module("harvest")
    modules = {f"harvest.{m.name}" for m in pkgutil.iter_modules(harvest.__path__)}
    assert modules - named == set(), "add these to the core layer (or another) in pyproject.toml"


def test_the_runner_loads_nothing_from_the_layers_above_it():
    script = ("import sys, harvest.runner\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('analysis', 'cluster', 'organisms', 'jobs')"
              " or m.startswith('harvest.cli')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=300)
    assert out.stdout.strip() == "[]"


def test_every_error_of_the_project_is_a_harvest_error():
    from harvest import errors

    found = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.")
                             if not m.name.endswith("__main__")]
        for name in names:
            module = importlib.import_module(name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__.split(".")[0] in PACKAGES:
                    found.append(cls)
    assert found and all(c.__module__ == "harvest.errors" for c in found), \
        {c.__qualname__: c.__module__ for c in found if c.__module__ != "harvest.errors"}
    # Interrupted is a signal, not an error: a BaseException so that no `except Exception` swallows it
    assert all(issubclass(c, errors.HarvestError) for c in found if c is not errors.Interrupted)
    assert issubclass(errors.PlanDoesNotFitError, errors.SpecError)
