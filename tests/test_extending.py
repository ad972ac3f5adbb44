"""docs/extending.md runs as written (its Python blocks, per section, on tiny models), the tables it tells a new
family to join exist, and the README and docs link only to files of the repository."""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def sections(text: str) -> dict[str, str]:
    """``{"## heading": body}`` of a markdown page, split at its second-level headings."""
    parts = re.split(r"^(## .+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def python_blocks(body: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(body)]


def run_blocks(heading: str) -> dict:
    body = sections(DOC.read_text())[heading]
    blocks = python_blocks(body)
    assert blocks, f"{heading} has no Python example"
    # a module of its own, as a user's file would be (dataclasses look their module up in sys.modules)
    module = types.ModuleType("extending_doc")
    namespace: dict = module.__dict__
    sys.modules[module.__name__] = module
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name}:{heading}:block{i}", "exec"), namespace)  # noqa: S102
    finally:
        del sys.modules[module.__name__]
    return namespace


def test_the_doc_has_both_walkthroughs():
    heads = sections(DOC.read_text())
    assert {"## Adding an editor", "## Adding a backbone family"} <= set(heads)


def test_adding_an_editor_runs_as_written(monkeypatch):
    from retouch.control import editors

    monkeypatch.setitem(editors.EDITORS, "temperature", None)  # restored (removed) even if the example fails
    ns = run_blocks("## Adding an editor")
    assert "temperature" not in editors.EDITORS  # the example cleans up after itself
    # the example's assertions ran; its editor really acted on the target and nowhere else
    assert ns["soft"].image.tobytes() != ns["plain"].image.tobytes()


def test_adding_a_backbone_family_runs_as_written():
    ns = run_blocks("## Adding a backbone family")
    assert ns["ours"] is not None and ns["ours"].shape == ns["theirs"].shape


def test_the_family_checklist_names_what_exists():
    body = sections(DOC.read_text())["## Adding a backbone family"]
    checklist = body.split("### 2. Registering the family", 1)[1].split("### 3.", 1)[0]
    names = sorted(set(re.findall(r"`(retouch(?:\.\w+)+)`", checklist)))
    assert len(names) >= 8
    for dotted in names:
        module, obj = dotted, []
        while True:
            try:
                target = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, last = module.rpartition(".")
                obj.insert(0, last)
        for attr in obj:
            assert hasattr(target, attr), f"docs/extending.md names {dotted}, which does not exist"
            target = getattr(target, attr)


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repository(page):
    """Every relative link of the README and docs/ names a file of the repository (and a heading of it); the
    README has no link out of the repository."""
    text = page.read_text()
    bad = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            if page.name == "README.md":  # the README stands alone in a checkout; docs may cite papers
                bad.append(f"{target}: links outside the repository")
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)
    if page.name == "README.md":
        assert "../" not in text, "the README points outside the repository"


def test_slug_follows_github():
    assert slug("Flow references (FlowEdit, RF-Inversion, RF-Solver-Edit, FireFlow): parity with the papers' code") \
        == "flow-references-flowedit-rf-inversion-rf-solver-edit-fireflow-parity-with-the-papers-code"  # fmt: skip
    assert slug("Qwen-Image, Sana and SD3.5") == "qwen-image-sana-and-sd35"
