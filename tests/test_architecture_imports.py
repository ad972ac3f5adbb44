"""Import direction of the package, read from the source (ast, nothing is imported): no module takes part in an
import cycle, function-level imports included, and the layers of DESIGN.md point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "retouch"

# Cycles still in the code, each edge named with its reason. Delete an entry when its cycle is gone: the test
# then keeps it gone.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def module_files(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is a package __init__)}`` for every module of ``package`` under ``src``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) block."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, module-level and function-level imports alike (not the
    ``if TYPE_CHECKING:`` ones, which never run).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; names resolve to the
    longest module prefix that exists. Relative imports are resolved against the importing module.
    """
    modules = module_files(src, package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        base = name if is_pkg else name.rpartition(".")[0]
        deps: set[str | None] = set()
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for blk in ast.walk(tree) if _is_type_checking(blk) for b in blk.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: no import at run time, no cycle
                continue
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == package)
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    anchor = base
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    target = f"{anchor}.{target}" if target else anchor
                if target.split(".")[0] != package:
                    continue
                for a in node.names:
                    full = f"{target}.{a.name}"
                    deps.add(full if full in modules else resolve(target))
        deps.discard(None)
        deps.discard(name)
        graph[name] = {d for d in deps if d is not None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC, PACKAGE)


def test_the_walker_sees_cycles_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nimport os\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    g = import_graph(tmp_path, "pkg")
    assert g["pkg.a"] == {"pkg.sub.b"} and g["pkg.sub.b"] == {"pkg.a"} and g["pkg.c"] == {"pkg.a"}
    assert g["pkg.sub"] == {"pkg.sub.b"}
    assert cycles(g) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_cycles(graph):
    unknown = {k for k in KNOWN_CYCLE_EDGES if k[1] not in graph.get(k[0], ())}
    pruned = {m: {d for d in deps if (m, d) not in KNOWN_CYCLE_EDGES} for m, deps in graph.items()}
    found = cycles(pruned)
    assert not found, (
        "import cycles (break them; a known exception needs an entry in KNOWN_CYCLE_EDGES):\n"
        + "\n".join(" <-> ".join(c) for c in found)
    )
    # a known edge that no longer exists: the exception is stale, delete it so that the cycle cannot come back
    assert not unknown, f"KNOWN_CYCLE_EDGES lists imports that are gone, delete them: {sorted(unknown)}"


def test_known_exceptions_are_still_cycles(graph):
    """Each known edge still closes a cycle; once it does not, its entry must go (the test above would not
    notice a cycle coming back through a new edge otherwise)."""
    for (a, b), why in KNOWN_CYCLE_EDGES.items():
        if b not in graph.get(a, ()):
            continue  # reported by test_no_import_cycles
        assert any(a in c and b in c for c in cycles(graph)), f"{a} -> {b} ({why}) closes no cycle any more"


LIBRARY_CORE = ("types", "config", "schedules", "solvers", "backbones", "inversion", "control", "merging",
                "editing", "presets", "masks", "io", "models", "worlds")  # fmt: skip
FRONT_ENDS = ("cli", "flags", "app", "bench")


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_library_never_imports_its_front_ends(graph):
    """DESIGN.md: ``cli → editing → …``; ``bench`` uses ``editing``, never the reverse; the app is a front end."""
    bad = sorted(
        f"{m} -> {d}" for m, deps in graph.items() if _top(m) in LIBRARY_CORE for d in deps if _top(d) in FRONT_ENDS
    )
    assert not bad, "library modules import a front end:\n" + "\n".join(bad)


def test_only_the_command_imports_the_command_module(graph):
    """``retouch.cli`` is the top: nothing in the package imports it (``retouch bench`` shares ``retouch.flags``)."""
    bad = sorted(m for m, deps in graph.items() if "retouch.cli" in deps)
    assert not bad, f"modules importing retouch.cli: {bad}"


def test_the_package_does_not_import_the_training_code():
    """The training code of the embedded models lives outside the installed package (``training/``)."""
    assert not (SRC / PACKAGE / "train").exists(), "src/retouch/train/ should live in training/"
    bad = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.relative_to(SRC)}: {n}" for n in names if n.split(".")[0] == "training"]
    assert not bad, "the installed package imports the training code:\n" + "\n".join(bad)
