"""Checks of a local model folder before diffusers loads it: every error names the folder and the component.

retouch loads weights from safetensors only: a component that ships only pickled weights (``*.bin``, ``*.pt``,
``*.ckpt``: unpickling runs arbitrary code) is refused, and a truncated or corrupt safetensors file is caught from
its header before anything is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelFolderError(ValueError):
    """A local model folder that cannot be loaded (one line naming the folder and the component)."""


def check_safetensors(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` has a whole safetensors header and every tensor's bytes."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path.name} is truncated ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 * 2**20:
            raise ValueError(f"{path.name} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a corrupt safetensors header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise ValueError(f"{path.name} has a corrupt safetensors header (tensor {key!r})") from None
    if 8 + n + end > size:
        raise ValueError(f"{path.name} is truncated: {size} bytes, its header needs {8 + n + end}")


def check_model_folder(folder: Path) -> None:
    """Check each component of a diffusers pipeline folder (``model_index.json``) before it is loaded."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"model folder {folder}: model_index.json is unreadable: {exc}") from None
    if not isinstance(index, dict):
        raise ModelFolderError(f"model folder {folder}: model_index.json is not a JSON object")
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise ModelFolderError(f"model folder {folder}: component {name!r} is missing (no {name}/ folder)")
        files = [p for p in sub.iterdir() if p.is_file()]
        safetensors = [p for p in files if p.suffix == ".safetensors"]
        pickled = [p for p in files if p.suffix in PICKLED]
        if pickled and not safetensors:
            raise ModelFolderError(
                f"model folder {folder}: component {name!r} has only pickled weights ({pickled[0].name}); retouch "
                "loads safetensors only (unpickling can run code): convert them to .safetensors"
            )
        for p in safetensors:
            try:
                check_safetensors(p)
            except (OSError, ValueError) as exc:
                raise ModelFolderError(f"model folder {folder}: component {name!r}: {exc}") from None
        for p in files:
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text())
                except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ModelFolderError(f"model folder {folder}: component {name!r}: {p.name} is not valid "
                                           f"JSON ({exc})") from None  # fmt: skip
