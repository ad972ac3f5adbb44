"""Shared plumbing of the flow reference runners (FlowEdit, diffusers' RF-Inversion, RF-Solver-Edit, FireFlow).

Each runner takes the path of a git checkout of its reference at a named commit, copies the files it needs into a
scratch directory under /tmp, applies its plumbing patch there (listed in the runner, one reason per hunk), imports
the patched code and runs it on the embedded ``shapes-flux`` model. Nothing of the reference is written into this
repository: only fixtures (``tests/fixtures/reference/<name>/``: tensors in safetensors, settings in JSON) and
result rows (``benchmarks/results/reference/<method>.json``).

Fixture layout, one directory per reference:

* ``settings.json``: reference, commit, patch (the hunks' reasons), settings, cases (id, prompts), notes;
* ``<case_id>.safetensors``: ``init_latent`` (the model latent the reference started from, ``[1, C, h, w]``),
  ``final_latent`` (before decoding, same layout), ``traj.<i>`` (the latent after step ``i`` for a few ``i``),
  ``image`` (the decoded edit, uint8 ``[H, W, 3]``) and any noise the reference drew (``noise.<k>``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "reference"
RESULTS = ROOT / "benchmarks" / "results" / "reference"
FIXTURE_CASES = (6, 1, 8)  # ShapesBench dev split 0: a colour, an object and a background edit (indices)
FLUX = "shapes-flux"


@dataclass(frozen=True)
class Hunk:
    """One plumbing edit: a file, the exact text replaced, its replacement and why."""

    path: str
    old: str
    new: str
    reason: str
    count: int = 1  # how many occurrences must be replaced


def setup_threads() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def check_commit(checkout: Path, commit: str) -> str:
    """The checkout's HEAD, which must start with ``commit``."""
    head = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not head.startswith(commit):
        raise SystemExit(f"{checkout} is at {head}, the fixtures are for {commit}: check out that commit first")
    return head


def patched_copy(checkout: Path, files: Sequence[str], hunks: Sequence[Hunk]) -> Path:
    """Copy ``files`` of ``checkout`` into a fresh scratch dir under /tmp and apply ``hunks``; returns the dir."""
    scratch = Path(tempfile.mkdtemp(prefix="retouch-ref-", dir="/tmp"))
    for rel in files:
        dst = scratch / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout / rel, dst)
    for h in hunks:
        p = scratch / h.path
        text = p.read_text()
        found = text.count(h.old)
        if found != h.count:
            raise SystemExit(f"patch does not apply: {h.path}: expected {h.count} x {h.old!r}, found {found}")
        p.write_text(text.replace(h.old, h.new))
    return scratch


def import_path(path: Path) -> None:
    sys.path.insert(0, str(path))


def flux_folder() -> Path:
    from retouch.models.registry import resolve

    return Path(resolve(FLUX))


def fixture_cases(indices: Iterable[int] = FIXTURE_CASES) -> list[Any]:
    from retouch.bench.shapes import shapes_cases

    cases = shapes_cases(0, max(indices) + 1)
    return [cases[i] for i in indices]


def bench_cases(n: int, types: Sequence[int] = (6, 1, 8), split: int = 0) -> list[Any]:
    """ShapesBench cases for the results rows: ``n`` cases balanced over colour / object / background edits."""
    from retouch.bench.shapes import shapes_cases

    return shapes_cases(split, n, types=types)


class CallCounter:
    """Counts denoiser calls and batch items with a forward pre-hook (changes nothing)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.items = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is None:
            x = kwargs.get("img")
        self.calls += 1
        self.items += int(x.shape[0])

    def reset(self) -> None:
        self.calls = self.items = 0

    def remove(self) -> None:
        self._handle.remove()


def to_uint8(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_case(folder: Path, case_id: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(folder / f"{case_id}.safetensors", lambda p: save_file(clean, str(p)))


def write_settings(
    folder: Path,
    *,
    reference: str,
    commit: str,
    hunks: Sequence[Hunk],
    settings: dict[str, Any],
    cases: Sequence[Any],
    notes: str,
    extra: dict[str, Any] | None = None,
) -> None:
    write_json(
        folder / "settings.json",
        {
            "reference": reference,
            "commit": commit,
            "model": FLUX,
            "patch": [{"file": h.path, "reason": h.reason} for h in hunks],
            "settings": settings,
            "cases": [
                {
                    "case_id": c.case_id,
                    "index": c.index,
                    "type_id": c.type_id,
                    "source_prompt": c.source_prompt,
                    "target_prompt": c.target_prompt,
                }
                for c in cases
            ],  # fmt: skip
            "notes": notes,
            **(extra or {}),
        },
    )


def score(cases: Sequence[Any], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Edit success (the ShapesWorld oracle) and PIE-Bench's background PSNR, averaged over the cases."""
    from retouch.bench import metrics as M
    from retouch.bench.shapes import oracle_metrics

    succ, bg = [], []
    for case, img in zip(cases, images, strict=True):
        data = case.load()
        succ.append(oracle_metrics(img, data.source_scene, data.target_scene)["edit_success"])
        value = M.pie_background_metrics(data.source_image, img, data.mask.astype(bool))["psnr_bg"]
        if value is not None:  # None where the edit mask covers the whole image (PIE's "nan")
            bg.append(M.cap_psnr(value))
    return {"edit_success": float(np.mean(succ)), "bg_psnr": float(np.mean(bg)) if bg else float("nan"),
            "bg_cases": len(bg), "per_case_success": succ}  # fmt: skip


def result_row(
    *,
    method: str,
    reference: str,
    cases: Sequence[Any],
    ref: dict[str, Any],
    ours: dict[str, Any],
    notes: str,
) -> dict[str, Any]:
    both = sum(1 for a, b in zip(ref["per_case_success"], ours["per_case_success"], strict=True) if a and b)
    return {
        "method": method,
        "reference": reference,
        "model": FLUX,
        "cases": len(cases),
        "case_ids": [c.case_id for c in cases],
        "edit_success_ref": round(ref["edit_success"], 4),
        "edit_success_retouch": round(ours["edit_success"], 4),
        "edit_success_both": both,
        "bg_psnr_ref": round(ref["bg_psnr"], 3),
        "bg_psnr_retouch": round(ours["bg_psnr"], 3),
        "bg_psnr_cases": ref["bg_cases"],
        "seconds_ref": round(ref["seconds"], 4),
        "seconds_retouch": round(ours["seconds"], 4),
        "nfe_ref": ref["nfe"],
        "nfe_retouch": ours["nfe"],
        "batch_items_ref": ref.get("items"),
        "batch_items_retouch": ours.get("items"),
        "notes": notes,
    }
