"""Golden-output parity of Plug-and-Play with PnPInversion's own code on the embedded shapes-sd model (issue 14).

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


def test_pix2pix_zero_departure(sd):
    """A measured departure, not parity: PnPInversion's Pix2Pix-Zero inverts with its own inverse DDIM scheduler
    (``alphas_cumprod[t-1]`` at timestep t, ending at ``alphas_cumprod[999]`` where sampling starts at t = 981) and
    regularises the noise prediction (auto-correlation with python-``random`` rolls and KL, lambda 20, 5 x 5 steps),
    and uses the caption as the negative prompt; retouch implements none of these (docs/methods.md). Its closest
    setting (``direct+p2pzero`` with the "add-source" offsets, the released guidance step, the VAE posterior
    sampled from seed 1234 as the reference's ``setup_seed``) is run on one case and the differences are printed
    and bounded from below, so that a change that closes the gap shows up here (then make this a parity test)."""
    from retouch.config import InversionConfig

    path = ZERO / "settings.json"
    if not path.is_file():
        pytest.fail(f"missing fixture {path}: run benchmarks/reference/pnpinversion.py --methods "
                    "directinversion+pix2pix-zero")  # fmt: skip
    from safetensors.torch import load_file

    info = json.loads(path.read_text())["cases"][0]
    case = make_edit_case(info["type_id"], info["seed"])
    ref = load_file(str(ZERO / f"{info['case_id']}.safetensors"))
    cfg = EditConfig(
        case.source_prompt, case.target_prompt, method="direct+p2pzero", num_steps=50, guidance=7.5, seed=1234,
        options={"add_source_offset": True, "released_guidance": True},
        inversion=InversionConfig(options={"posterior": "sample"}),
    )  # fmt: skip
    res = edit(sd, Image.fromarray(case.source_image), cfg, keep_latents=True)
    d_noise = (res.trajectory.noise - ref["noise"]).abs().max().item()
    d_final = (res.latents[-1:] - ref["final"]).abs().max().item()
    print(f"pix2pix-zero {info['case_id']}: noise {d_noise:.2f}, final {d_final:.2f} (departure, docs/methods.md)")
    assert ref["noise"].shape == res.trajectory.noise.shape
    assert d_noise > 0.5  # measured 3.8: the regularised, shifted-grid inversion is not reproduced
    assert d_final > 0.5  # measured 2.8
