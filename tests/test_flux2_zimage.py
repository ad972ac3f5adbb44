"""Flux.2 (dev, klein, klein distilled) and Z-Image on tiny random pipelines: parity of plain sampling with the
stock diffusers pipelines, processor parity and restore, exact Direct-Inversion reconstruction, every
applicable preset end to end, distilled defaults and refusals."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from retouch import solvers
from retouch.config import EditConfig, MergeConfig
from retouch.control import IdentityEditor, attention_editing
from retouch.editing import GuidedModel, edit, resolve
from retouch.presets import PRESETS

from conftest import random_image

PROMPT = "a red circle on a blue background"
TEXT_LEN = 64  # max_sequence_length in these tests (the real pipelines use 512) ...
DEV_TEXT_LEN = 128  # ... Flux.2 dev's system message alone takes 72 tokens of the tiny tokenizer
VARIANTS = ("flux2-dev", "flux2-klein", "flux2-klein-distilled", "zimage", "zimage-turbo")


@functools.cache
def tiny(variant: str):
    from retouch.backbones import from_pipeline
    from retouch.models.tiny_next import tiny_flux2_pipeline, tiny_zimage_pipeline

    if variant.startswith("flux2-"):
        pipe = tiny_flux2_pipeline(variant=variant.removeprefix("flux2-"))
    else:
        pipe = tiny_zimage_pipeline(turbo=variant == "zimage-turbo")
    pipe.set_progress_bar_config(disable=True)
    bb = from_pipeline(pipe, name=f"tiny-{variant}")
    bb.max_sequence_length = DEV_TEXT_LEN if variant == "flux2-dev" else TEXT_LEN
    return bb


def _noise(bb, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = bb.vae_scale_factor
    return torch.randn(1, bb.latent_channels, hw[0] // f, hw[1] // f, generator=g)


def _to_model_latent(bb, raw):
    """Klein's ``output_type="latent"`` is the de-normalised VAE latent; bring it back to retouch's space."""
    from retouch.backbones.flux2 import patchify

    vae = bb.vae
    lat = patchify(raw)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (lat - mean) / std


def _pipeline_latents(bb, x_t, steps, guidance, hw, prompt=PROMPT):
    h, w = hw
    kw = dict(num_inference_steps=steps, output_type="latent", height=h, width=w, return_dict=False,
              max_sequence_length=bb.max_sequence_length)  # fmt: skip
    if bb.family == "zimage":  # the pipeline's g is retouch's w - 1
        return bb.pipe(prompt, latents=x_t.clone(), guidance_scale=guidance - 1.0, **kw)[0]
    out = bb.pipe(prompt=prompt, latents=x_t.clone(), guidance_scale=guidance, **kw)[0]
    if bb.klein:
        return _to_model_latent(bb, out)
    b, c, lh, lw = x_t.shape
    return out.permute(0, 2, 1).reshape(b, c, lh, lw)


def _ours(bb, x_t, steps, guidance, hw):
    cond = bb.encode_prompt([PROMPT], image_size=hw, guidance=guidance)
    uncond = bb.encode_prompt([""], image_size=hw) if bb.uses_cfg else None
    grid = bb.grid("flow", steps, (x_t.shape[-2], x_t.shape[-1]))
    model = GuidedModel(bb, grid, cond, uncond, guidance)
    return solvers.sample(model, x_t, grid, "flow_euler")


GUIDANCE = {"flux2-dev": 3.5, "flux2-klein": 4.0, "flux2-klein-distilled": 1.0, "zimage": 4.0, "zimage-turbo": 1.0}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("steps", "hw"), [(2, (32, 32)), (4, (48, 32)), (7, (64, 128))])
def test_sampling_matches_stock_pipeline(variant, steps, hw):
    bb = tiny(variant)
    x_t = _noise(bb, hw)
    g = GUIDANCE[variant]
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, steps, g, hw).float()
        ours = _ours(bb, x_t, steps, g, hw)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein", "zimage"])
@pytest.mark.parametrize("materialize", [False, True])
@pytest.mark.parametrize("hw", [(32, 32), (64, 128)])
def test_identity_editor_reproduces_default_processors(variant, materialize, hw):
    bb = tiny(variant)
    x_t = _noise(bb, hw, seed=2)
    before = bb.attn_processors()
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, 2, GUIDANCE[variant], hw)
        with attention_editing(bb, IdentityEditor(materialize=materialize)) as state:
            out = _pipeline_latents(bb, x_t, 2, GUIDANCE[variant], hw)
        assert state.calls > 0
        assert (state.prob_calls > 0) == materialize
    atol = max(1e-5, 1e-6 * float(ref.abs().max()))
    assert torch.allclose(out, ref, rtol=0, atol=atol), (out - ref).abs().max()
    after = bb.attn_processors()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("variant", ["flux2-dev", "zimage"])
def test_processors_restored_after_exception(variant):
    bb = tiny(variant)
    before = bb.attn_processors()
    with pytest.raises(RuntimeError, match="boom"), attention_editing(bb, IdentityEditor()):
        raise RuntimeError("boom")
    after = bb.attn_processors()
    assert all(after[k] is before[k] for k in before)


def test_layer_tables():
    dev = tiny("flux2-dev").attention_layers()
    assert [i.kind for i in dev.values()] == ["joint", "single", "single"]
    assert all(i.text_first for i in dev.values())
    z = tiny("zimage").attention_layers()
    assert [(i.kind, i.place) for i in z.values()] == [("self", "refiner"), ("single", "single"), ("single", "single")]
    assert not any(n.startswith("context_refiner") for n in z)  # text-only attention is not editable
    assert not any(i.text_first for i in z.values())


@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein", "zimage"])
def test_text_segment_points_at_the_prompt(variant):
    """The chat template's prefix is skipped: the segment's first token is the prompt's first token."""
    from retouch.control import tokens

    bb = tiny(variant)
    seg = bb.text_segments()[0]
    prompt = "a red circle on the table"
    ids = bb._template_ids(prompt)
    tp = tokens.tokenize(seg.tokenizer, prompt, max_length=seg.length)
    words = [j for j, w in enumerate(tp.word_of_token) if w >= 0]  # positions of the prompt's word tokens
    assert len(words) >= 6
    assert all(ids[seg.offset + j] == tp.ids[j] for j in words)


