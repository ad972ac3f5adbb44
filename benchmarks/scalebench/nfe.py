"""Per-NFE timing: plain, routed, each preset's editor at its worst step, with and without token merging."""

from __future__ import annotations

import logging
import resource
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from retouch.bench.provenance import load_average
from scalebench.fake_pipeline import build_backbone
from scalebench.meter import PeakMeter, _sync
from scalebench.specs import OVERHEAD_TARGET, SOURCE_PROMPT, TARGET_PROMPT, ModelSpec

log = logging.getLogger("scale")


def bench_mask(size_hw: tuple[int, int]) -> Any:
    """The mask KV-Edit is timed with: a centred rectangle of half the height and width (a quarter of the
    image may change)."""
    import numpy as np

    h, w = size_hw
    m = np.zeros((h, w), np.float32)
    m[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 1.0
    return m


def _mask_editor(editor: Any) -> bool:
    """Editors built on a mask (KV-Edit) take it through ``set_mask``."""
    return bool(getattr(editor, "needs_mask", False))


@dataclass
class Variant:
    """One timed configuration of an NFE."""

    name: str
    preset: str | None  # None: no editor
    install: bool  # False: diffusers' own processors (plain)
    merge_ratio: float = 0.0
    step: int = 0
    phase: str = "worst"  # "worst" | "phase<i>" (--phases) | "-"
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def step_signatures(editor: Any, backbone: Any, num_steps: int, latent_hw: tuple[int, int], layout: Any) -> list:
    """For each sampling step, the set of ``(layer, needs_probs)`` the editor acts on (its own policy)."""
    from retouch.control.context import AttnContext

    infos = backbone.attention_layers()
    out = []
    for step in range(num_steps):
        active = set()
        for name, info in infos.items():
            ctx = AttnContext(
                layer=info, step=step, num_steps=num_steps, phase="sample", layout=layout, latent_hw=latent_hw
            )
            if editor.applies(ctx):
                active.add((name, bool(editor.needs_probs(ctx))))
        out.append(frozenset(active))
    return out


@dataclass
class PresetPlan:
    """A preset resolved for one backbone: its editor, grid, guidance and sampling schedule."""

    name: str
    resolved: Any
    editor: Any
    grid: Any
    signatures: list
    worst: int

    @property
    def active_steps(self) -> int:
        return sum(1 for s in self.signatures if s)

    def phases(self) -> list[tuple[int, int]]:
        """Distinct non-empty schedule phases as ``(first step, number of steps)``."""
        seen: dict[frozenset, list[int]] = {}
        for i, s in enumerate(self.signatures):
            if s:
                seen.setdefault(s, []).append(i)
        return [(steps[0], len(steps)) for steps in seen.values()]


def plan_preset(backbone: Any, preset: str, latent_hw: tuple[int, int]) -> PresetPlan:
    from retouch.config import EditConfig
    from retouch.control import BatchLayout
    from retouch.control.editors import get_editor
    from retouch.editing import resolve

    res = resolve(backbone, EditConfig(SOURCE_PROMPT, TARGET_PROMPT, method=preset))
    editor = get_editor(res.editor, backbone.family).build(backbone, res.config, dict(res.config.options))
    if _mask_editor(editor):
        from retouch.masks import to_latent

        f = backbone.vae_scale_factor
        editor.set_mask(to_latent(bench_mask((latent_hw[0] * f, latent_hw[1] * f)), latent_hw, backbone.device))
    grid = backbone.grid(res.solver.grid, res.num_steps, latent_hw)
    cfg = backbone.uses_cfg and res.guidance != 1.0
    sigs = step_signatures(editor, backbone, res.num_steps, latent_hw, BatchLayout(branches=2, cfg=cfg))
    worst = max(range(len(sigs)), key=lambda i: (sum(p for _, p in sigs[i]), len(sigs[i]), -i))
    return PresetPlan(preset, res, editor, grid, sigs, worst)


def time_nfes(
    spec: ModelSpec,
    size: tuple[int, int],
    *,
    blocks: str | None = None,
    presets: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.5, 0.75),
    nfe: int = 1,
    warmup: int = 1,
    phases: bool = False,
    statistic: str = "min",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Time NFEs of every variant (module docstring) for one model at one size; returns one results entry.

    ``statistic``: how the timed NFEs of a variant are summarised, ``"min"`` (default: background load only
    ever adds time, so the fastest call is the best estimate of the cost) or ``"median"``.
    """
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    summarise = min if statistic == "min" else statistics.median
    from retouch.config import EditConfig, MergeConfig
    from retouch.control import attention_editing
    from retouch.editing import GuidedModel, make_merger

    device = torch.device(device)
    t_start = time.perf_counter()
    load_start = load_average()
    overrides = spec.parse_blocks(blocks, size)
    t0 = time.perf_counter()
    bb = build_backbone(spec, overrides, device=device, dtype=dtype, seed=seed)
    build_s = time.perf_counter() - t0
    bb.size_policy.check(*size)
    meter = PeakMeter(device)
    h, w = size
    f = bb.vae_scale_factor
    latent_hw = (h // f, w // f)
    presets = list(spec.presets if presets is None else presets)
    plans = {p: plan_preset(bb, p, latent_hw) for p in presets}

    with torch.no_grad():
        cond = bb.encode_prompt([SOURCE_PROMPT, TARGET_PROMPT], image_size=size)
        uncond = bb.encode_prompt(["", ""], image_size=size) if bb.uses_cfg else None
    x = torch.randn(2, bb.latent_channels, *latent_hw, generator=torch.Generator().manual_seed(seed)).to(device)
    ref = plans[presets[0]] if presets else None
    ref_grid = ref.grid if ref else bb.grid("flow" if bb.prediction.value == "flow" else "ddim", 20, latent_hw)
    ref_guidance = ref.resolved.guidance if ref else bb.default_guidance

    variants = [Variant("plain", None, install=False), Variant("routed", None, install=True, phase="-")]
    for p, plan in plans.items():
        variants.append(Variant(p, p, install=True, step=plan.worst))
        if phases:
            for i, (first, _count) in enumerate(plan.phases()):
                if first != plan.worst:
                    variants.append(Variant(f"{p}@step{first}", p, install=True, step=first, phase=f"phase{i}"))
    for r in ratios:
        for p, plan in plans.items():
            if _mask_editor(plan.editor):  # KV-Edit caches per image token: token merging does not apply
                continue
            variants.append(Variant(f"{p}+merge{r:g}", p, install=True, merge_ratio=r, step=plan.worst))
    if ratios:
        variants.append(Variant(f"merge{max(ratios):g}", None, install=True, merge_ratio=max(ratios), phase="-"))

    def run(v: Variant, record: bool) -> None:
        plan = plans.get(v.preset) if v.preset else None
        grid = plan.grid if plan else ref_grid
        guidance = plan.resolved.guidance if plan else ref_guidance
        num_steps = grid.num_steps
        merger = None
        if v.merge_ratio > 0:
            cfg = EditConfig(SOURCE_PROMPT, TARGET_PROMPT, merge=MergeConfig(ratio=v.merge_ratio), seed=seed)
            merger = make_merger(bb, cfg)
        with ExitStack() as stack, torch.no_grad():
            state = None
            if v.install:
                editor = plan.editor if plan else None
                state = stack.enter_context(attention_editing(bb, editor, merger=merger))
                state.num_steps, state.phase, state.step = num_steps, "sample", v.step
                if editor is not None:
                    stack.enter_context(editor.install(bb, state))
                if _mask_editor(editor) and not getattr(editor, "inversion_free", True):  # fill KV-Edit's cache
                    state.phase = "invert"
                    inv_guidance = plan.resolved.config.inversion.guidance
                    inv_uncond = uncond.select([0]) if uncond is not None else None
                    GuidedModel(bb, grid, cond.select([0]), inv_uncond, inv_guidance, state)(x[:1], grid.at(v.step))
                    state.phase, state.calls = "sample", 0
            model = GuidedModel(bb, grid, cond, uncond, guidance, state)
            with meter.measure() as mem:
                _sync(device)
                t = time.perf_counter()
                pred = model(x, grid.at(v.step))
                _sync(device)
                elapsed = time.perf_counter() - t
            if not record:
                return
            v.times.append(elapsed)
            if mem["peak_bytes"] is not None:
                v.peaks.append(int(mem["peak_bytes"]))
            v.extra = {
                "batch_rows": int(x.shape[0] * (2 if model.cfg else 1)),
                "cfg": model.cfg,
                "finite": bool(torch.isfinite(pred.x0).all()),
                "attention_calls": state.calls if state else None,
                "materialised_calls": state.prob_calls if state else None,
                "block_calls": state.block_calls if state else None,
                "merge": merger.report() if merger is not None else None,
            }
        log.info("  %-28s %8.2fs  (load %s)", v.name, elapsed, load_average())

    for i in range(warmup):  # the first calls pay one-off costs (allocator growth, kernel selection)
        run(variants[0] if i == 0 else variants[i % len(variants)], record=False)
    for rep in range(nfe):  # round-robin, alternating direction (ABBA): a drifting background load cancels out
        for v in variants if rep % 2 == 0 else variants[::-1]:
            run(v, record=True)

    by_name = {v.name: v for v in variants}

    def secs(name: str) -> float:
        return summarise(by_name[name].times)

    def peak(name: str) -> int | None:
        return max(by_name[name].peaks) if by_name[name].peaks else None

    t_plain, t_routed = secs("plain"), secs("routed")
    rows = []
    for v in variants:
        plan = plans.get(v.preset) if v.preset else None
        rows.append(
            {
                "name": v.name,
                "preset": v.preset,
                "editor": plan.resolved.editor if plan else None,
                "merge_ratio": v.merge_ratio,
                "step": v.step if plan else None,
                "phase": v.phase,
                "seconds_per_nfe": secs(v.name),
                "seconds_per_nfe_median": statistics.median(v.times),
                "times_s": [round(t, 4) for t in v.times],
                "peak_memory_bytes": peak(v.name),
                "vs_plain": secs(v.name) / t_plain,
                **v.extra,
            }
        )
    overheads = []
    for p, plan in plans.items():
        t_edit = secs(p)
        n, active = len(plan.signatures), plan.active_steps
        bound = (active * t_edit + (n - active) * t_routed) / (n * t_plain)
        exact = None
        if phases:
            total = (n - active) * t_routed
            for first, count in plan.phases():
                name = p if first == plan.worst else f"{p}@step{first}"
                total += count * secs(name)
            exact = total / (n * t_plain)
        sig = plan.signatures[plan.worst]
        p_plain, p_edit = peak("plain"), peak(p)
        overheads.append(
            {
                "preset": p,
                "editor": plan.resolved.editor,
                "worst_step": plan.worst,
                "num_steps": n,
                "active_steps": active,
                "layers_touched": len(sig),
                "layers_materialised": sum(1 for _, pr in sig if pr),
                "attention_layers": len(bb.attention_layers()),
                "overhead": t_edit / t_plain,
                "routing_overhead": t_routed / t_plain,
                "run_overhead_bound": bound,
                "run_overhead": exact,
                "memory_ratio": (p_edit / p_plain) if p_plain and p_edit is not None else None,
                "target": OVERHEAD_TARGET,
                "met": t_edit / t_plain <= OVERHEAD_TARGET,
            }
        )
    merging = []
    for r in ratios:
        for p in [*plans, None]:
            name = f"{p}+merge{r:g}" if p else f"merge{r:g}"
            if name not in by_name:
                continue
            base = p or "plain"
            m = by_name[name].extra.get("merge") or {}
            p_base, p_m = peak(base), peak(name)
            merging.append(
                {
                    "preset": p,
                    "requested_ratio": r,
                    "applied_ratio": m.get("applied_ratio"),
                    "merged_calls": m.get("merged_calls"),
                    "speedup": secs(base) / secs(name),
                    "memory_ratio": (p_m / p_base) if p_base and p_m is not None else None,
                }
            )
    full = spec.full_blocks()
    used = ":".join(str(overrides.get(k, spec.config[k])) for k in spec.depth_keys) or "full"
    tokens_hw = (latent_hw[0] // _patch(spec), latent_hw[1] // _patch(spec))
    return {
        "model": spec.name,
        "family": spec.family,
        "reference": spec.reference,
        "size_hw": list(size),
        "latent_hw": list(latent_hw),
        "image_tokens": tokens_hw[0] * tokens_hw[1],
        "text_tokens": spec.text[0],
        "blocks": {"used": used, "full": full, "reduced": used != full},
        "parameters": sum(p.numel() for p in bb.denoiser.parameters()),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "nfe_timed": nfe,
        "warmup": warmup,
        "timing": f"{statistic} wall time of the timed NFEs; variants interleaved round-robin (alternating "
        "direction) after the warm-up",
        "statistic": statistic,
        "peak_memory": meter.method,
        "build_s": round(build_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "variants": rows,
        "overheads": overheads,
        "merging": merging,
    }


def _patch(spec: ModelSpec) -> int:
    return {"sd": 1, "pixart": 2, "sd3": 2, "flux": 2, "qwenimage": 2, "sana": 1, "flux2": 1, "zimage": 2}[spec.family]
