#!/usr/bin/env python
"""ShapesBench comparison of the newer editors (masks, KV-Edit, FlowEdit, DDPM inversion, LEDITS++) with the best
earlier preset of each embedded model.

For every embedded model and ShapesBench case (split ``--seed``, ``--cases`` cases balanced over the ten edit types)
each method edits the source image; ``NAME@mask`` gives the edit the case's mask (the union of the silhouettes of
the objects that change, :class:`~retouch.bench.cases.CaseData.edit_mask`; ``--dilate N`` grows it by N pixels,
as a user's brush would). Per row:

* ``edit_success`` / ``edit_applied`` / ``edit_preserved``: the ShapesWorld oracle (:mod:`retouch.bench.shapes`);
* ``psnr_out``: PSNR of the edit against the source over the pixels *outside* the mask (background-only);
  ``psnr_out_ceiling``: the same for the VAE's round trip of the source (what a method that keeps the input latent
  exactly outside the mask reaches, up to the decoder's spill across the mask's edge);
* ``psnr_in_gt``: PSNR against the rendered ground truth *inside* the mask (how well the edited region matches);
* ``nfe`` (total, mask pass included) and ``seconds`` (the whole edit on this CPU).

Methods the registry does not have (yet) or that do not support a model's family are skipped with a log line, so
the default list names the editors of issue 16 whether or not they are merged. Results:
``benchmarks/results/new_editors.json`` (rows and per-method means, written atomically after every model) and a
markdown section (``--markdown``, default ``benchmarks/results/new_editors.md``) to paste into docs/results.md.

    python benchmarks/new_editors.py                                   # defaults: three models, 10 cases
    python benchmarks/new_editors.py --models shapes-flux --methods plain,kv_edit@mask --cases 20
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("new_editors")

# The best earlier preset per model (docs/results.md: plain flow-Euler 100% on shapes-flux, direct+dit4edit's
# background on shapes-pixart, direct+masactrl 70% on shapes-sd), with and without the generic mask, then the
# issue-16 editors.
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {
    "shapes-flux": ("plain", "plain@mask", "kv_edit@mask", "kv_edit_inf@mask", "flowedit", "flowedit@mask"),
    "shapes-pixart": ("direct+dit4edit", "direct+dit4edit@mask", "kv_edit@mask", "ddpm_edit", "ledits++",
                      "flowedit_sd3"),
    "shapes-sd": ("direct+masactrl", "direct+masactrl@mask", "ddpm_edit", "ledits++", "ledits++@mask",
                  "flowedit_sd3"),
}  # fmt: skip
PLAIN = "plain"  # the identity editor on flow-Euler inversion and sampling (results.md section 3's "plain")


def _known(name: str) -> bool:
    from retouch.control.editors import EDITORS
    from retouch.presets import PRESETS

    return name == PLAIN or name in PRESETS or name in EDITORS


def _families(name: str) -> tuple[str, ...]:
    from retouch.control.editors import EDITORS
    from retouch.presets import PRESETS

    if name == PLAIN:
        return ("sd3", "flux")
    return tuple(PRESETS[name].families if name in PRESETS else EDITORS[name].families)


def parse_methods(text: str | None, model: str, family: str) -> list[tuple[str, str, bool]]:
    """``[(label, method, masked)]`` of the methods that exist and fit ``family`` (the rest are logged)."""
    items = [t.strip() for t in text.split(",") if t.strip()] if text else list(DEFAULT_METHODS.get(model, ()))
    out = []
    for item in items:
        name, _, flag = item.partition("@")
        if flag not in ("", "mask"):
            raise SystemExit(f"method {item!r}: the only suffix is @mask")
        if not _known(name):
            log.info("%s: skipping %s (not in the registry on this branch)", model, item)
            continue
        if family not in _families(name):
            log.info("%s: skipping %s (does not support the %s family)", model, item, family)
            continue
        out.append((item, name, flag == "mask"))
    return out


def _psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float | None:
    if not keep.any():
        return None
    mse = float(np.mean((a[keep].astype(np.float64) - b[keep].astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(n):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def round_trip(backbone: Any, image: np.ndarray) -> np.ndarray:
    """The VAE's round trip of an 8-bit image (encode the posterior mean, decode)."""
    from retouch import io

    with torch.no_grad():
        px = io.pil_to_tensor(Image.fromarray(image)).to(backbone.device)
        out = backbone.decode(backbone.encode_image(px)).float()
    return np.asarray(io.tensor_to_pil(out[0]))