@pytest.mark.parametrize("variant", VARIANTS)
def test_direct_inversion_reconstructs_exactly(variant):
    bb = tiny(variant)
    img = random_image(32, 64, seed=1)
    cfg = EditConfig(PROMPT, "a green circle on a blue background", method="direct+p2p", num_steps=3, seed=0)
    res = edit(bb, img, cfg, keep_latents=True)
    z0 = res.trajectory.latents[-1]
    assert torch.allclose(res.latents[0:1].float(), z0.float(), atol=1e-5), (res.latents[0] - z0).abs().max()


def _applicable(family: str) -> list[str]:
    return [p.name for p in PRESETS.values() if family in p.families]


@pytest.mark.parametrize("variant", ["flux2-dev", "flux2-klein", "zimage-turbo"])
def test_every_applicable_preset_runs(variant, tmp_path):
    bb = tiny(variant)
    names = _applicable(bb.family)
    assert {"direct+p2p", "direct+masactrl", "direct+pnp", "rf_inversion", "rf_solver", "fireflow"} <= set(names)
    assert {"kv_edit", "kv_edit_inf", "flowedit_sd3"} <= set(names)
    img = random_image(64, 128, seed=3)
    mask = np.zeros((64, 128), np.float32)
    mask[16:48, 32:96] = 1.0  # the centre quarter, for the mask-based presets (KV-Edit)
    for name in names:
        options = {}
        if name == "disentangle":
            continue  # needs a CLIP model; covered in test_disentangle_with_saved_weights below
        # at the input's size: the native area of these tiny configs (1024² / 1440x720) makes each of the ~25
        # edits seconds long; padded Z-Image sequences are covered in test_editors_new_families.py
        cfg = EditConfig(PROMPT, "a green circle on a blue background", method=name, num_steps=3, seed=0,
                         options=options, resolution="input")  # fmt: skip
        res = edit(bb, img, cfg, mask=mask if PRESETS[name].editor == "kv_edit" else None)
        assert res.image.size == (128, 64), name
        assert res.report["family"] == bb.family
        assert res.report["nfe"]["total"] > 0, name


