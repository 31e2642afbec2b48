"""The code's shape: packages import only downwards (cli.py -> commands -> studies / using a run /
benchmarks -> training core -> backend -> model, data), no import cycles, and everything the
command line imports before a backend loads imports no framework."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGES = ("data", "model", "backend", "training", "studies", "inference", "bench", "commands")
# A package may import a package of a lower layer, never one of its own layer or above.
LAYERS = {"cli": 5, "commands": 4, "studies": 3, "inference": 3, "bench": 3, "training": 2, "backend": 1, "data": 0, "model": 0,
          "errors": -1, "checksums": -1, "markdown_tables": -1}


def project_imports() -> dict[str, set[str]]:
    """Each project module and the project modules it imports (at any depth of its code)."""
    files = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for package in PACKAGES for p in (ROOT / package).glob("*.py")}
    files.update({p: p.stem for p in ROOT.glob("*.py")})
    known = set(files.values())
    graph = {}
    for path, module in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[module] = (deps & known) - {module}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports from one package into another that is not below it (`a -> b`)."""
    def package(module: str) -> str:
        return module.split(".")[0]

    return sorted(f"{module} -> {dep}" for module, deps in graph.items() for dep in deps
                  if package(dep) != package(module) and LAYERS[package(dep)] >= LAYERS[package(module)])


def test_packages_import_only_downwards():
    assert set(LAYERS) - {"cli", "errors", "checksums", "markdown_tables"} == set(PACKAGES)
    assert upward_imports(project_imports()) == []


def test_an_upward_or_sideways_import_is_found():
    planted = {"training.train": {"studies.compare", "backend.selection"}, "inference.run": {"studies.stats"},
               "backend.devices": {"training.rundir"}, "data.loader": {"model.spec"}, "cli": {"training.config"}}
    assert upward_imports(planted) == ["backend.devices -> training.rundir", "data.loader -> model.spec",
                                       "inference.run -> studies.stats", "training.train -> studies.compare"]


def test_no_import_cycles():
    graph, cycles, state = project_imports(), [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


@pytest.mark.parametrize("module", ["cli", "model", "model.spec", "model.factory", "model.weights", "markdown_tables",
                                    "training.config", "training.resume", "training.rundir", "backend.selection"])
def test_option_checking_modules_import_no_keras(module):
    """`cli` covers every module the command line imports before a backend loads (a framework
    imported there would load before KERAS_BACKEND is checked, and slow every `--help`)."""
    code = f"import sys, {module}; print(sorted(m for m in ('keras', 'torch', 'tensorflow', 'jax') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_the_table_helper_imports_nothing_of_the_project():
    assert not project_imports()["markdown_tables"]
