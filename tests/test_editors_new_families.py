"""KV-Edit, FlowEdit, the ``none`` inversion and the edit-friendly ``ddpm`` inversion on the newer families
(Flux.2 dev / klein / klein-distilled, Z-Image / Turbo, Qwen-Image, Sana) on tiny random pipelines.

The checks are identities that hold whatever the weights: outside the mask KV-Edit's output latent is the input
latent bit for bit; FlowEdit with target = source (same prompt, same guidance) integrates a zero velocity
difference and returns the input latent; the ``ddpm`` maps replay the inversion exactly. Sana's linear
self-attention cannot take KV-Edit's logit biases, so KV-Edit is refused there with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_checks import check_foreground_attends_to_cached_background
from retouch import io, masks
from retouch.config import EditConfig, InversionConfig
from retouch.control.kv_edit import make_kv_edit
from retouch.editing import edit, prepare_image, resolve
from retouch.presets import PRESETS
from test_flux2_zimage import tiny

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"
# variant -> image size (height, width): Flux.2 and Z-Image at a size the tiny models' packing divides
SIZES = {
    "flux2-dev": (64, 64),
    "flux2-klein": (64, 64),
    "flux2-klein-distilled": (64, 64),
    "zimage": (64, 64),
    "zimage-turbo": (64, 64),
    "qwenimage": (64, 64),
    "sana": (64, 64),
}
KV_VARIANTS = ("flux2-dev", "flux2-klein", "zimage", "qwenimage")


def _cfg(*args, **kwargs) -> EditConfig:
    """Work at the input's 64x64 (the default, the model's native area, is up to 1024² on these tiny
    pipelines: a 256x larger VAE pass for nothing)."""
    return EditConfig(*args, resolution="input", **kwargs)


def _bb(variant: str):
    return tiny(variant) if variant.startswith(("flux2", "zimage")) else tiny_backbone(variant)


def _square(hw: tuple[int, int]) -> np.ndarray:
    """The centre quarter: whole tokens at every packing / patch size used here."""
    h, w = hw
    m = np.zeros(hw, np.float32)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
    return m


def _z0(bb, hw):
    img, _ = prepare_image(bb, random_image(*hw), _cfg(SRC, TGT))
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # the convolution kernels edit() runs on the CPU
        return bb.encode_image(io.pil_to_tensor(img)).float()[0]


# --- KV-Edit --------------------------------------------------------------------------------------------------
KV_CASES = [
    *[(v, "kv_edit", {}) for v in KV_VARIANTS],
    *[(v, "kv_edit_inf", {"attn_mask": True}) for v in KV_VARIANTS],
    ("zimage", "kv_edit", {"attn_mask": True, "re_init": True, "skip": 0}),  # the paper's options, single-stream
    ("qwenimage", "kv_edit", {"attn_mask": True, "re_init": True, "skip": 0}),  # ... and joint [text; image]
]


@pytest.mark.parametrize(("variant", "method", "options"), KV_CASES)
def test_kv_edit_output_equals_the_input_latent_outside_the_mask(variant, method, options):
    bb = _bb(variant)
    hw = SIZES[variant]
    cfg = _cfg(SRC, TGT, method=method, num_steps=5, seed=0, options={"skip": 1, **options})
    res = edit(bb, random_image(*hw), cfg, mask=_square(hw), keep_latents=True)
    z0 = _z0(bb, hw)
    m = res.extras["mask"][0, 0]
    assert set(m.unique().tolist()) == {0.0, 1.0}
    out = res.latents[1]
    assert torch.equal(out[:, m == 0], z0[:, m == 0])  # background: the input latent, bit for bit
    assert not torch.allclose(out[:, m == 1], z0[:, m == 1], atol=1e-3)  # foreground: regenerated
    assert res.report.get("start_step", 0) == options.get("skip", 1)
    if method == "kv_edit_inf":
        assert res.report["nfe"]["inversion"] == 0
    else:
        assert res.report["nfe"]["inversion"] > 0


@pytest.mark.parametrize("variant", KV_VARIANTS)
def test_kv_edit_foreground_attends_to_the_cached_background(variant):
    """KV-Edit acts on these families' joint / single-stream layers: with the cache filled at a grid point, the
    target's foreground prediction does not depend on the target's own background latent (its background keys /
    values are the cached ones); without KV-Edit it does. A target equal to the cached source reproduces the
    source's prediction."""
    bb = _bb(variant)
    hw = SIZES[variant]
    cfg = _cfg(SRC, SRC, num_steps=4)
    with torch.no_grad():
        cond = bb.encode_prompt([SRC, SRC], image_size=hw, guidance=1.0)
        z0 = _z0(bb, hw)[None]
        lat_hw = (z0.shape[-2], z0.shape[-1])
        grid = bb.grid("flow", 4, lat_hw)
        lat = masks.to_latent(_square(hw), lat_hw)
    check_foreground_attends_to_cached_background(bb, cfg, cond, z0, grid, lat)


def test_kv_edit_is_refused_on_linear_attention_with_the_reason():
    sana = tiny_backbone("sana")
    assert any(i.linear for i in sana.attention_layers().values())
    for method in ("kv_edit", "kv_edit_inf"):
        with pytest.raises(ValueError, match="does not support the sana family.*linear.*softmax logits"):
            resolve(sana, _cfg(SRC, TGT, method=method))
    # the factory checks the model's layers itself (not its family name)
    with pytest.raises(ValueError, match="kv_edit cannot run on sana: .*linear layers: transformer_blocks.0"):
        make_kv_edit(sana, _cfg(SRC, TGT, num_steps=4))
    with pytest.raises(ValueError, match="linear"):
        edit(sana, random_image(64, 64), _cfg(SRC, TGT, method="kv_edit"), mask=_square((64, 64)))