@pytest.mark.parametrize("variant", ["flux2-dev", "zimage"])
def test_editors_change_the_target_branch(variant):
    """P2P and MasaCtrl actually act on these families: the target branch differs from no control."""
    bb = tiny(variant)
    img = random_image(64, 128, seed=4)
    outs = {}
    for method in ("identity", "p2p", "masactrl"):
        cfg = EditConfig(PROMPT, "a green circle on a blue background", method=method,
                         num_steps=3, seed=0, options={"start_step": 0} if method == "masactrl" else {},
                         resolution="input")  # fmt: skip
        res = edit(bb, img, cfg, keep_latents=True)
        outs[method] = res.latents[1]
        if method == "p2p":
            assert res.report["attention_calls"]["block"] > 0
    assert not torch.allclose(outs["p2p"], outs["identity"])
    assert not torch.allclose(outs["masactrl"], outs["identity"])


@pytest.mark.parametrize("variant", ["flux2-dev", "zimage"])
def test_token_merging_runs_and_is_reported(variant):
    bb = tiny(variant)
    img = random_image(64, 128, seed=5)
    cfg = EditConfig(PROMPT, "a green circle on a blue background", method="direct+p2p", num_steps=2, seed=0,
                     merge=MergeConfig(ratio=0.5), resolution="input")  # fmt: skip
    res = edit(bb, img, cfg)
    assert res.report["merge"]["applied_ratio"] > 0


def test_pnp_injects_sequence_features():
    from retouch.control.pnp import make_pnp

    for variant in ("flux2-dev", "zimage"):
        bb = tiny(variant)
        cfg = EditConfig(PROMPT, "a green circle on a blue background", method="direct+pnp", num_steps=3,
                         options={"feature_layers": list(bb.feature_blocks())[-1:]}, resolution="input")  # fmt: skip
        editor = make_pnp(bb, cfg, feature_layers=list(bb.feature_blocks())[-1:])
        assert editor.sequence_layers, variant
        res = edit(bb, random_image(64, 128), cfg)
        assert res.image.size == (128, 64)


def test_distilled_models_keep_their_steps_and_run_without_guidance():
    klein = tiny("flux2-klein-distilled")
    assert klein.step_distilled and not klein.uses_cfg and klein.default_steps == 4
    res = resolve(klein, EditConfig(PROMPT, PROMPT, method="rf_inversion"))
    assert res.num_steps == 4 and res.guidance == 1.0  # the preset's 28 steps are not forced on it
    base = tiny("flux2-klein")
    assert base.uses_cfg and not base.step_distilled
    assert resolve(base, EditConfig(PROMPT, PROMPT, method="rf_inversion")).num_steps == 28
    turbo = tiny("zimage-turbo")
    assert turbo.step_distilled and turbo.default_steps == 8
    assert resolve(turbo, EditConfig(PROMPT, PROMPT, method="direct+p2p")).num_steps == 8
    assert not tiny("flux2-dev").uses_cfg and tiny("flux2-dev").guidance_embedded


