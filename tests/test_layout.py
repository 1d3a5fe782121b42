"""The package's shape (README "Architecture"; the design's "Layout"): imports run downward,
no circles, no private imports across modules, imports at the top (lazy only in the CLI),
small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "otlt"

# Lower number = lower layer; a module may import its own layer or a lower one.
LAYERS = [
    ("errors", "console", "amp", "stopping", "atomic"),
    ("transport", "losses", "metrics", "models", "config", "labels"),
    ("mixing", "reweight", "data"),
    ("engine", "integrations"),
    ("report", "bench", "sweep", "demo"),
    ("cli", "__main__", ""),  # "" is the package itself (otlt/__init__.py re-exports)
]
LAZY_ALLOWED = {"otlt.cli"}
MAX_LINES = 400
WHOLE_MARKER = "stays whole"


def module_name(path: Path) -> str:
    parts = ("otlt",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def imports(module: str) -> list[tuple[str, str, bool]]:
    """``(target module, imported name, at top level)`` of every ``otlt`` import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            if not source.startswith("otlt"):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in MODULES else source, alias.name, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", id(node) in top) for a in node.names
                      if a.name.startswith("otlt")]
    return found


GRAPH = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def test_the_readmes_architecture_tree_names_every_module():
    """README's "Architecture" tree is the map a newcomer reads: each module file (by its
    file name) and each subpackage of ``src/otlt`` appears in it."""
    readme = (SRC.parents[1] / "README.md").read_text()
    tree = readme.split("\n## Architecture\n")[1].split("\n## ")[0]
    tree = tree[tree.index("src/otlt/"):]
    files = {p.name for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    packages = {f"{p.name}/" for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert sorted(name for name in files | packages if name not in tree) == []


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_imports_run_downward():
    upward = [(m, t) for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m)]
    assert upward == []


def core_crossings(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from one core package (the layer of transport, losses, metrics, models,
    config) into another."""
    core = set(LAYERS[1])

    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    return [(m, t) for m, targets in graph.items() for t in sorted(targets)
            if package(m) in core and package(t) in core and package(t) != package(m)]


def test_the_core_packages_import_none_of_each_other():
    """The core packages share a layer but not their code: the config knows no loss (a loss's
    default DRW start is the engine's preflight to check)."""
    assert core_crossings(GRAPH) == []
    assert core_crossings({"otlt.config.epochs": {"otlt.losses.registry", "otlt.errors",
                                                  "otlt.config.schema"}}) == [
        ("otlt.config.epochs", "otlt.losses.registry")]  # the check can fail


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_private_name_is_imported_across_modules():
    private = [(m, t, name) for m in MODULES for t, name, _ in imports(m)
               if name.startswith("_") and not name.startswith("__") and t != m]
    assert private == []


def test_imports_are_at_the_top_outside_the_cli():
    lazy = [(m, t) for m in MODULES if m not in LAZY_ALLOWED
            for t, _, at_top in imports(m) if not at_top]
    assert lazy == []


def test_modules_are_small_or_say_why_not():
    long = []
    for module, path in MODULES.items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and WHOLE_MARKER not in doc:
            long.append((module, len(text.splitlines())))
    assert long == []


@pytest.mark.parametrize("source, message", [
    ("from otlt.cli import main\n", "upward"),
    ("from otlt.mixing.base import _private\n", "private"),
])
def test_the_checks_catch_what_they_should(tmp_path, source, message):
    """The walker sees a violation in a module of the lowest layer (a check that cannot fail
    would be a defect)."""
    fake = "otlt.errors"
    saved = MODULES[fake]
    path = tmp_path / "errors.py"
    path.write_text(source)
    MODULES[fake] = path
    try:
        found = imports(fake)
    finally:
        MODULES[fake] = saved
    if message == "upward":
        assert any(layer(t) > layer(fake) for t, _, _ in found)
    else:
        assert any(name.startswith("_") for _, name, _ in found)


def test_tests_use_public_names():
    """Tests assert public behaviour: no test imports a private otlt name."""
    private = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("otlt"):
                private += [(path.name, node.module, a.name) for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []
