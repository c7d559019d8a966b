"""The package's layering, read from the source: every import (module level, inside functions, under
TYPE_CHECKING) counts. cli -> config -> calib -> compress -> checkpoint -> eval; no package imports another
one's private (_underscored) names."""
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


def imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from rankwise... import name` and (module, "") for `import rankwise...`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
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

