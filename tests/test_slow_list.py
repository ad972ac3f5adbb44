"""tests/slow_tests.txt (what `make test-fast` leaves out) names tests that exist, and they are marked slow."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import SLOW_TESTS, slow_test_ids

ROOT = Path(__file__).resolve().parents[1]


def test_every_listed_slow_test_exists():
    stale = []
    for entry in sorted(slow_test_ids()):
        file, _, name = entry.partition("::")
        path = ROOT / file
        if not path.exists():
            stale.append(f"{entry}: no file {file}")
            continue
        tree = ast.parse(path.read_text())
        funcs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        funcs |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}  # re-used
        if name.split("[", 1)[0] not in funcs:
            stale.append(f"{entry}: no test {name.split('[', 1)[0]} in {file}")
    assert not stale, f"{SLOW_TESTS.name} names tests that are gone:\n" + "\n".join(stale)


class _Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.markers: list[str] = []

    def add_marker(self, marker) -> None:
        self.markers.append(marker.name)


def test_listed_tests_get_the_slow_marker_and_others_do_not():
    from conftest import pytest_collection_modifyitems

    listed = sorted(slow_test_ids())[0]
    items = [_Item(listed), _Item(f"{listed}[some-param]"), _Item("tests/test_slow_list.py::not_listed")]
    pytest_collection_modifyitems(None, items)
    assert [i.markers for i in items] == [["slow"], ["slow"], []]
