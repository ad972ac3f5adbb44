"""The result files: scale_<model>.json folded atomically (same key replaces)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retouch.io import save_json


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`retouch.io.save_json`: temporary file, then rename)."""
    save_json(payload, path)


def _entry_key(e: Mapping[str, Any]) -> tuple:
    return (tuple(e.get("size_hw", ())), e.get("blocks", {}).get("used"), e.get("device"), e.get("dtype"))


def _run_key(r: Mapping[str, Any]) -> tuple:
    return (
        tuple(r.get("size_hw", ())), r.get("blocks", {}).get("used"), r.get("method"), r.get("merge_ratio"),
        r.get("device"),
    )  # fmt: skip


def merge_results(
    path: Path, model: str, machine: Mapping[str, Any], entries: Sequence[Mapping], edit_runs: Sequence[Mapping]
) -> dict[str, Any]:
    """Fold new entries / edit runs into ``scale_<model>.json`` (same key replaces), write it atomically."""
    old: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            old = json.loads(path.read_text())
    kept_entries = [e for e in old.get("entries", []) if _entry_key(e) not in {_entry_key(n) for n in entries}]
    kept_runs = [r for r in old.get("edit_runs", []) if _run_key(r) not in {_run_key(n) for n in edit_runs}]
    payload = {
        "benchmark": "scale",
        "model": model,
        "description": (
            "per-NFE latency / peak memory of plain sampling vs editing presets vs presets + token merging, "
            "attention-control overhead, merging speed-up, peak memory vs steps; real configs, random weights"
        ),
        "machine": dict(machine),
        **({"notes": old["notes"]} if old.get("notes") else {}),  # provenance written by hand: kept
        "entries": [*kept_entries, *entries],
        "edit_runs": [*kept_runs, *edit_runs],
    }
    write_json(path, payload)
    return payload
