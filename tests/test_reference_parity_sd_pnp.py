"""Golden-output parity of Plug-and-Play and Pix2Pix-Zero with PnPInversion's own code on shapes-sd (issue 14).

(The Pix2Pix-Zero tests are at the end: fixtures ``.../directinversion+pix2pix-zero/``, preset
``direct+p2pzero_ref``.)

The fixtures under ``tests/fixtures/reference/pnpinversion/directinversion+pnp/`` were written by
``benchmarks/reference/pnpinversion.py --methods directinversion+pnp`` running PnPInversion's
``run_editing_pnp.py`` (cure-lab/PnPInversion @ 07f97f4, plumbing edits only, listed with their reasons in
``settings.json``) on the three ShapesWorld cases of the other SD parity tests: DDIM inversion of the source prompt
(conditional only), then 50 DDIM steps at CFG 7.5 where the source row follows the inversion latents under the
empty prompt without guidance, features of ``up_blocks.1.resnets.1``'s residual branch are injected for the first
40 steps and self-attention Q/K of the decoder (but its first transformer) for the first 25, and the target's
unconditional row is the negative prompt "ugly, blurry, black, low res, unrealistic".

``direct+pnp_ref`` is the same algorithm and must give the same latents: the tolerances are those of
``test_reference_parity_sd.py`` (float-order differences: einsum + softmax there, fused attention here, other
batch layouts, a batch of three there and four here), measured below them and printed.

``direct+pnp`` (the default, paper-described setup: the source branch under the source prompt with CFG, no
negative prompt) is a different setting of the same editor; ``test_default_departure`` measures how far its
result is from the released code's, so the departure stays a documented number (docs/methods.md) rather than an
unexplained one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from retouch.backbones import load_backbone  # noqa: E402
from retouch.config import EditConfig  # noqa: E402
from retouch.editing import edit  # noqa: E402
from retouch.worlds.cases import make_edit_case  # noqa: E402

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "pnpinversion" / "directinversion+pnp"
ATOL = 2e-4  # latents of unit scale, as test_reference_parity_sd.py
IMAGE_LEVELS = 2  # max 8-bit difference of the decoded edited image


def _settings() -> dict:
    path = FIXTURES / "settings.json"
    if not path.is_file():
        pytest.fail(f"missing fixture {path}: run benchmarks/reference/pnpinversion.py --methods directinversion+pnp")
    return json.loads(path.read_text())


def _case_ids() -> list:
    path = FIXTURES / "settings.json"
    cases = json.loads(path.read_text())["cases"] if path.is_file() else [{"case_id": "missing"}]
    return [pytest.param(c["case_id"], id=c["case_id"]) for c in cases]


@pytest.fixture(scope="module")
def sd():
    return load_backbone("shapes-sd", device="cpu", dtype="fp32")


def _compare(sd, case_id: str, method: str) -> dict:
    from safetensors.torch import load_file

    settings = _settings()
    info = next(c for c in settings["cases"] if c["case_id"] == case_id)
    case = make_edit_case(info["type_id"], info["seed"])
    assert (case.source_prompt, case.target_prompt) == (info["source_prompt"], info["target_prompt"])
    ref = load_file(str(FIXTURES / f"{case_id}.safetensors"))
    kept = settings["steps_kept"]
    steps: dict[int, torch.Tensor] = {}

    def on_step(i: int, x: torch.Tensor) -> None:
        if i in kept:
            steps[i] = x[-1:].clone()

    cfg = EditConfig(case.source_prompt, case.target_prompt, method=method, num_steps=50, guidance=7.5)
    res = edit(sd, Image.fromarray(case.source_image), cfg, keep_latents=True, on_step=on_step)
    image = np.asarray(res.image).astype(int)
    ref_image = np.asarray(Image.open(FIXTURES / f"{case_id}.png").convert("RGB")).astype(int)
    out = {
        "noise": (res.trajectory.noise - ref["noise"]).abs().max().item(),
        "steps": {k: (steps[k] - ref[f"step_{k}"]).abs().max().item() for k in kept},
        "final": (res.latents[-1:] - ref["final"]).abs().max().item(),
        "image": int(np.abs(image - ref_image).max()),
    }
    print(f"{method} {case_id}: {out}")
    return out


@pytest.mark.parametrize("case_id", _case_ids())
def test_matches_pnpinversion_pnp(sd, case_id):
    d = _compare(sd, case_id, "direct+pnp_ref")
    assert d["noise"] < ATOL
    assert all(v < ATOL for v in d["steps"].values()), d["steps"]
    assert d["final"] < ATOL, d["final"]
    assert d["image"] <= IMAGE_LEVELS


def test_default_departure(sd):
    """``direct+pnp`` (source prompt with CFG on the source branch, no negative prompt) departs from the released
    code by design: same inversion (so the same noise), then different latents."""
    case_id = _settings()["cases"][0]["case_id"]
    d = _compare(sd, case_id, "direct+pnp")
    assert d["noise"] < ATOL  # the inversion is the same
    assert d["final"] > 100 * ATOL, d  # the prompts differ: a real departure, measured (docs/methods.md)


# --- PnPInversion's Pix2Pix-Zero (run_editing_pix2pix_zero.py, directinversion+pix2pix-zero) -----------------

ZERO = FIXTURES.parent / "directinversion+pix2pix-zero"


def _zero_case_ids() -> list:
    path = ZERO / "settings.json"
    cases = json.loads(path.read_text())["cases"] if path.is_file() else [{"case_id": "missing"}]
    return [pytest.param(c["case_id"], id=c["case_id"]) for c in cases]


def _zero_run(sd, case_id: str, method: str, options: dict | None = None, **extra) -> dict:
    from safetensors.torch import load_file

    path = ZERO / "settings.json"
    if not path.is_file():
        pytest.fail(f"missing fixture {path}: run benchmarks/reference/pnpinversion.py --methods "
                    "directinversion+pix2pix-zero")  # fmt: skip
    info = next(c for c in json.loads(path.read_text())["cases"] if c["case_id"] == case_id)
    case = make_edit_case(info["type_id"], info["seed"])
    assert (case.source_prompt, case.target_prompt) == (info["source_prompt"], info["target_prompt"])
    ref = load_file(str(ZERO / f"{case_id}.safetensors"))
    cfg = EditConfig(case.source_prompt, case.target_prompt, method=method, num_steps=50, guidance=7.5, seed=1234,
                     options=options or {}, **extra)  # fmt: skip
    res = edit(sd, Image.fromarray(case.source_image), cfg, keep_latents=True)
    image = np.asarray(res.image).astype(int)
    ref_image = np.asarray(Image.open(ZERO / f"{case_id}.png").convert("RGB")).astype(int)
    out = {
        "noise": (res.trajectory.noise - ref["noise"]).abs().max().item(),
        "final": (res.latents[-1:] - ref["final"]).abs().max().item(),
        "image": int(np.abs(image - ref_image).max()),
    }
    print(f"{method} {case_id}: {out}")
    return out


@pytest.mark.parametrize("case_id", _zero_case_ids())
def test_matches_pnpinversion_pix2pix_zero(sd, case_id):
    """``direct+p2pzero_ref`` against PnPInversion's ``directinversion+pix2pix-zero`` (BLIP's caption replaced by
    the source prompt): its inverse scheduler and noise regulariser (``direct_p2pzero_released`` inversion, roll
    amounts from ``random.Random(1234)`` as its ``setup_seed``), the VAE posterior sampled from seed 1234, the
    caption as negative prompt, the "add-source" offsets and the released guidance step. Same tolerances as the
    other PnPInversion parity tests (float-order differences only)."""
    d = _zero_run(sd, case_id, "direct+p2pzero_ref")
    assert d["noise"] < ATOL
    assert d["final"] < ATOL
    assert d["image"] <= IMAGE_LEVELS


def test_pix2pix_zero_default_departure(sd):
    """``direct+p2pzero`` (paper-described: the engine's DDIM inversion without regulariser, the posterior mean,
    no source offsets on the target, the paper's guidance step, the empty negative prompt) departs from the
    released code by design; measured here on one case (docs/methods.md)."""
    case_id = json.loads((ZERO / "settings.json").read_text())["cases"][0]["case_id"]
    d = _zero_run(sd, case_id, "direct+p2pzero")
    assert d["noise"] > 0.5  # measured 4.7: the regularised, shifted-grid inversion and the posterior sample
    assert d["final"] > 0.5  # measured 2.35
