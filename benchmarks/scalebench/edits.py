"""Edit runs: retouch.editing.edit itself on a random backbone, peak memory against the number of steps."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from retouch.bench.provenance import load_average
from scalebench.fake_pipeline import build_backbone
from scalebench.meter import PeakMeter
from scalebench.nfe import bench_mask
from scalebench.specs import SOURCE_PROMPT, TARGET_PROMPT, ModelSpec, parse_size


@dataclass(frozen=True)
class EditRun:
    """``MODEL@HxW[/bBLOCKS][/METHOD][/sSTEPS,...][/mRATIO][/iITERS]``: whole edits via ``retouch.editing.edit``.

    ``iITERS`` caps the fixed-point iterations of DPM-Solver++ inversion (DiT4Edit's; 6 by default).
    """

    model: str
    size: tuple[int, int]
    blocks: str | None = None
    method: str = "ddim+p2p"
    steps: tuple[int, ...] = (2, 4, 8)
    merge: float = 0.0
    inversion_iterations: int | None = None

    @staticmethod
    def parse(text: str) -> EditRun:
        head, *parts = text.split("/")
        if "@" not in head:
            raise ValueError(f"edit run {text!r}: expected MODEL@HxW[/bBLOCKS][/METHOD][/sSTEPS,...][/mRATIO][/iN]")
        model, size = head.split("@", 1)
        kw: dict[str, Any] = {"model": model, "size": parse_size(size)}
        for part in parts:
            if re.fullmatch(r"b(full|\d+(:\d+)?)", part):
                kw["blocks"] = part[1:]
            elif re.fullmatch(r"s\d+(,\d+)*", part):
                kw["steps"] = tuple(int(s) for s in part[1:].split(","))
            elif re.fullmatch(r"m[0-9.]+", part):
                kw["merge"] = float(part[1:])
            elif re.fullmatch(r"i\d+", part):
                kw["inversion_iterations"] = int(part[1:])
            else:
                kw["method"] = part
        return EditRun(**kw)


def edit_once(
    spec: ModelSpec,
    size: tuple[int, int],
    *,
    blocks: str | None,
    method: str,
    num_steps: int,
    merge: float = 0.0,
    inversion_iterations: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """One whole edit (inversion + sampling + editor + merger) on the random backbone, with its peak memory."""
    from PIL import Image

    from retouch.config import EditConfig, InversionConfig, MergeConfig
    from retouch.editing import edit

    device = torch.device(device)
    overrides = spec.parse_blocks(blocks, size)
    bb = build_backbone(spec, overrides, device=device, dtype=dtype, seed=seed)
    meter = PeakMeter(device)
    h, w = size
    image = Image.new("RGB", (w, h), (128, 128, 128))
    options = {"blend_words": "cat dog"} if method.endswith("p2p") else {}  # P2P's local blend keeps word maps
    from retouch.presets import get_preset

    preset = get_preset(method)
    mask = None
    if preset is not None and preset.editor == "kv_edit":  # KV-Edit needs a mask; skip its 4 of 28 steps
        mask, options = bench_mask(size), {"skip": 4 / 28}
    inversion = InversionConfig() if inversion_iterations is None else InversionConfig(iterations=inversion_iterations)
    cfg = EditConfig(
        SOURCE_PROMPT, TARGET_PROMPT, method=method, num_steps=num_steps, seed=seed, options=options,
        merge=MergeConfig(ratio=merge), size_policy="strict", inversion=inversion,
    )  # fmt: skip
    load_start = load_average()
    with meter.measure() as mem:
        t = time.perf_counter()
        report = edit(bb, image, cfg, mask=mask).report  # the result (images, maps) is dropped before "retained"
        wall = time.perf_counter() - t
    used = ":".join(str(overrides.get(k, spec.config[k])) for k in spec.depth_keys) or "full"
    return {
        "model": spec.name,
        "size_hw": list(size),
        "blocks": {"used": used, "full": spec.full_blocks(), "reduced": used != spec.full_blocks()},
        "method": method,
        "options": options,
        "merge_ratio": merge,
        "inversion_iterations": inversion_iterations,
        "num_steps": report["num_steps"],
        "nfe": report["nfe"],
        "attention_calls": report["attention_calls"],
        "merge": report["merge"],
        "timings_s": report["timings"],
        "wall_s": round(wall, 2),
        "peak_memory_bytes": mem["peak_bytes"],
        "retained_bytes": mem["retained_bytes"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory": meter.method,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def summarise_steps(runs: Sequence[Mapping[str, Any]], tolerance: float = 0.05) -> dict[str, Any]:
    """Peak memory vs number of steps.

    ``flat``: the peak of the longest run is within ``tolerance`` (relative) or 64 MiB of the peak of the
    second longest. The shortest runs are not the reference on purpose: an editor's schedule is in fractions
    of the steps, so a short run may skip a whole phase (P2P replaces self-attention maps during 40 % of the
    steps: none of 2), and its lower peak says nothing about accumulation. ``growth`` is longest / shortest.
    """
    ok = sorted((r for r in runs if r.get("peak_memory_bytes") is not None), key=lambda r: r["num_steps"])
    if len(ok) < 2:
        return {"growth": None, "flat": None}
    first, prev, last = ok[0]["peak_memory_bytes"], ok[-2]["peak_memory_bytes"], ok[-1]["peak_memory_bytes"]
    flat = last <= prev * (1 + tolerance) or last - prev <= 64 * 2**20
    return {
        "steps": [r["num_steps"] for r in ok],
        "peaks_bytes": [r["peak_memory_bytes"] for r in ok],
        "materialised_calls": [r.get("attention_calls", {}).get("materialised") for r in ok],
        "growth": last / first if first else None,
        "growth_last": last / prev if prev else None,
        "flat": bool(flat),
        "tolerance": f"{tolerance:.0%} or 64 MiB between the two longest runs",
    }