def _config(backbone: Any, case: Any, name: str, steps: int | None) -> Any:
    import inspect

    from retouch.config import EditConfig, InversionConfig
    from retouch.control.editors import EDITORS
    from retouch.presets import PRESETS

    if name == PLAIN:
        return EditConfig(case.source_prompt, case.target_prompt, method="identity", solver="flow_euler",
                          inversion=InversionConfig(name="flow_euler"), num_steps=steps or 28)  # fmt: skip
    editor = PRESETS[name].editor if name in PRESETS else name
    options = {}
    if case.blended_word and "blend_words" in inspect.signature(EDITORS[editor].factory).parameters:
        options["blend_words"] = case.blended_word  # as the bench runner does (P2P local blend)
    return EditConfig(case.source_prompt, case.target_prompt, method=name, num_steps=steps, options=options)


def run_model(model: str, methods_text: str | None, *, cases: int, seed: int, dilate: int,
              steps: int | None, types: Sequence[int] | None) -> dict[str, Any]:  # fmt: skip
    from retouch.backbones import load_backbone
    from retouch.bench.shapes import oracle_metrics, shapes_cases
    from retouch.editing import edit
    from retouch.models import registry

    backbone = load_backbone(str(registry.resolve(model)), device="cpu", dtype="fp32")
    methods = parse_methods(methods_text, model, backbone.family)
    rows = []
    t_model = time.perf_counter()
    for case in shapes_cases(seed, cases, types=types):
        data = case.load()
        mask = _dilate(data.edit_mask, dilate)
        keep = ~mask
        ceiling = _psnr(round_trip(backbone, data.source_image), data.source_image, keep)
        for label, name, masked in methods:
            row: dict[str, Any] = {"model": model, "case_id": case.case_id, "type_id": case.type_id,
                                   "type_name": case.type_name, "method": label, "masked": masked,
                                   "mask_coverage": float(mask.mean()), "psnr_out_ceiling": ceiling}  # fmt: skip
            t0 = time.perf_counter()
            try:
                cfg = _config(backbone, case, name, steps)
                res = edit(backbone, Image.fromarray(data.source_image), cfg, mask=mask if masked else None)
            except (ValueError, TypeError, RuntimeError) as err:
                log.warning("%s / %s / %s failed: %s", model, case.case_id, label, err)
                rows.append({**row, "error": f"{type(err).__name__}: {err}"})
                continue
            seconds = time.perf_counter() - t0
            out = np.asarray(res.image.convert("RGB").resize(data.source_image.shape[1::-1], Image.Resampling.BICUBIC))
            row.update(oracle_metrics(out, data.source_scene, data.target_scene))
            row.update(
                psnr_out=_psnr(out, data.source_image, keep),
                psnr_in_gt=_psnr(out, data.gt_image, mask),
                nfe=res.report["nfe"]["total"],
                seconds=round(seconds, 3),
                steps=res.report["num_steps"],
                error=None,
            )
            rows.append(row)
            nan = float("nan")
            log.info("%s %s %-22s success %.0f  out %.1f dB (ceiling %.1f)  in-vs-GT %.1f  %d NFE  %.1f s", model,
                     case.case_id, label, row["edit_success"], row["psnr_out"] or nan, ceiling or nan,
                     row["psnr_in_gt"] or nan, row["nfe"], seconds)  # fmt: skip
    labels = [m[0] for m in methods]
    return {"model": model, "family": backbone.family, "methods": labels, "rows": rows,
            "summary": summarise(rows, labels), "wall_s": round(time.perf_counter() - t_model, 1)}  # fmt: skip


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def summarise(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        ok = [r for r in mine if not r.get("error")]
        out[label] = {
            "rows": len(mine),
            "errors": len(mine) - len(ok),
            **{
                k: _mean([r.get(k) for r in ok])
                for k in (
                    "edit_success",
                    "edit_applied",
                    "edit_preserved",
                    "psnr_out",
                    "psnr_out_ceiling",
                    "psnr_in_gt",
                    "nfe",
                    "seconds",
                )
            },  # fmt: skip
        }
    return out


def markdown(payload: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str = ".1f", scale: float = 1.0) -> str:
        return "—" if v is None else format(v * scale, fmt)

    cfg = payload["config"]
    lines = [
        "## Masks and the issue-16 editors on ShapesBench",
        "",
        f"`python benchmarks/new_editors.py {cfg['command']}` (split {cfg['seed']}, {cfg['cases']} cases balanced "
        f"over the ten edit types, masks dilated by {cfg['dilate']} px; CPU, {payload['torch_threads']} thread(s), "
        f"load average {payload['load_average']}). `@mask`: the edit is given the case's mask (the silhouettes of "
        "the objects that change). *Out* = PSNR against the source outside the mask (ceiling: the VAE's round "
        "trip there); *in vs GT* = PSNR against the ground truth inside the mask.",
        "",
    ]
    for m in payload["models"]:
        lines += [
            f"### {m['model']}",
            "",
            "| method | rows | errors | edit success % ↑ | applied % | preserved % | PSNR out ↑ (ceiling) | "
            "PSNR in vs GT ↑ | NFE | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, s in m["summary"].items():
            lines.append(
                f"| {label} | {s['rows']} | {s['errors']} | {f(s['edit_success'], '.0f', 100)} | "
                f"{f(s['edit_applied'], '.0f', 100)} | {f(s['edit_preserved'], '.0f', 100)} | "
                f"{f(s['psnr_out'], '.2f')} ({f(s['psnr_out_ceiling'], '.2f')}) | {f(s['psnr_in_gt'], '.2f')} | "
                f"{f(s['nfe'], '.0f')} | {f(s['seconds'], '.2f')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from retouch import io
    from retouch.bench.provenance import git_commit, load_average

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="shapes-flux,shapes-pixart,shapes-sd", help="comma-separated")
    parser.add_argument("--methods", default=None, help="comma-separated NAME or NAME@mask (default: per model)")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="ShapesBench split (0 = the public dev split)")
    parser.add_argument("--types", default=None, help="edit types to keep, e.g. 1,6 (default: all ten)")
    parser.add_argument("--dilate", type=int, default=0, help="grow the case masks by N pixels")
    parser.add_argument("--steps", type=int, default=None, help="override every method's steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "new_editors.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "new_editors.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("retouch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    types = [int(t) for t in args.types.split(",")] if args.types else None
    payload: dict[str, Any] = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": " ".join(argv if argv is not None else sys.argv[1:]),
        },  # fmt: skip
        "commit": git_commit(ROOT),
        "torch_threads": args.threads,
        "load_average": load_average(),
        "models": [],
    }
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        log.info("model %s", model)
        payload["models"].append(run_model(model, args.methods, cases=args.cases, seed=args.seed,
                                           dilate=args.dilate, steps=args.steps, types=types))  # fmt: skip
        io.save_json(payload, args.out)
    text = markdown(payload)
    io.atomic_write(args.markdown, lambda p: p.write_text(text + "\n", encoding="utf-8"))
    print(text)


if __name__ == "__main__":
    main()
