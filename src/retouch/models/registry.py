"""Registry of embedded models (shipped in the package) and hub ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EMBEDDED_DIR = Path(__file__).parent / "embedded"
DEFAULT_MODEL = "shapes-flux"


def embedded_dir() -> Path:
    return EMBEDDED_DIR


def embedded_names() -> list[str]:
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "model_index.json").is_file())


def embedded_info() -> list[dict[str, Any]]:
    """Every embedded folder: pipelines (loadable with ``--model``) and components such as shapes-clip."""
    out: list[dict[str, Any]] = []
    if not EMBEDDED_DIR.is_dir():
        return out
    for folder in sorted(p for p in EMBEDDED_DIR.iterdir() if p.is_dir()):
        card = folder / "README.md"
        entry: dict[str, Any] = {"name": folder.name, "path": str(folder), "card": str(card) if card.exists() else None}
        if (folder / "model_index.json").is_file():
            index = json.loads((folder / "model_index.json").read_text())
            entry.update(kind="pipeline", pipeline=index.get("_class_name"))
        elif (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            entry.update(kind="component", pipeline=None, architecture=(config.get("architectures") or [None])[0])
        else:
            continue
        out.append(entry)
    return out


WORLD_FILE = "world.json"
"""File in an embedded pipeline folder naming the ShapesWorld subset the model was trained on."""


def world_of(source: str | Path) -> dict[str, Any]:
    """The ShapesWorld subset an embedded model learned (``{"max_objects": N}``); the whole world (1–3 objects)
    when the folder says nothing (hub models, older folders)."""
    folder = resolve(str(source)) if not isinstance(source, Path) else source
    path = Path(folder) / WORLD_FILE
    world: dict[str, Any] = {"max_objects": 3}
    if path.is_file():
        world.update(json.loads(path.read_text()))
    return world


def write_world(folder: str | Path, world: dict[str, Any]) -> None:
    """Write ``world.json`` into a pipeline folder (atomically)."""
    path = Path(folder) / WORLD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(world, indent=2) + "\n")
    tmp.replace(path)


def resolve(source: str) -> Path | str:
    """An embedded name -> its folder; a local path -> that path; anything else is passed on as a hub id."""
    if source in embedded_names():
        return EMBEDDED_DIR / source
    p = Path(source).expanduser()
    if p.exists():
        return p
    return source


def default_model() -> str:
    """The embedded pipeline used when no ``--model`` is given."""
    names = embedded_names()
    if DEFAULT_MODEL in names:
        return DEFAULT_MODEL
    if names:
        return names[0]
    raise ValueError("no embedded model is installed; pass --model with a local diffusers folder or a hub id")
