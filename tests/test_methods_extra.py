"""Plug-and-Play, Pix2Pix-Zero and Wu et al.'s embedding disentanglement on tiny random models: identities that
must hold whatever the weights, reversibility of the hooks, the guidance / optimisation actually descending,
and the saved mixing weights' round trip and reuse."""

from __future__ import annotations

import json
import os

import pytest
import torch

from retouch.backbones.base import Backbone
from retouch.backbones.sd import SDBackbone
from retouch.cli import main
from retouch.config import EditConfig, InversionConfig
from retouch.control import attention_editing
from retouch.control.disentangle import MixingWeights, init_lambdas, save_weights
from retouch.control.p2p_zero import make_p2p_zero
from retouch.editing import GuidedModel, edit
from retouch.mixing_weights import optimise_mixing_weights

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"
NEW = ("ddim+pnp", "direct+pnp", "ddim+p2pzero", "direct+p2pzero", "disentangle")


def _run(bb, method, src=SRC, tgt=TGT, steps=3, image=None, **kw):
    img = random_image(32, 32) if image is None else image
    return edit(bb, img, EditConfig(src, tgt, method=method, num_steps=steps, **kw), keep_latents=True)


def _identity(bb, src=SRC, tgt=SRC, steps=3):
    return _run(bb, "identity", src=src, tgt=tgt, steps=steps, solver="ddim", inversion=InversionConfig(name="ddim"))


# --- Plug-and-Play ---------------------------------------------------------------------------------------------
def test_pnp_equal_prompts_reproduce_reconstruction(family):
    """Injecting the source into an identical target changes nothing; with different prompts it acts."""
    bb = tiny_backbone(family)
    ref = _identity(bb)
    res = _run(bb, "ddim+pnp", tgt=SRC)
    assert torch.allclose(res.latents[1], ref.latents[1], atol=1e-5)
    assert torch.allclose(res.latents[0], ref.latents[0], atol=1e-5)
    assert res.report["attention_calls"]["materialised"] == 0  # Q/K injection keeps fused SDPA
    plain = _identity(bb, tgt=TGT)
    feats_only = _run(bb, "ddim+pnp", options={"attn_layers": []})
    assert not torch.allclose(feats_only.latents[1], plain.latents[1], atol=1e-6)


def test_pnp_attention_injection_acts_and_direct_pins_source():
    bb = tiny_backbone("sd")
    plain = _identity(bb, tgt=TGT)
    attn_only = _run(bb, "ddim+pnp", options={"feature_layers": [], "attn_steps": 1.0})
    assert not torch.allclose(attn_only.latents[1], plain.latents[1], atol=1e-6)
    direct = _run(bb, "direct+pnp")
    assert torch.equal(direct.latents[0], direct.trajectory.latents[-1][0])
    with pytest.raises(ValueError, match="unknown module path"):
        _run(bb, "ddim+pnp", options={"feature_layers": ["up_blocks.9.resnets.0"]})


def _hooks(bb) -> int:
    return sum(len(m._forward_hooks) for m in bb.denoiser.modules())


def test_pnp_hooks_removed_after_edit_and_on_exception():
    bb = tiny_backbone("sd")
    before = _hooks(bb)
    seen = []

    def boom(phase, i, n):
        seen.append(_hooks(bb))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        edit(bb, random_image(), EditConfig(SRC, TGT, method="ddim+pnp", num_steps=2), progress=boom)
    assert seen and seen[0] == before + 1  # the feature hook was installed during the run...
    assert _hooks(bb) == before == 0  # ...and removed on the exception
    _run(bb, "ddim+pnp", steps=2)
    assert _hooks(bb) == 0


# --- Pix2Pix-Zero ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_p2p_zero_equal_prompts_zero_direction_and_no_guidance(family):
    bb = tiny_backbone(family)
    cfg = EditConfig(SRC, SRC, num_steps=3, solver="ddim")
    editor = make_p2p_zero(bb, cfg)
    assert all(float(d.abs().max()) == 0 for d in editor.direction.values() if d.is_floating_point())
    res = _run(bb, "ddim+p2pzero", tgt=SRC)
    ref = _identity(bb)
    assert torch.allclose(res.latents[1], ref.latents[1], atol=1e-5)
    assert res.report["nfe"]["sampling"] == 3 * 3  # two guidance forwards + the step, every step


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_p2p_zero_guidance_step_reduces_attention_distance(family):
    bb = tiny_backbone(family)
    cfg = EditConfig(SRC, TGT, num_steps=4, solver="ddim")
    editor = make_p2p_zero(bb, cfg, xa_guidance=0.1)
    grid = bb.grid("ddim", 4, (4, 4))
    cond = editor.prepare_conditioning(bb.encode_prompt([SRC, TGT]), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, bb.latent_channels, 4, 4, generator=gen)
    with attention_editing(bb, editor) as state:
        state.phase, state.num_steps, state.step = "sample", 4, 1
        model = GuidedModel(bb, grid, cond, None, 1.0, state)
        ctx = model.context(1, 4, (4, 4))
        before, _ = editor.attention_loss(ctx, x, model)
        x_new = editor.before_step(ctx, x, model)
        after, _ = editor.attention_loss(ctx, x_new, model)
    assert torch.equal(x_new[0], x[0]) and not torch.equal(x_new[1], x[1])
    assert float(after) < float(before), (float(before), float(after))


