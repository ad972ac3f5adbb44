"""Registry of embedded models (shipped in the package) and hub ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EMBEDDED_DIR = Path(__file__).parent / "embedded"
DEFAULT_MODEL = "shapes-sd"


def embedded_dir() -> Path:
    return EMBEDDED_DIR


def embedded_names() -> list[str]:
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "model_index.json").is_file())


def embedded_info() -> list[dict[str, Any]]:
    out = []
    for name in embedded_names():
        index = json.loads((EMBEDDED_DIR / name / "model_index.json").read_text())
        card = EMBEDDED_DIR / name / "README.md"
        out.append(
            {
                "name": name,
                "pipeline": index.get("_class_name"),
                "path": str(EMBEDDED_DIR / name),
                "card": str(card) if card.exists() else None,
            }
        )
    return out


def resolve(source: str) -> Path | str:
    """An embedded name -> its folder; a local path -> that path; anything else is passed on as a hub id."""
    if source in embedded_names():
        return EMBEDDED_DIR / source
    p = Path(source).expanduser()
    if p.exists():
        return p
    return source
