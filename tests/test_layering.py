"""The package's layering, read from the source: every import counts, inside functions too (those under
`if TYPE_CHECKING:` only for the private-name and layer rules: they never run). cli -> config -> calib ->
compress -> checkpoint -> eval; no import cycles; no package imports another one's private (_underscored)
names."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("calib", "cli", "compress", "eval")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(("rankwise",) + parts).removesuffix(".__init__")] = path
    return found


def type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (imported for annotations only, never run)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
            "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}


def imports(path: Path, run_only: bool = False) -> list[tuple[str, str]]:
    """(module, name) for every `from rankwise... import name` and (module, "") for `import rankwise...`;
    with `run_only`, not those under TYPE_CHECKING."""
    out = []
    tree = ast.parse(path.read_text())
    skip = type_checking_only(tree) if run_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rankwise"):
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.startswith("rankwise")]
    return out


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_no_module_imports_another_packages_private_names():
    bad = [(m, f"{source}.{name}") for m, path in modules().items() for source, name in imports(path)
           if name.startswith("_") and name != "__version__" and package_of(source) != package_of(m)]
    assert bad == []


def test_calib_imports_no_later_layer():
    """calib (statistics) knows no stage, method or metric: it imports only itself and rankwise.errors."""
    bad = [(m, source) for m, path in modules().items() if package_of(m) == "calib"
           for source, _ in imports(path) if package_of(source) not in ("calib", "errors")]
    assert bad == []



def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_inside_functions():
    """`from a.b import c` depends on the module a.b.c when there is one, else on a.b."""
    found = modules()
    graph = {}
    for m, path in found.items():
        deps = {f"{source}.{name}" if f"{source}.{name}" in found else source
                for source, name in imports(path, run_only=True)}
        graph[m] = {d for d in deps if d in found and d != m}
    assert cycles(graph) == []