def test_p2p_zero_add_source_offset_variant():
    """PnP-Inversion's released "add-source" variant: with equal prompts the target then tracks z* exactly."""
    bb = tiny_backbone("sd")
    res = _run(bb, "direct+p2pzero", tgt=SRC, solver="ddim", options={"add_source_offset": True})
    z0 = res.trajectory.latents[-1][0]
    # exact up to float rounding of the offsets (1.3e-5 seen on one thread, |z0| ~ 0.09)
    assert torch.allclose(res.latents[1], z0, atol=1e-4)
    plain = _run(bb, "direct+p2pzero", tgt=SRC, solver="ddim")  # paper-faithful: target untouched
    assert not torch.allclose(plain.latents[1], z0, atol=1e-3)
    with pytest.raises(ValueError, match="add_source_offset needs Direct Inversion"):
        _run(bb, "ddim+p2pzero", options={"add_source_offset": True})


# --- disentanglement ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_disentangle_lambda_one_is_source_branch_and_zero_is_plain_edit(family):
    bb = tiny_backbone(family)
    ones = _run(bb, "disentangle", solver="ddim", options={"lambdas": [1.0] * 3})
    assert torch.allclose(ones.latents[1], ones.latents[0], atol=1e-5)
    zeros = _run(bb, "disentangle", solver="ddim", options={"lambdas": [0.0] * 3})
    plain = _identity(bb, tgt=TGT)
    assert torch.allclose(zeros.latents[1], plain.latents[1], atol=1e-5)
    mixed = _run(bb, "disentangle", solver="ddim", options={"epochs": 0, "t_star": 1})
    assert not torch.allclose(mixed.latents[1], zeros.latents[1], atol=1e-6)


def test_mixing_weights_round_trip_and_reuse(tmp_path):
    lam = torch.tensor([1.0, 0.7, -0.1])
    for name in ("w.safetensors", "w.json"):
        path = save_weights(tmp_path / name, lam, source_prompt=SRC, target_prompt=TGT, num_steps=3)
        back = MixingWeights.load(path)
        assert torch.equal(back.lambdas, lam)
        assert back.meta["source_prompt"] == SRC and back.meta["num_steps"] == 3
    assert sorted(os.listdir(tmp_path)) == ["w.json", "w.safetensors"]  # no temporary files left
    bb = tiny_backbone("sd")
    second = random_image(32, 32, seed=1)
    reused = _run(bb, "disentangle", image=second, options={"weights": str(tmp_path / "w.safetensors")})
    direct = _run(bb, "disentangle", image=second, options={"lambdas": lam.tolist()})
    assert torch.equal(reused.latents, direct.latents)
    with pytest.raises(ValueError, match="holds 3 mixing weights"):
        _run(bb, "disentangle", steps=4, options={"weights": str(tmp_path / "w.json")})
    (tmp_path / "bad.json").write_text(json.dumps({"lambdas": [1.0]}))
    with pytest.raises(ValueError, match="not a"):
        MixingWeights.load(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from retouch.models.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_optimisation_reduces_loss_and_saves(tiny_clip_dir, tmp_path):
    bb = tiny_backbone("sd")
    cfg = EditConfig(SRC, TGT, method="disentangle", num_steps=3, solver="ddim")
    out = tmp_path / "lam.json"
    lam = optimise_mixing_weights(bb, random_image(32, 32), cfg, clip_model=str(tiny_clip_dir), epochs=3, save_to=out)
    saved = MixingWeights.load(out)
    history = saved.meta["loss_history"]
    assert len(history) == 3 and history[-1] < history[0], history
    assert torch.equal(saved.lambdas, lam) and not torch.equal(lam, init_lambdas(3))
    assert saved.meta["target_prompt"] == TGT and saved.meta["clip_model"] == str(tiny_clip_dir)


def test_optimisation_without_clip_is_a_clear_error(monkeypatch):
    from retouch.control import disentangle

    monkeypatch.setattr(disentangle, "default_clip_path", lambda: None)
    with pytest.raises(ValueError, match="needs a CLIP model"):
        _run(tiny_backbone("sd"), "disentangle")


# --- registry ------------------------------------------------------------------------------------------------------
def test_methods_json_lists_new_presets(capsys):
    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    presets = {p["name"]: p for p in info["presets"]}
    everywhere = dict.fromkeys(info["families"], True)
    for name in NEW:
        assert set(presets[name]["families"]) == set(everywhere)
        assert info["matrix"][name] == everywhere
    assert {"pnp", "p2p_zero", "disentangle"} <= {e["name"] for e in info["editors"]}


def test_unsupported_family_is_a_clear_error():
    class NoFeatures(SDBackbone):
        feature_blocks = Backbone.feature_blocks

    bb = NoFeatures(tiny_backbone("sd").pipe, name="no-features")
    with pytest.raises(ValueError, match="Plug-and-Play needs feature blocks"):
        _run(bb, "ddim+pnp")
    bb.family = "kandinsky"
    for name in NEW:
        with pytest.raises(ValueError, match="does not support the kandinsky family"):
            _run(bb, name)
