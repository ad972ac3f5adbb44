"""End-to-end edits on the embedded models, judged by the ShapesWorld oracle and background PSNR.

These check what the editing methods claim on a world with ground truth, at the level the shipped models can
carry (their text-to-image accuracy is below the 90% goal; see benchmarks/results/embedded_quality.json), so
the thresholds sit below what was measured (noted at each) and above what a broken pipeline gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from retouch.backbones import load_backbone  # noqa: E402
from retouch.bench import runner  # noqa: E402
from retouch.bench.shapes import scene_facts  # noqa: E402
from retouch.config import EditConfig  # noqa: E402
from retouch.editing import edit  # noqa: E402
from retouch.io import load_image  # noqa: E402
from retouch.models import registry  # noqa: E402
from retouch.worlds import oracle  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    mse = float(np.mean((a[keep].astype(np.float64) - b[keep].astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def test_colour_edit_of_the_example_changes_only_the_named_object():
    """direct+p2p on shapes-flux: "make the yellow diamond red". The oracle reads the edited image as the
    ground-truth target (the diamond is red; its shape, size, fill, place, the background and the style stay),
    and the pixels away from the diamond keep the source's values (PSNR outside the edited region)."""
    case = next(e for e in json.loads((EXAMPLES / "examples.json").read_text()) if e["type_id"] == 6)
    bb = load_backbone(str(registry.resolve("shapes-flux")), device="cpu", dtype="fp32")
    cfg = EditConfig(
        case["source"], case["target"], method="direct+p2p", seed=0, options={"blend_words": case["blend_words"]}
    )
    out = np.asarray(edit(bb, load_image(EXAMPLES / case["image"]), cfg).image.convert("RGB"))
    src, gt = _rgb(EXAMPLES / case["image"]), _rgb(EXAMPLES / case["ground_truth"])

    s, t, p = (scene_facts(oracle.parse(x)) for x in (src, gt, out))
    assert t - s <= p and not (s - t) & p, f"edit not applied: missing {sorted(t - p)}, extra {sorted(p - t)}"
    assert s & t <= p and p <= s | t, f"something else changed: missing {sorted(t - p)}, extra {sorted(p - t)}"

    changed = np.any(src != gt, axis=-1)
    region = np.zeros_like(changed)  # the edited object and a 3-pixel margin around it
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            region |= np.roll(np.roll(changed, dy, 0), dx, 1)
    assert changed.any() and (~region).mean() > 0.8
    assert _psnr(out, src, ~region) > 27.0  # measured 31.6 dB over the 94% of pixels outside


def _bench(tmp_path: Path, model: str, methods: str, types: tuple[int, ...], cases: int, **kw) -> list[dict]:
    cfg = runner.BenchConfig(
        suite="shapes",
        methods=tuple(runner.MethodSpec(m) for m in methods.split(",")),
        out=str(tmp_path / model),
        model=model,
        cases=cases,
        types=types,
        save_images=False,
        **kw,
    )
    folder = runner.run(cfg)
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def _mean(rows: list[dict], method: str, metric: str) -> float:
    vals = [r["metrics"][metric] for r in rows if r["method"] == method]
    assert vals and all(v is not None for v in vals)
    return float(np.mean(vals))


def test_direct_inversion_reconstructs_the_source_and_keeps_the_background_as_well_as_ddim(tmp_path):
    """Held-out ShapesBench colour and object edits (types 6 and 1) on shapes-sd, 25 steps, P2P: Direct
    Inversion's exact source branch reconstructs the source far better than DDIM inversion under CFG 7.5, and
    the background outside the edit mask comes out level with DDIM inversion's (measured on 40 such cases:
    30.1 vs 30.2 dB). On the four-phase model, which drew most captions wrong, Direct Inversion kept it 2.7 dB
    better (docs/results.md); the six-phase model's DDIM inversion drifts less."""
    rows = _bench(tmp_path, "shapes-sd", "direct+p2p,ddim+p2p", (1, 6), 10, steps=25)
    assert not [r["error"] for r in rows if r["error"]]
    assert _mean(rows, "direct+p2p", "recon_psnr") > _mean(rows, "ddim+p2p", "recon_psnr") + 3
    direct, ddim = _mean(rows, "direct+p2p", "psnr_bg"), _mean(rows, "ddim+p2p", "psnr_bg")
    assert abs(direct - ddim) < 1.0, (direct, ddim)  # measured on these 10: 29.0 vs 29.3 dB
    assert _mean(rows, "direct+p2p", "edit_success") >= 0.5  # the six-phase model makes most of these edits


def test_colour_edits_on_held_out_cases_are_judged_successful_by_the_oracle(tmp_path):
    """direct+p2p on shapes-flux, 12 held-out colour edits: the oracle finds the asked colour change applied
    and everything else kept in a share of cases (measured on 20 cases: 80% applied, 65% both), and the
    background stays close to the source (measured 34.3 dB)."""
    rows = _bench(tmp_path, "shapes-flux", "direct+p2p", (6,), 12)
    assert not [r["error"] for r in rows if r["error"]]
    assert _mean(rows, "direct+p2p", "edit_applied") >= 0.4
    assert _mean(rows, "direct+p2p", "edit_success") >= 0.2
    assert _mean(rows, "direct+p2p", "psnr_bg") > 28.0
