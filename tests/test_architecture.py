"""Architecture rules read from the source (no model runs): family knowledge stays in ``backbones/``, the editing
loop does not probe editors, and control never imports the editing layer (import cycles:
``test_architecture_imports.py``, whose import graph this file reads too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from test_architecture_imports import import_graph

SRC = Path(__file__).resolve().parents[1] / "src" / "retouch"

# outside backbones/: the algorithms and the composition point
FAMILY_FREE = [*sorted((SRC / "control").glob("*.py")), *sorted((SRC / "inversion").glob("*.py"))] + [
    SRC / "editing.py",
    SRC / "guided.py",
    SRC / "masks.py",
    SRC / "flowedit.py",
    SRC / "presets.py",
    SRC / "solvers.py",
]
# the family-independent parts of backbones/ (the interface, memory estimates, folder checks)
GENERIC_BACKBONE_MODULES = {"retouch.backbones.base", "retouch.backbones.memory", "retouch.backbones.checks"}
# modules below the editing layer: they may not import it, not even inside a function
LOWER = ("retouch.control", "retouch.inversion", "retouch.backbones", "retouch.guided", "retouch.solvers",
         "retouch.schedules", "retouch.types", "retouch.masks", "retouch.flowedit")  # fmt: skip
UPPER = ("retouch.editing", "retouch.mixing_weights", "retouch.cli", "retouch.bench", "retouch.app")


FAMILY_TEST = re.compile(r"""family\s*(==|!=)\s*["']|family\s+(not\s+)?in\s*[(\[{]\s*["']""")


@pytest.mark.parametrize("path", FAMILY_FREE, ids=lambda p: str(p.relative_to(SRC)))
def test_no_family_tests_or_diffusers_models_outside_backbones(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    tests = [line.strip() for line in text.splitlines() if FAMILY_TEST.search(line)]
    assert not tests, f"{path.name} tests the model family (declare it in the backbone adapter): {tests}"
    imports = _all_imports(path)
    diffusers = [i for i in imports if i.split(".")[0] == "diffusers"]
    assert not diffusers, f"{path.name} imports diffusers ({diffusers}); only backbones/ knows diffusers"
    adapters = [i for i in imports if i.startswith("retouch.backbones.") and i not in GENERIC_BACKBONE_MODULES]
    assert not adapters, f"{path.name} imports a family adapter ({adapters}); use the Backbone interface"


def _all_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append(node.module or "")
    return out


def test_family_pattern_catches_what_it_should() -> None:
    bad = ['if backbone.family == "sd":', "x = family != 'flux'", 'if family in ("sd", "pixart"):']
    ok = ["if backbone.family not in preset.families:", "family = backbone.family"]
    assert all(FAMILY_TEST.search(s) for s in bad)
    assert not any(FAMILY_TEST.search(s) for s in ok)


def test_lower_layers_never_import_the_editing_layer() -> None:
    graph = import_graph(SRC.parent, "retouch")  # every import, function-level ones too
    bad = sorted(
        (m, i) for m, deps in graph.items() if m.startswith(LOWER) for i in deps if i.startswith(UPPER)
    )  # fmt: skip
    assert not bad, f"imports from below the editing layer into it: {bad}"


def test_the_loop_does_not_probe_editors() -> None:
    """``editing.py``, the installer and ``compose.py`` call the declared hooks (control/contract.py)."""
    probe = re.compile(r"""(hasattr|getattr)\(\s*(editor|e|model|state|hook|fn)\b""")
    for name in ("editing.py", "control/installer.py", "control/compose.py"):
        lines = [ln.strip() for ln in (SRC / name).read_text(encoding="utf-8").splitlines() if probe.search(ln)]
        assert not lines, f"{name} probes for hooks: {lines}"
