"""The code's shape: no import cycles among the project's modules, and the modules that check
options before a backend loads import no Keras."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGES = ("data", "engine", "model")


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


@pytest.mark.parametrize("module", ["model", "model.spec", "model.factory", "model.weights", "data.markdown"])
def test_option_checking_modules_import_no_keras(module):
    code = f"import sys, {module}; print(sorted(m for m in ('keras', 'torch', 'tensorflow', 'jax') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_the_table_helper_imports_nothing_of_the_project():
    assert not project_imports()["data.markdown"]
