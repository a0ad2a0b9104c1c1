"""The package's shape: imports flow one way, functions and modules stay readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "lorakit"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts).removesuffix(".__init__")] = f
    return mods


def _imports(name: str, file: Path, mods: dict[str, Path]) -> set[str]:
    """lorakit modules that ``name`` imports, at module level or inside functions."""
    pkg = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            # a package's __init__ imports its submodules: not an edge back up
            if c in mods and c != name and not name.startswith(c + "."):
                found.add(c)
    return found


def test_no_import_cycle():
    mods = _modules()
    edges = {m: _imports(m, f, mods) for m, f in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])


def test_methods_import_only_the_layer_and_config_contract():
    mods = _modules()
    # the contract, plus the leaves every method uses: weights (4-bit or not), bitmasks
    allowed = {
        "lorakit.config",
        "lorakit.layers",
        "lorakit.hardware",
        "lorakit.quant",
        "lorakit.bitmask",
    }
    for m, f in mods.items():
        if m.startswith("lorakit.methods"):
            outside = {i for i in _imports(m, f, mods) if not i.startswith("lorakit.methods")}
            assert outside <= allowed, f"{m} imports {sorted(outside - allowed)}"


def test_weight_and_bitmask_helpers_are_leaves():
    mods = _modules()
    for m in ("lorakit.quant", "lorakit.bitmask"):
        inside = _imports(m, mods[m], mods) - {"lorakit.bitmask"}
        assert not inside, f"{m} imports {sorted(inside)}"


def test_functions_and_modules_are_short():
    long = []
    for f in PACKAGE.rglob("*.py"):
        text = f.read_text()
        rel = f.relative_to(PACKAGE)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"module {rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.name}: {n} lines")
    assert not long, "over the limits: " + "; ".join(long)
