"""One evaluator for both suites: every metric of one (case, edit), with a reason for each missing one.

Metric keys of a row (raw values; PIE's tables print some scaled, see :data:`METRIC_INFO`):

==============================  =============================================================================
``structure_distance``          PIE: DINO ViT-B/8 keys self-similarity MSE, PIE's 0..255 input (official).
                                ShapesBench: the same formula on shapes-clip's vision tower (last layer keys,
                                processor-normalised input) — no hub weights.
``structure_distance_corrected`` PIE only: DINO with the input scaled to [0, 1] before ImageNet normalisation.
``psnr_bg`` ``mse_bg`` ``ssim_bg`` PIE's background metrics on masked full frames (official, quirk included).
``lpips_bg``                    LPIPS-SqueezeNet on the masked full frames mapped to [-1, 1] (official).
``psnr_bg_corrected``           PSNR / MSE over the background pixels only.
``mse_bg_corrected``
``clip_whole``                  100·max(cos, 0) of the edit and the target prompt (PIE: CLIP ViT-L/14;
                                ShapesBench: shapes-clip).
``clip_edited``                 the same on ``uint8(edit · mask)`` (outside of the edit region blacked out).
``clip_source``                 the source image and the source prompt (PIE computes it, its table omits it).
``edit_success`` ...            ShapesBench's oracle (see :mod:`retouch.bench.shapes`).
``gt_psnr``                     PSNR of the edit against the rendered ground-truth target (whole frame).
``recon_psnr``                  PSNR of the source branch's reconstruction against the source.
==============================  =============================================================================

The background metrics are ``None`` with the note "nan" when the mask covers the whole frame (PIE's rule).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retouch.bench import metrics as M
from retouch.bench.cases import BenchCase, CaseData
from retouch.bench.learned import ClipScorer, DinoStructure, LpipsScorer

log = logging.getLogger(__name__)

__all__ = ["METRIC_INFO", "NAN_NOTE", "Evaluator", "SUMMARY_METRICS"]

NAN_NOTE = "nan: the edit mask covers the whole image, so there is no background (PIE-Bench writes 'nan')"

METRIC_INFO: dict[str, dict[str, Any]] = {
    "structure_distance": {"label": "Structure dist.", "scale": 1e3, "better": "lower"},
    "structure_distance_corrected": {"label": "Structure dist. (input in [0,1])", "scale": 1e3, "better": "lower"},
    "psnr_bg": {"label": "PSNR bg", "scale": 1, "better": "higher"},
    "lpips_bg": {"label": "LPIPS bg", "scale": 1e3, "better": "lower"},
    "mse_bg": {"label": "MSE bg", "scale": 1e4, "better": "lower"},
    "ssim_bg": {"label": "SSIM bg", "scale": 1e2, "better": "higher"},
    "psnr_bg_corrected": {"label": "PSNR bg-only", "scale": 1, "better": "higher"},
    "mse_bg_corrected": {"label": "MSE bg-only", "scale": 1e4, "better": "lower"},
    "clip_whole": {"label": "CLIP whole", "scale": 1, "better": "higher"},
    "clip_edited": {"label": "CLIP edited", "scale": 1, "better": "higher"},
    "clip_source": {"label": "CLIP source", "scale": 1, "better": "higher"},
    "edit_success": {"label": "Edit success", "scale": 1e2, "better": "higher"},
    "edit_applied": {"label": "Edit applied", "scale": 1e2, "better": "higher"},
    "edit_preserved": {"label": "Rest preserved", "scale": 1e2, "better": "higher"},
    "oracle_source_ok": {"label": "Oracle reads source", "scale": 1e2, "better": "higher"},
    "gt_psnr": {"label": "PSNR to GT", "scale": 1, "better": "higher"},
    "recon_psnr": {"label": "Recon. PSNR", "scale": 1, "better": "higher"},
    "seconds": {"label": "Seconds", "scale": 1, "better": "lower"},
    "nfe": {"label": "NFE", "scale": 1, "better": "lower"},
}
"""Every metric key: table label, the scale PIE's tables print it at (×10³ etc.; values are stored raw), and
which direction is better."""

SUMMARY_METRICS: tuple[str, ...] = tuple(METRIC_INFO)


@dataclass
class Evaluator:
    """Computes a row's metrics. Components that are ``None`` give ``None`` values with the note in ``missing``.

    Args:
        structure: ``(source, edited) -> distance`` (official variant).
        structure_corrected: the corrected variant, or ``None`` when the suite has none.
        clip: CLIP scorer for ``clip_whole`` / ``clip_edited`` / ``clip_source``.
        lpips: LPIPS scorer for ``lpips_bg``.
        oracle: ShapesBench's oracle metrics (needs the scenes of the case).
        missing: metric key -> why it is not computed (added to every row).
    """

    structure: Callable[[np.ndarray, np.ndarray], float] | None = None
    structure_corrected: Callable[[np.ndarray, np.ndarray], float] | None = None
    clip: ClipScorer | None = None
    lpips: LpipsScorer | None = None
    oracle: bool = False
    missing: dict[str, str] = field(default_factory=dict)
    structure_name: str | None = None
    _case_cache: tuple[str, dict[str, Any]] | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_pie(
        cls,
        *,
        skip_learned: bool = False,
        dino: str = "facebook/dino-vitb8",
        clip: str = "openai/clip-vit-large-patch14",
        lpips: bool = True,
        device: str | None = None,
    ) -> Evaluator:
        """PIE-Bench's metrics. Loads DINO, CLIP and LPIPS now, so that missing weights fail before any edit."""
        if skip_learned:
            why = "skipped (--skip-learned)"
            return cls(
                missing={
                    k: why
                    for k in (
                        "structure_distance",
                        "structure_distance_corrected",
                        "lpips_bg",
                        "clip_whole",
                        "clip_edited",
                        "clip_source",
                    )
                }  # fmt: skip
            )
        ev = cls()
        dino_model = DinoStructure.from_pretrained(dino, device=device)
        ev.structure = lambda a, b: dino_model.distance(a, b, unit_range=False)
        ev.structure_corrected = lambda a, b: dino_model.distance(a, b, unit_range=True)
        ev.structure_name = f"{dino} keys self-similarity (layer {dino_model.keys.layer})"
        ev.clip = ClipScorer.from_pretrained(clip, device=device)
        if lpips:
            ev.lpips = LpipsScorer.load("squeeze", device=device)
        else:
            ev.missing["lpips_bg"] = "skipped (--no-lpips)"
        return ev

    @classmethod
    def for_shapes(
        cls,
        *,
        clip: str | None,
        skip_learned: bool = False,
        lpips: bool = False,
        device: str | None = None,
    ) -> Evaluator:
        """ShapesBench: hub-free metrics, shapes-clip when installed (else noted), LPIPS only when asked."""
        ev = cls(oracle=True)
        ev.missing["structure_distance_corrected"] = "PIE-only variant (DINO input range)"
        clip_keys = ("clip_whole", "clip_edited", "clip_source", "structure_distance")
        if skip_learned:
            for k in clip_keys:
                ev.missing[k] = "skipped (--skip-learned)"
        elif clip is None:
            for k in clip_keys:
                ev.missing[k] = (
                    "shapes-clip is not installed (no src/retouch/models/embedded/shapes-clip); pass --clip-model"
                )
        else:
            scorer = ClipScorer.from_pretrained(clip, device=device, what="ShapesBench CLIP score (shapes-clip)")
            ev.clip = scorer
            ev.structure = scorer.structure_distance
            ev.structure_name = f"{clip} vision keys self-similarity (last layer)"
        if lpips and not skip_learned:
            ev.lpips = LpipsScorer.load("squeeze", device=device)
        else:
            ev.missing["lpips_bg"] = "LPIPS needs hub weights (SqueezeNet + LPIPS layers); pass --lpips to compute it"
        return ev

    def describe(self) -> dict[str, Any]:
        """What computes each learned metric (written into summary.json)."""
        return {
            "structure": self.structure_name,
            "clip": self.clip.name if self.clip is not None else None,
            "lpips": self.lpips.name if self.lpips is not None else None,
            "oracle": self.oracle,
            "missing": dict(self.missing),
        }

    def _per_case(self, case: BenchCase, data: CaseData) -> dict[str, Any]:
        """Metrics of the case alone (computed once per case, shared by every method)."""
        if self._case_cache is not None and self._case_cache[0] == case.case_id:
            return self._case_cache[1]
        out: dict[str, Any] = {}
        if self.clip is not None:
            out["clip_source"] = self.clip.score(data.source_image, case.source_prompt)
        if self.oracle and data.source_scene is not None:
            from retouch.bench.shapes import oracle_source_ok

            out["oracle_source_ok"] = oracle_source_ok(data.source_image, data.source_scene)
        self._case_cache = (case.case_id, out)
        return out

    def evaluate(
        self,
        case: BenchCase,
        data: CaseData,
        edited: np.ndarray,
        reconstruction: np.ndarray | None = None,
    ) -> tuple[dict[str, float | None], dict[str, str]]:
        """All metrics of one edit; returns ``(metrics, notes)`` where notes explain every ``None``."""
        src, edt, mask = data.source_image, M.as_uint8(edited), data.mask
        values: dict[str, float | None] = {}
        notes: dict[str, str] = dict(self.missing)
        background = not bool(mask.all())

        official = M.pie_background_metrics(src, edt, mask)
        values["psnr_bg"] = M.cap_psnr(official["psnr_bg"])
        values["mse_bg"] = official["mse_bg"]
        values["ssim_bg"] = official["ssim_bg"]
        corrected = M.background_only_metrics(src, edt, mask)
        values["psnr_bg_corrected"] = M.cap_psnr(corrected["psnr_bg_corrected"])
        values["mse_bg_corrected"] = corrected["mse_bg_corrected"]
        if self.lpips is not None:
            if background:
                keep = (~mask).astype(np.float32)
                a, b = M.to_unit_tensor(src, keep), M.to_unit_tensor(edt, keep)
                values["lpips_bg"] = self.lpips(a * 2 - 1, b * 2 - 1)
            else:
                values["lpips_bg"] = None
        if not background:
            for k in ("psnr_bg", "mse_bg", "ssim_bg", "psnr_bg_corrected", "mse_bg_corrected", "lpips_bg"):
                if k not in self.missing:
                    notes[k] = NAN_NOTE

        if self.structure is not None:
            values["structure_distance"] = self.structure(src, edt)
        if self.structure_corrected is not None:
            values["structure_distance_corrected"] = self.structure_corrected(src, edt)

        values.update(self._per_case(case, data))
        if self.clip is not None:
            values["clip_whole"] = self.clip.score(edt, case.target_prompt)
            values["clip_edited"] = self.clip.score(edt, case.target_prompt, mask=mask)

        if data.gt_image is not None:
            values["gt_psnr"] = M.cap_psnr(M.psnr_uint8(edt, data.gt_image))
        else:
            notes["gt_psnr"] = "no ground-truth target image in this data set"
        if self.oracle and data.source_scene is not None and data.target_scene is not None:
            from retouch.bench.shapes import oracle_metrics

            values.update(oracle_metrics(edt, data.source_scene, data.target_scene))
        else:
            for k in ("edit_success", "edit_applied", "edit_preserved"):
                notes[k] = "no ground-truth scene (only ShapesBench has an oracle)"
        if reconstruction is not None:
            values["recon_psnr"] = M.cap_psnr(M.psnr_uint8(M.as_uint8(reconstruction), src))

        for k, v in list(values.items()):
            values[k] = M.finite_or_none(v)
        for k in METRIC_INFO:
            if k in ("seconds", "nfe"):
                continue
            values.setdefault(k, None)
            if values[k] is None and k not in notes:
                notes[k] = "not computed"
        for k in [k for k in notes if values.get(k) is not None]:
            del notes[k]
        return values, notes
