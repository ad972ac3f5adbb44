"""Shared plumbing of the SD-side reference runs (PnPInversion, diffusers' community null-text pipeline).

A reference is exported from a git directory at a named commit into a scratch folder (never into the project),
its plumbing edits are applied as exact string replacements (each with its reason; an edit whose text is not
found the stated number of times aborts the run: upstream changed), and the patched code runs on the embedded
``shapes-sd`` folder. Outputs are written as fixtures under ``tests/fixtures/reference/`` (safetensors + PNG +
JSON, written atomically).

Nothing here is imported by the library or by the tests; the tests read only the fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "reference"

# The fixed ShapesWorld cases every SD reference runs on: (PIE type id, seed). 64x64 images.
CASES: tuple[tuple[int, int], ...] = ((6, 1), (1, 0), (8, 1))
STEPS_KEPT = (0, 10, 25, 49)  # sampling steps whose latents (after the step) go into the fixtures


@dataclass(frozen=True)
class Edit:
    """One plumbing edit: replace ``old`` by ``new`` in ``file`` (``count`` occurrences, all of them)."""

    file: str
    old: str
    new: str
    reason: str
    count: int = 1


def export(git_dir: str | os.PathLike, commit: str, files: Sequence[str], dest: Path) -> None:
    """``git archive`` the ``files`` of ``commit`` from ``git_dir`` (bare or not) into ``dest``."""
    head = subprocess.run(
        ["git", "-C", str(git_dir), "rev-parse", f"{commit}^{{commit}}"], capture_output=True, text=True
    )
    if head.returncode != 0 or not head.stdout.strip().startswith(commit[:7]):
        raise SystemExit(f"{git_dir} does not hold commit {commit}: {head.stderr.strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(git_dir), "archive", commit, *files], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def apply_edits(root: Path, edits: Iterable[Edit]) -> list[dict[str, Any]]:
    """Apply the plumbing edits in order; returns them as a JSON-able list (recorded in the fixtures)."""
    applied = []
    for e in edits:
        path = root / e.file
        text = path.read_text()
        n = text.count(e.old)
        if n != e.count:
            raise SystemExit(f"plumbing edit not applicable ({n} matches, expected {e.count}) in {e.file}: {e.old!r}")
        path.write_text(text.replace(e.old, e.new))
        applied.append({"file": e.file, "old": e.old, "new": e.new, "reason": e.reason, "count": e.count})
    return applied


def shapes_sd_folder() -> Path:
    from retouch.models.registry import embedded_dir

    return embedded_dir() / "shapes-sd"


def latent_side(folder: Path, image_side: int = 64) -> int:
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    return image_side // 2 ** (len(cfg["block_out_channels"]) - 1)


def scaling_factor(folder: Path) -> float:
    return float(json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])


class Counter:
    """Counts denoiser calls and batch items with a forward pre-hook (changes nothing)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.items = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self.calls += 1
        self.items += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.items = 0


def case_list() -> list[Any]:
    from retouch.worlds.cases import make_edit_case

    return [make_edit_case(t, s) for t, s in CASES]


def write_image(path: Path, image: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def setup(threads: int = 1) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    sys.dont_write_bytecode = True


def case_info(case: Any) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "type_id": case.type_id,
        "seed": case.seed,
        "source_prompt": case.source_prompt,
        "target_prompt": case.target_prompt,
        "blended_word": case.blended_word,
    }
