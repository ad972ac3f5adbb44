"""One job per fresh Python process (honest peak memory): the job runner and its subprocess wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scalebench.edits import edit_once
from scalebench.nfe import time_nfes
from scalebench.specs import MODELS, _dtype

ENTRY = Path(__file__).resolve().parents[1] / "scale.py"  # the worker runs through the entry point


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job description (an NFE timing or an edit) in this process."""
    device = torch.device(job["device"])
    dtype = _dtype(job.get("dtype"), device)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.set_flush_denormal(True)  # random weights must not fall into slow denormal arithmetic
    spec = MODELS[job["model"]]
    size = tuple(job["size"])
    if job["kind"] == "nfe":
        return time_nfes(
            spec, size, blocks=job.get("blocks"), presets=job.get("presets"), ratios=job.get("ratios", (0.5, 0.75)),
            nfe=job.get("nfe", 1), warmup=job.get("warmup", 1), phases=job.get("phases", False),
            statistic=job.get("statistic", "min"), device=device, dtype=dtype,
        )  # fmt: skip
    return edit_once(
        spec, size, blocks=job.get("blocks"), method=job["method"], num_steps=job["num_steps"],
        merge=job.get("merge", 0.0), inversion_iterations=job.get("inversion_iterations"), device=device,
        dtype=dtype,
    )  # fmt: skip


def run_isolated(job: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process (honest peaks); failures come back as ``{"error": ...}``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(ENTRY), "--worker", json.dumps(job), "--worker-out", str(out)]
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s"}
        if proc.returncode != 0 or not out.exists():
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
            return {"error": why}
        return json.loads(out.read_text())
