"""Edit-friendly DDPM inversion and LEDITS++: exact reconstruction from the noise maps (analytic denoiser and
tiny models), and parity of retouch's LEDITS++ with diffusers' ``LEditsPPPipelineStableDiffusion``."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from retouch import schedules, solvers
from retouch.config import EditConfig, InversionConfig
from retouch.control.ledits import Concept, derive_concepts, gaussian_smooth, quantile_mask
from retouch.editing import edit, resolve
from retouch.inversion import get_inversion
from retouch.inversion.ddpm import ddpm_inversion
from retouch.types import NoiseGrid, Point, Pred, Prediction, to_x0_eps

from conftest import random_image, tiny_backbone


def _vp_grid(n: int) -> NoiseGrid:
    abar = torch.linspace(0.02, 0.995, n + 1) ** 1.5  # noisiest first, increasing alpha
    return NoiseGrid(timesteps=torch.linspace(999, 0, n + 1), alphas=abar.sqrt(), sigmas=(1 - abar).sqrt(), kind="vp")


def _model(x: torch.Tensor, at: Point, grid: NoiseGrid) -> Pred:
    """A fixed, nonlinear 'denoiser' (any eps works: the maps absorb its error)."""
    k = at.step
    raw = torch.tanh(1.3 * x) + 0.1 * k
    kind = Prediction.FLOW if grid.kind == "flow" else Prediction.EPSILON
    return to_x0_eps(raw, x, grid.alphas[k], grid.sigmas[k], kind)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_noise_maps_reproduce_the_latent_exactly(kind):
    grid = _vp_grid(12) if kind == "vp" else schedules.uniform_flow_grid(12, shift=3.0)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 6, 6, generator=g)

    def model(x, k):
        return _model(x, k, grid)

    traj = ddpm_inversion(model, z0, grid, generator=torch.Generator().manual_seed(1))
    maps = traj.extras["noise_maps"]
    assert maps.shape == (12, *z0.shape)
    state = {"noise_maps": maps}
    x = traj.noise
    for i in range(grid.num_steps):
        x = solvers.ddpm_step(model, x, grid, i, state)
        assert torch.allclose(x, traj.latents[i + 1], atol=1e-5), i
    assert torch.allclose(x, z0, atol=1e-5)
    # without the maps the same sampler does not come back (the test can fail)
    x = traj.noise
    state = {"generator": torch.Generator().manual_seed(5)}
    for i in range(grid.num_steps):
        x = solvers.ddpm_step(model, x, grid, i, state)
    assert (x - z0).abs().max() > 0.1


def test_noisy_points_are_independent_draws_of_the_forward_marginal():
    """Alg. 1, step 1: x_k = a_k x0 + s_k eps_k with fresh eps_k (before the step-to-step correction of
    the next point, which changes it only by rounding)."""
    grid = _vp_grid(5)
    z0 = torch.zeros(1, 1, 64, 64)
    traj = ddpm_inversion(lambda x, at: _model(x, at, grid), z0, grid, generator=torch.Generator().manual_seed(0))
    eps = [traj.latents[k] / grid.sigmas[k] for k in range(5)]
    for k in range(5):
        assert abs(float(eps[k].std()) - 1) < 0.05
    assert abs(float((eps[0] * eps[1]).mean())) < 0.05


def test_ddpm_sigma_is_ddim_eta_one_on_vp():
    grid = _vp_grid(8)
    abar = grid.alphas**2
    for i in range(8):
        t, p = abar[i], abar[i + 1]
        ref = ((1 - p) / (1 - t) * (1 - t / p)).sqrt()
        assert torch.allclose(solvers.ddpm_sigma(grid, i), ref, atol=1e-6)
    flow = schedules.uniform_flow_grid(4)
    assert float(solvers.ddpm_sigma(flow, 3)) == 0.0  # last step to sigma = 0 is deterministic


def test_skip_takes_the_tail_of_the_longer_grid():
    bb = tiny_backbone("sd")
    full = bb.grid("ddim", schedules.skipped_steps(10, 0.5), (4, 4))
    assert full.num_steps == 15
    tail = schedules.tail(full, 10)
    assert tail.num_steps == 10 and torch.equal(tail.timesteps, full.timesteps[5:])
    with pytest.raises(ValueError):
        schedules.tail(full, 16)
    with pytest.raises(ValueError, match="skip"):
        InversionConfig(skip=-0.1)


def test_skip_applies_to_any_inversion():
    """--inversion-skip with a deterministic inversion: the run starts part-way down a longer grid."""
    bb = tiny_backbone("sd")
    cfg = EditConfig("a red circle", "a red circle", method="direct+p2p", num_steps=4, seed=0,
                     inversion=InversionConfig(skip=1.0))  # fmt: skip
    res = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    full = bb.grid("ddim", 8, (4, 4))
    assert torch.equal(res.trajectory.grid.timesteps, full.timesteps[4:])
    assert res.report["nfe"]["total"] == 8
    assert torch.allclose(res.latents[0], res.trajectory.latents[-1], atol=1e-6)


@pytest.mark.parametrize("family", ["sd", "pixart", "sd3", "flux"])
def test_ddpm_inversion_reconstructs_on_tiny_models(family):
    """Sampling both branches with the maps at the inversion's own guidance gives the image latent back;
    the source branch is pinned to the trajectory (corrected inversion)."""
    bb = tiny_backbone(family)
    cfg = EditConfig(
        "a red circle", "a red circle", method="identity", solver="ddpm", num_steps=5, guidance=1.0, seed=3,
        inversion=InversionConfig(name="ddpm", skip=0.4),
    )  # fmt: skip
    res = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert res.report["nfe"] == {"inversion": 5, "sampling": 5, "total": 10}
    assert res.report["config"]["inversion"]["skip"] == 0.4
    assert torch.allclose(res.latents[0], z0, atol=1e-6)  # pinned source
    assert torch.allclose(res.latents[1], z0, atol=2e-5), (res.latents[1] - z0).abs().max()  # replayed target
    # a different sampling guidance changes the prediction and so the target (the maps are not a no-op)
    other = edit(bb, random_image(32, 32), cfg.with_(guidance=4.0), keep_latents=True)
    assert (other.latents[1] - z0).abs().max() > 1e-3


def test_ddpm_inversion_is_seeded():
    bb = tiny_backbone("sd")
    cfg = EditConfig("a red circle", "a blue circle", method="ddpm_edit", num_steps=4, seed=7)
    a = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    b = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    c = edit(bb, random_image(32, 32), cfg.with_(seed=8), keep_latents=True)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents[1], c.latents[1])


def test_ddpm_p2p_composes_with_attention_control():
    """P2P on the DDPM inversion: the source branch is the exact replay, the target is edited."""
    bb = tiny_backbone("pixart")
    cfg = EditConfig("a red circle", "a blue circle", method="ddpm+p2p", num_steps=4, seed=0)
    res = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert torch.allclose(res.latents[0], z0, atol=1e-6)
    assert (res.latents[1] - z0).abs().max() > 1e-3
    assert res.report["attention_calls"]["materialised"] > 0


def test_presets_resolve():
    bb = tiny_backbone("sd")
    r = resolve(bb, EditConfig("a red circle", "a blue circle", method="ddpm_edit"))
    assert (r.solver.name, r.inversion, r.base_inversion, r.num_steps) == ("ddpm", "ddpm", "ddpm", 64)
    assert r.config.inversion.skip == 0.5625 and r.config.inversion.guidance == 3.5 and r.guidance == 15.0
    assert schedules.skipped_steps(64, 0.5625) == 100  # the paper's 100-step grid, first 36 skipped
    r = resolve(bb, EditConfig("a red circle", "a blue circle", method="ledits++"))
    assert (r.editor, r.solver.name, r.config.inversion.prompt, r.num_steps) == ("ledits", "ddpm", "", 50)
    assert get_inversion("ddpm").source_correction
    with pytest.raises(ValueError, match="does not support"):
        resolve(tiny_backbone("flux"), EditConfig("a", "b", method="ledits++"))


# --- LEDITS++ pieces ---------------------------------------------------------------------------------------
def test_derive_concepts_adds_and_removes():
    assert derive_concepts("a red circle on blue", "a green circle on blue") == [("green", False), ("red", True)]
    assert derive_concepts("a circle", "a big circle") == [("big", False)]
    with pytest.raises(ValueError, match="same"):
        derive_concepts("a circle", "a circle")


def test_concept_validation():
    with pytest.raises(ValueError, match="threshold"):
        Concept("red", threshold=1.5)
    with pytest.raises(ValueError, match="reverse"):
        Concept("red", scale=-1)
    c = Concept("red", warmup=2, cooldown=4)
    assert [c.active(i) for i in range(6)] == [False, False, True, True, False, False]


def test_smoothing_and_quantile_mask():
    m = torch.zeros(1, 5, 5)
    m[0, 2, 2] = 1
    s = gaussian_smooth(m)
    assert torch.isclose(s.sum(), torch.tensor(1.0)) and s[0, 2, 2] == s.max()
    assert torch.isclose(s[0, 2, 1], s[0, 2, 2] * torch.e**-1)
    v = torch.arange(10.0).reshape(1, 10)
    assert quantile_mask(v, 0.75).sum() == 3  # 6.75 -> 7, 8, 9


def test_ledits_options_are_checked():
    bb = tiny_backbone("sd")
    base = EditConfig("a red circle", "a green circle", method="ledits++", num_steps=3)
    for options, match in (
        ({"scales": [1.0, 2.0, 3.0]}, "scales"),
        ({"masks": "box"}, "masks"),
        ({"edit_prompts": ["big"], "reverse": [True, False]}, "reverse"),
        ({"map_downsample": 8}, "map_downsample"),
        ({"nonsense": 1}, "unknown option"),
    ):
        with pytest.raises(ValueError, match=match):
            edit(bb, random_image(32, 32), base.with_(options=options))


def test_ledits_edits_the_target_and_reconstructs_the_source():
    bb = tiny_backbone("sd")
    cfg = EditConfig(
        "a red circle", "a green circle", method="ledits++", num_steps=5, seed=0,
        options={"edit_prompts": ["green", "red"], "reverse": [False, True], "map_downsample": 2},
    )  # fmt: skip
    res = edit(bb, random_image(64, 64), cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert torch.allclose(res.latents[0], z0, atol=1e-6)
    assert (res.latents[1] - z0).abs().max() > 1e-2  # guidance changed the target
    assert res.report["nfe"]["sampling"] == 5  # one batched call per step: [src, tgt, 2 concepts]
    # with zero scales the target is the uncond replay: the image back
    zero = edit(bb, random_image(64, 64), cfg.with_(options={**cfg.options, "scales": 0.0}), keep_latents=True)
    assert torch.allclose(zero.latents[1], z0, atol=2e-5)


def test_ledits_base_prompt_replays_the_inversion_of_that_prompt():
    """base_prompt=source (diffusers' negative_prompt): inverted under the source prompt, zero scales give
    the image back; with the empty inversion prompt they do not (the base must match the inversion)."""
    bb = tiny_backbone("sd")
    cfg = EditConfig(
        "a red circle", "a green circle", method="ledits++", num_steps=4, seed=0,
        inversion=InversionConfig(prompt="a red circle"), options={"base_prompt": "source", "scales": 0.0},
    )  # fmt: skip
    res = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert torch.allclose(res.latents[1], z0, atol=2e-5)
    other = edit(bb, random_image(32, 32), cfg.with_(inversion=InversionConfig(prompt="")), keep_latents=True)
    assert (other.latents[1] - other.trajectory.latents[-1]).abs().max() > 1e-3


def test_ledits_on_pixart_runs_with_attention_masks():
    bb = tiny_backbone("pixart")
    cfg = EditConfig("a red circle", "a green circle", method="ledits++", num_steps=4, seed=0)
    res = edit(bb, random_image(32, 32), cfg, keep_latents=True)
    assert torch.isfinite(res.latents).all()
    assert (res.latents[1] - res.trajectory.latents[-1]).abs().max() > 1e-3


# --- parity with diffusers' LEditsPPPipelineStableDiffusion ------------------------------------------------
@functools.cache
def _three_level_sd():
    """The tiny SD pipeline with a three-level UNet: diffusers' LEDITS++ reads its attention masks from
    layers at 1/4 of the latent resolution, which the two-level tiny UNet does not have."""
    from diffusers import UNet2DConditionModel

    from retouch.backbones import from_pipeline
    from retouch.models.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=4, cross_attention_dim=pipe.unet.config.cross_attention_dim,
    ).eval()  # fmt: skip
    pipe.unet = unet
    pipe.register_modules(unet=unet)
    return from_pipeline(pipe, name="tiny-sd-3level")


def _diffusers_ledits(bb, image, *, steps, skip, seed, **call):
    from diffusers import DDIMScheduler, LEditsPPPipelineStableDiffusion

    class LongIndexDDIM(DDIMScheduler):
        # diffusers 0.42.1's LEDITS++ invert() calls add_noise with a float tensor timestep (torch.Tensor([t])),
        # which torch 2.13 refuses as an index; the cast is the only change
        def add_noise(self, original_samples, noise, timesteps):
            return super().add_noise(original_samples, noise, timesteps.long())

    p = bb.pipe
    pipe = LEditsPPPipelineStableDiffusion(
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
        scheduler=LongIndexDDIM.from_config(p.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.invert(image, source_prompt="", num_inversion_steps=steps, skip=skip,
                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return pipe(output_type="latent", **call).images


CASES = {
    # two concepts (one removed), own scales / thresholds / warm-up; intersected masks (the default)
    "intersect": (
        {"editing_prompt": ["green circle", "red"], "reverse_editing_direction": [False, True],
         "edit_guidance_scale": [6.0, 4.0], "edit_threshold": [0.7, 0.8], "edit_warmup_steps": [0, 1]},
        {"edit_prompts": ["green circle", "red"], "reverse": [False, True], "scales": [6.0, 4.0],
         "thresholds": [0.7, 0.8], "warmup": [0, 1], "attention_tokens": "diffusers"},
    ),
    # attention masks only, one concept with a cool-down
    "attention": (
        {"editing_prompt": ["green"], "edit_guidance_scale": 5.0, "edit_threshold": 0.6, "edit_cooldown_steps": 4,
         "use_intersect_mask": False, "use_cross_attn_mask": True},
        {"edit_prompts": ["green"], "scales": 5.0, "thresholds": 0.6, "cooldown": 4, "masks": "attention",
         "attention_tokens": "diffusers"},
    ),
    # noise masks only (no attention maps read)
    "noise": (
        {"editing_prompt": ["green", "square"], "reverse_editing_direction": [False, True],
         "edit_guidance_scale": [7.0, 3.0], "edit_threshold": 0.9, "use_intersect_mask": False},
        {"edit_prompts": ["green", "square"], "reverse": [False, True], "scales": [7.0, 3.0],
         "thresholds": 0.9, "masks": "noise"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_ledits_matches_diffusers_pipeline(case):
    """Same tiny model, image, settings and seed: retouch's LEDITS++ gives diffusers' final latent.

    Tolerance 1e-4 (final latents of std ~0.2; measured max error 1.6e-5 to 2.7e-5): both compute the same
    operations in float32 but in different orders (batched source row, SDPA vs baddbmm attention, residual vs
    normalised noise maps). The binary masks would turn a real algorithmic difference into O(0.1) changes
    (summing the concept's own tokens instead of diffusers' positions 1..75 moves the latent by ~0.8).
    """
    bb = _three_level_sd()
    image = random_image(128, 128, seed=2)
    steps, skip, seed = 8, 0.15, 11
    ref_call, options = CASES[case]
    with torch.no_grad():
        ref = _diffusers_ledits(bb, image, steps=steps, skip=skip, seed=seed, **ref_call).float()
    cfg = EditConfig(
        "a red circle", "a green circle", method="ledits++", num_steps=steps, seed=seed,
        inversion=InversionConfig(skip=skip), options=options,
    )  # fmt: skip
    ours = edit(bb, image, cfg, keep_latents=True).latents[1:2]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, err
    # the comparison can fail: the same run without the edit concepts is far from the reference
    plain = edit(bb, image, cfg.with_(options={**options, "scales": 0.0}), keep_latents=True).latents[1:2]
    assert (plain - ref).abs().max().item() > 1e-2


# --- CLI ---------------------------------------------------------------------------------------------------
def test_methods_json_lists_the_new_presets(capsys):
    from retouch.cli import main

    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    presets = {p["name"]: p for p in info["presets"]}
    for name, editor in (("ddpm_edit", "identity"), ("ddpm+p2p", "p2p"), ("ledits++", "ledits")):
        assert presets[name]["families"] == ["sd", "pixart"] and presets[name]["editor"] == editor
        assert presets[name]["inversion"] == "ddpm" and presets[name]["solver"] == "ddpm"
    from retouch.backbones import FAMILIES

    assert info["matrix"]["ledits++"] == {family: family in ("sd", "pixart") for family in FAMILIES}
    assert "ddpm" in {i["name"] for i in info["inversions"]} and "ddpm" in {s["name"] for s in info["solvers"]}


def test_cli_ledits_with_concept_options(tmp_path):
    from retouch.cli import main
    from retouch.models.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sd", tmp_path / "tiny-sd")
    image = tmp_path / "in.png"
    random_image(64, 64).save(image)
    out = tmp_path / "edited.png"
    rc = main(
        ["edit", str(image), "-s", "a red circle", "-t", "a green circle", "--model", str(model),
         "--method", "ledits++", "--steps", "4", "--inversion-skip", "0.5", "--no-progress", "-o", str(out),
         "--option", 'edit_prompts=["green", "red"]', "--option", "reverse=[false, true]",
         "--option", "scales=[6, 3]", "--option", "thresholds=0.8", "--option", "map_downsample=2"]
    )  # fmt: skip
    assert rc == 0 and out.is_file()
    report = json.loads((tmp_path / "edited.png.json").read_text())
    assert report["method"] == "ledits++" and report["solver"] == "ddpm" and report["inversion"] == "ddpm"
    assert report["config"]["inversion"]["skip"] == 0.5 and report["config"]["options"]["reverse"] == [False, True]
    assert report["nfe"] == {"inversion": 4, "sampling": 4, "total": 8}
    assert main(["edit", str(image), "-s", "a red circle", "-t", "a green circle", "--model", str(model),
                 "--method", "ledits++", "--steps", "2", "--no-progress", "-o", str(out),
                 "--option", "scales=[1, 2, 3]"]) == 1  # fmt: skip


# --- embedded models, end to end from the CLI (slow) -------------------------------------------------------
def _example(type_id: int) -> dict:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    case = next(e for e in json.loads((root / "examples.json").read_text()) if e["type_id"] == type_id)
    return {**case, "image": root / case["image"], "ground_truth": root / case["ground_truth"]}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["shapes-sd", "shapes-pixart"])
def test_ddpm_edit_makes_the_example_colour_edit_from_the_cli(tmp_path, model):
    """`retouch edit examples/colour.png --method ddpm_edit` (64 steps of a 100-step grid, CFG 3.5 / 15):
    the oracle reads the edit as the ground-truth target on both models (seed 0; measured on both)."""
    import numpy as np
    from PIL import Image

    from retouch.bench.shapes import scene_facts
    from retouch.cli import main
    from retouch.worlds import oracle

    case = _example(6)
    out = tmp_path / "edited.png"
    rc = main(["edit", str(case["image"]), "-s", case["source"], "-t", case["target"], "--model", model,
               "--method", "ddpm_edit", "--no-progress", "-o", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "edited.png.json").read_text())
    assert report["nfe"] == {"inversion": 64, "sampling": 64, "total": 128}
    src, gt, edited = (np.asarray(Image.open(p).convert("RGB")) for p in (case["image"], case["ground_truth"], out))
    s, t, p = (scene_facts(oracle.parse(x)) for x in (src, gt, edited))
    assert p == t, f"missing {sorted(t - p)}, extra {sorted(p - t)}"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["shapes-sd", "shapes-pixart"])
def test_ledits_runs_from_the_cli_on_embedded_models(tmp_path, model):
    """`retouch edit ... --method ledits++` end to end; the source branch is the exact replay of the noise
    maps, so the edit's source image equals the VAE round trip, and the edit differs from it."""
    import numpy as np

    from retouch.backbones import load_backbone
    from retouch.cli import main
    from retouch.io import load_image

    case = _example(6)
    out = tmp_path / "edited.png"
    rc = main(["edit", str(case["image"]), "-s", case["source"], "-t", case["target"], "--model", model,
               "--method", "ledits++", "--steps", "12", "--no-progress", "-o", str(out),
               "--option", "concepts=prompts", "--option", "scales=5"])  # fmt: skip
    assert rc == 0 and out.is_file()
    report = json.loads((tmp_path / "edited.png.json").read_text())
    assert report["editor"] == "ledits" and report["nfe"]["sampling"] == 12
    bb = load_backbone(model)
    cfg = EditConfig(case["source"], case["target"], method="ledits++", num_steps=12,
                     options={"concepts": "prompts", "scales": 5.0})  # fmt: skip
    res = edit(bb, load_image(case["image"]), cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert torch.allclose(res.latents[0], z0, atol=1e-5)
    assert float((res.latents[1] - z0).abs().mean()) > 1e-3
    assert np.array_equal(np.asarray(res.image), np.asarray(load_image(out).convert("RGB")))