def test_methods_that_cannot_apply_are_refused():
    bb = tiny("flux2-dev")
    with pytest.raises(ValueError, match="does not support the flux2 family"):
        resolve(bb, EditConfig(PROMPT, PROMPT, method="null_text+p2p"))
    with pytest.raises(ValueError, match="does not support the zimage family"):
        resolve(tiny("zimage"), EditConfig(PROMPT, PROMPT, method="dit4edit"))


def test_methods_json_lists_the_new_families():
    from retouch.cli import methods_info

    info = methods_info()
    assert {"flux2", "zimage"} <= set(info["families"])
    assert info["matrix"]["direct+p2p"]["flux2"] and info["matrix"]["rf_solver"]["zimage"]
    assert not info["matrix"]["null_text+p2p"]["flux2"]


@pytest.mark.parametrize("variant", ["flux2-dev", "zimage"])
def test_disentangle_mixing_at_one_is_the_source_branch(variant):
    """λ = 1 conditions the target on the source prompt (Z-Image: caption lengths too): the branches agree;
    λ = 0 is the plain edit."""
    bb = tiny(variant)
    img = random_image(64, 128, seed=6)
    tgt = "a green square on a blue background"

    def run(method, **options):
        cfg = EditConfig(PROMPT, tgt, method=method, num_steps=3, seed=0, options=options, resolution="input")
        return edit(bb, img, cfg, keep_latents=True).latents

    ones = run("disentangle", lambdas=[1.0] * 3)
    assert torch.allclose(ones[1], ones[0], atol=1e-5)
    zeros = run("disentangle", lambdas=[0.0] * 3)
    plain = run("identity")
    assert torch.allclose(zeros[1], plain[1], atol=1e-5)


def test_models_json_lists_the_new_families():
    from retouch.cli import models_info

    fams = models_info()["families"]
    assert fams["flux2"]["pipelines"] == ["Flux2Pipeline", "Flux2KleinPipeline"]
    assert fams["zimage"]["denoiser"] == "ZImageTransformer2DModel"


def test_saved_tiny_pipeline_loads_by_path_offline(tmp_path):
    """``retouch edit --model FOLDER`` path: model_index.json -> family -> adapter (klein keeps is_distilled)."""
    from retouch.backbones import load_backbone
    from retouch.models.tiny_next import tiny_flux2_pipeline, tiny_zimage_pipeline

    tiny_flux2_pipeline(variant="klein-distilled").save_pretrained(tmp_path / "klein")
    tiny_zimage_pipeline().save_pretrained(tmp_path / "zimage")
    klein = load_backbone(str(tmp_path / "klein"))
    assert klein.family == "flux2" and klein.step_distilled and not klein.uses_cfg
    z = load_backbone(str(tmp_path / "zimage"))
    assert z.family == "zimage" and z.step_distilled


@pytest.mark.parametrize(("model", "size"), [("tiny-flux2", (64, 64)), ("tiny-zimage", (32, 64))])
def test_scale_benchmark_builds_the_new_families(tmp_path, model, size):
    """``benchmarks/scale.py`` drives the real adapters over random Flux.2 / Z-Image denoisers (the specs the
    GPU rows use, at tiny widths; Z-Image at a size whose image tokens need padding)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale_new", path)
    scale = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale_new"] = scale
    try:
        spec.loader.exec_module(scale)
        scale.run_benchmark([(model, size)], presets=["direct+p2p"], ratios=[0.75], nfe=1, warmup=0,
                            isolate=False, results_dir=tmp_path)  # fmt: skip
    finally:
        sys.modules.pop("bench_scale_new", None)
    (entry,) = json.loads((tmp_path / f"scale_{model}.json").read_text())["entries"]
    names = [v["name"] for v in entry["variants"]]
    assert names[:2] == ["plain", "routed"] and "direct+p2p" in names
    assert all(v["finite"] and v["seconds_per_nfe"] > 0 for v in entry["variants"])
    (merge,) = [m for m in entry["merging"] if m["preset"] is not None]
    assert merge["applied_ratio"] == pytest.approx(0.75, abs=0.05)