# --- FlowEdit and the `none` inversion --------------------------------------------------------------------------
def _preset_for(bb) -> str:
    """The FlowEdit preset whose guidance convention the model has: the guidance embedding (FLUX_exp) or true
    CFG (SD3_exp); a model with neither runs either preset unguided."""
    return "flowedit" if getattr(bb, "guidance_embedded", False) or bb.family == "flux" else "flowedit_sd3"


def _spy_batches(monkeypatch, bb) -> list[tuple[int, object]]:
    seen: list[tuple[int, object]] = []
    real = bb.predict

    def spy(x, t, cond):
        seen.append((x.shape[0], cond.tensors.get("guidance")))
        return real(x, t, cond)

    monkeypatch.setattr(bb, "predict", spy)
    return seen


@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein", "zimage", "qwenimage", "sana"])
def test_flowedit_with_target_equal_to_source_returns_the_input_latent(variant):
    """Same prompt, same guidance: z_tar = z_src at every step, dV = 0, the output is the input latent (to
    float rounding of ``z_edit + z_src - x_src``). The ``none`` inversion runs no model call."""
    bb = _bb(variant)
    hw = SIZES[variant]
    method = _preset_for(bb)
    assert bb.family in PRESETS[method].families
    cfg = _cfg(SRC, SRC, method=method, num_steps=6, guidance=3.0, seed=0,
                     options={"n_max": 5, "source_guidance": 3.0})  # fmt: skip
    same = edit(bb, random_image(*hw), cfg, keep_latents=True)
    assert same.report["nfe"] == {"inversion": 0, "sampling": 5, "total": 5}
    assert same.report["config"]["inversion"]["name"] == "none"
    assert torch.allclose(same.latents[1], same.latents[0], atol=1e-4), (same.latents[1] - same.latents[0]).abs().max()


@pytest.mark.parametrize(
    ("variant", "vary_source"),
    [("flux2-dev", True), ("flux2-klein", False), ("zimage", False), ("qwenimage", True), ("sana", False)],
)
def test_flowedit_guides_each_branch_by_the_models_convention(variant, vary_source, monkeypatch):
    """The preset's source / target scales reach the model the way the adapter applies guidance: in each row's
    embedded guidance (Flux.2 dev: 2 rows, no CFG batch) or as true CFG (4 rows: uncond + cond of source and
    target); the edit moves the latent, and changing only the source scale changes it."""
    bb = _bb(variant)
    hw = SIZES[variant]
    method = _preset_for(bb)
    seen = _spy_batches(monkeypatch, bb)
    cfg = _cfg(SRC, TGT, method=method, num_steps=4, seed=0, options={"n_max": 3})
    res = edit(bb, random_image(*hw), cfg, keep_latents=True)
    p = PRESETS[method]
    assert res.report["guidance"] == [p.options["source_guidance"], p.guidance]
    assert (res.latents[1] - res.latents[0]).abs().max() > 1e-3
    rows = {n for n, _ in seen}
    if getattr(bb, "guidance_embedded", False):
        assert rows == {2}
        emb = seen[0][1]
        assert emb is not None and emb.flatten().tolist() == pytest.approx([p.options["source_guidance"], p.guidance])
    else:
        assert bb.uses_cfg and rows == {4}
    if vary_source:
        other = edit(bb, random_image(*hw), cfg.with_(options={"n_max": 3, "source_guidance": 1.0}), keep_latents=True)
        assert not torch.allclose(other.latents[1], res.latents[1], atol=1e-5)


@pytest.mark.parametrize("variant", ["flux2-klein-distilled", "zimage-turbo"])
def test_flowedit_on_a_distilled_model_runs_unguided_with_one_scale(variant, monkeypatch):
    """A step-distilled model keeps its steps and runs without guidance; the preset's source scale is dropped
    with its target scale (not reported as applied while the model ignores it)."""
    bb = _bb(variant)
    seen = _spy_batches(monkeypatch, bb)
    res = edit(bb, random_image(*SIZES[variant]), _cfg(SRC, TGT, method="flowedit_sd3", seed=0),
               keep_latents=True)  # fmt: skip
    assert res.report["guidance"] == [1.0, 1.0]
    assert res.report["nfe"]["sampling"] == bb.default_steps
    assert {n for n, _ in seen} == {2}
    assert (res.latents[1] - res.latents[0]).abs().max() > 1e-3


# --- edit-friendly DDPM inversion on flow grids ------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein", "zimage", "qwenimage", "sana"])
def test_ddpm_inversion_replays_exactly_on_the_new_flow_families(variant):
    """The maths needs only x = a x0 + s eps on a monotone grid: the noise maps replay the inversion (the source
    branch is pinned, the target with the same prompt and guidance lands on the image latent), and a different
    target prompt changes the result."""
    bb = _bb(variant)
    hw = SIZES[variant]
    g = 2.0
    cfg = _cfg(SRC, SRC, method="identity", solver="ddpm", num_steps=5, guidance=g, seed=3,
                     inversion=InversionConfig(name="ddpm", guidance=g, skip=0.4))  # fmt: skip
    res = edit(bb, random_image(*hw), cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert res.report["nfe"] == {"inversion": 5, "sampling": 5, "total": 10}
    assert torch.allclose(res.latents[0], z0, atol=1e-6)
    assert torch.allclose(res.latents[1], z0, atol=5e-5), (res.latents[1] - z0).abs().max()
    if variant == "qwenimage":  # the maps are not a no-op: another target prompt lands elsewhere
        edited = edit(bb, random_image(*hw), cfg.with_(target_prompt=TGT), keep_latents=True)
        assert (edited.latents[1] - z0).abs().max() > 1e-3
