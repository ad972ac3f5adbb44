"""Parity with diffusers: our solvers walk the stock pipelines' grids to the same latents, and the routing
processors with the identity editor reproduce diffusers' default attention, then restore it."""

from __future__ import annotations

import pytest
import torch

from retouch import solvers
from retouch.control import IdentityEditor, attention_editing
from retouch.editing import GuidedModel

from conftest import FAMILIES, tiny_backbone

PROMPT = "a red circle on a blue background"
HW = {"sd": (32, 32), "pixart": (32, 32), "sd3": (32, 32), "flux": (32, 32)}


def _noise(bb, hw, seed=0):
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    f = bb.vae_scale_factor
    return torch.randn(1, bb.latent_channels, h // f, w // f, generator=g)


def _pipeline_latents(bb, x_t, steps, guidance, hw):
    """Run the stock pipeline from latent ``x_t`` and return its final latent (unpacked)."""
    from retouch.backbones.flux import pack, unpack

    h, w = hw
    kw = dict(num_inference_steps=steps, output_type="latent", height=h, width=w, return_dict=False)
    if bb.family == "flux":
        out = bb.pipe(
            PROMPT,
            latents=pack(x_t),
            guidance_scale=guidance,
            max_sequence_length=bb.max_sequence_length,
            **kw,
        )[0]
        return unpack(out, x_t.shape[-2], x_t.shape[-1])
    if bb.family == "pixart":
        kw.update(use_resolution_binning=False, clean_caption=False, max_sequence_length=bb.max_sequence_length)
    if bb.family == "sd3":
        kw.update(max_sequence_length=bb.max_sequence_length)
    return bb.pipe(PROMPT, latents=x_t.clone(), guidance_scale=guidance, **kw)[0]


def _ours(bb, x_t, steps, guidance, hw, solver, grid_kind):
    cond = bb.encode_prompt([PROMPT], image_size=hw, guidance=guidance)
    uncond = bb.encode_prompt([""], image_size=hw) if bb.uses_cfg else None
    grid = bb.grid(grid_kind, steps, (x_t.shape[-2], x_t.shape[-1]))
    model = GuidedModel(bb, grid, cond, uncond, guidance)
    return solvers.sample(model, x_t, grid, solver)


CASES = [
    ("sd", "ddim", "ddim"),
    ("pixart", "dpmpp", "dpm"),
    ("sd3", "flow_euler", "flow"),
    ("flux", "flow_euler", "flow"),
]


@pytest.mark.parametrize(("family", "solver", "grid_kind"), CASES)
@pytest.mark.parametrize("steps", [2, 4, 7])  # PixArt's pipeline special-cases 1 step (DMD)
def test_solver_matches_stock_pipeline(family, solver, grid_kind, steps):
    bb = tiny_backbone(family)
    hw = HW[family]
    x_t = _noise(bb, hw)
    guidance = 3.5 if family == "flux" else 5.0
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, steps, guidance, hw).float()
        ours = _ours(bb, x_t, steps, guidance, hw, solver, grid_kind)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()


def test_dpmpp_matches_dpmsolver_on_sd():
    """DPM-Solver++(2M) on SD's own schedule, against DPMSolverMultistepScheduler built from the same config."""
    from diffusers import DPMSolverMultistepScheduler

    bb = tiny_backbone("sd")
    sched = DPMSolverMultistepScheduler.from_config(bb.pipe.scheduler.config)
    original = bb.pipe.scheduler
    bb.pipe.scheduler = sched
    try:
        x_t = _noise(bb, (32, 32), seed=3)
        with torch.no_grad():
            ref = _pipeline_latents(bb, x_t, 6, 4.0, (32, 32)).float()
            ours = _ours(bb, x_t, 6, 4.0, (32, 32), "dpmpp", "dpm")
    finally:
        bb.pipe.scheduler = original
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()


def test_v_prediction_ddim_matches_pipeline():
    bb = tiny_backbone("sd", "v")
    x_t = _noise(bb, (32, 32), seed=1)
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, 5, 6.0, (32, 32)).float()
        ours = _ours(bb, x_t, 5, 6.0, (32, 32), "ddim", "ddim")
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", [*FAMILIES, "sdxl", "pixart-conditioned"])
@pytest.mark.parametrize("materialize", [False, True])
def test_identity_editor_reproduces_default_processors(family, materialize):
    fam, _, variant = family.partition("-")
    bb = tiny_backbone(fam, variant)
    hw = (32, 32)
    x_t = _noise(bb, hw, seed=2)
    before = dict(bb.denoiser.attn_processors)
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, 2, 4.0, hw)
        with attention_editing(bb, IdentityEditor(materialize=materialize)) as state:
            out = _pipeline_latents(bb, x_t, 2, 4.0, hw)
        assert state.calls > 0
        assert (state.prob_calls > 0) == materialize
    # float32 round-off relative to the latents' scale (random tiny PixArt latents reach |x| ~ 400 at CFG 4)
    atol = max(1e-5, 1e-6 * float(ref.abs().max()))
    assert torch.allclose(out, ref, rtol=0, atol=atol), ((out - ref).abs().max(), atol)
    after = bb.denoiser.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_processors_restored_after_exception(backbone):
    before = dict(backbone.denoiser.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), attention_editing(backbone, IdentityEditor()):
        assert all(type(p).__name__.endswith("Processor") for p in backbone.denoiser.attn_processors.values())
        raise RuntimeError("boom")
    after = backbone.denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_layer_selector_matching_nothing_is_an_error(backbone):
    with (
        pytest.raises(ValueError, match="matched none"),
        attention_editing(backbone, IdentityEditor(), layers=lambda info: info.kind == "nonexistent"),
    ):
        pass
