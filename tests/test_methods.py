"""Editing methods on tiny random models of every family: exactness properties that must hold whatever
the weights (Direct Inversion's exact source branch, P2P/MasaCtrl identity with equal prompts, RF control)."""

from __future__ import annotations

import pytest
import torch

from retouch.backbones import FAMILIES
from retouch.config import EditConfig, InversionConfig
from retouch.control.editors import EDITORS
from retouch.editing import edit
from retouch.presets import PRESETS

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"


def _run(bb, method, src=SRC, tgt=TGT, steps=4, **kw):
    return edit(bb, random_image(32, 32), EditConfig(src, tgt, method=method, num_steps=steps, **kw), keep_latents=True)


def test_direct_inversion_source_branch_is_exact(family):
    bb = tiny_backbone(family)
    res = _run(bb, "direct+p2p")
    z0 = res.trajectory.latents[-1][0]
    assert torch.equal(res.latents[0], z0)
    plain = _run(bb, "ddim+p2p") if family in ("sd", "pixart") else None
    if plain is not None:  # on a random model the uncorrected source branch drifts away from z0
        assert not torch.allclose(plain.latents[0], z0, atol=1e-3)


def test_direct_inversion_leaves_uncoupled_target_untouched(family):
    """With no attention coupling (identity editor) the target branch must equal the uncorrected run's."""
    bb = tiny_backbone(family)
    plain = _run(bb, "identity")
    direct = _run(bb, "identity", inversion=InversionConfig(name="direct"))
    assert torch.allclose(direct.latents[1], plain.latents[1], atol=1e-5)
    assert torch.equal(direct.latents[0], direct.trajectory.latents[-1][0])


@pytest.mark.parametrize("method", ["ddim+p2p", "masactrl"])
def test_equal_prompts_reproduce_reconstruction(family, method):
    """P2P / MasaCtrl with identical prompts change nothing: both branches are the plain reconstruction.
    (With Direct Inversion the source branch is pinned and the target is not, so they legitimately differ.
    The ``ddim+masactrl`` preset regenerates the source branch under "" as the paper's code does, so the bare
    ``masactrl`` editor on DDIM inversion is the one whose branches share a prompt.)"""
    bb = tiny_backbone(family)
    ref = _run(bb, "identity", src=SRC, tgt=SRC, inversion=InversionConfig(name="ddim"), solver="ddim")
    kw = {"options": {"start_step": 0}, "inversion": InversionConfig(name="ddim"), "solver": "ddim"}
    res = _run(bb, method, src=SRC, tgt=SRC, **(kw if method == "masactrl" else {}))
    assert torch.allclose(res.latents[1], res.latents[0], atol=1e-5)
    # P2P materialises softmax where the identity run uses fused SDPA: equal up to float rounding
    assert torch.allclose(res.latents[1], ref.latents[1], atol=5e-4, rtol=1e-4)


def test_p2p_changes_target_and_materialises_only_where_needed(family):
    bb = tiny_backbone(family)
    ident = _run(bb, "identity")
    p2p = _run(bb, "ddim+p2p", solver="ddim")
    assert not torch.allclose(p2p.latents[1], ident.latents[1], atol=1e-6)
    calls = p2p.report["attention_calls"]
    edited = calls["materialised"] + calls["block"]
    assert 0 < edited < calls["total"]
    if family in ("sd3", "flux"):  # joint attention: only the image->text block, never the full map
        assert calls["materialised"] == 0 and calls["block"] > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_p2p_joint_block_path_equals_full_map(family, monkeypatch):
    """The fused-output + block-correction path gives the same edit as materialising the whole joint map."""
    from retouch.control.p2p import PromptToPrompt

    bb = tiny_backbone(family)
    opts = {"blend_words": "red green"}
    block = _run(bb, "ddim+p2p", solver="ddim", options=opts)
    monkeypatch.setattr(PromptToPrompt, "probs_block", lambda self, ctx, seq_len: None)
    full = _run(bb, "ddim+p2p", solver="ddim", options=opts)
    assert full.report["attention_calls"]["block"] == 0 and full.report["attention_calls"]["materialised"] > 0
    assert torch.allclose(block.latents, full.latents, atol=1e-4, rtol=1e-4)
    ident = _run(bb, "identity")
    assert not torch.allclose(block.latents[1], ident.latents[1], atol=1e-4)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("path", ["kernel", "chunked"])
def test_attention_with_lse_and_blocks_match_the_softmax(mask, path):
    import retouch.control.installer as inst

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (20, 26, 26))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 20, 26, generator=g) > 0.3
        m[..., 0] = True  # every row keeps a key
    elif mask == "float":
        m = torch.randn(2, 1, 1, 26, generator=g)
    if path == "chunked":
        out, lse = inst.F.scaled_dot_product_attention(q, k, v, attn_mask=m), inst._chunked_lse(q, k, m, chunk=7)
    else:
        out, lse = inst.attention_with_lse(q, k, v, m)
    probs = inst.attention_probs(q, k, m)
    assert torch.allclose(out, probs @ v, atol=1e-5)
    rows, cols = slice(4, 17), slice(20, 26)
    assert torch.allclose(inst.attention_block(q, k, lse, rows, cols, m), probs[:, :, rows, cols], atol=1e-6)


def test_masactrl_preset_uses_the_empty_source_prompt():
    """MasaCtrl's code inverts and regenerates the source branch under "": the preset does too, and then the
    user's source prompt may be empty (elsewhere an empty source prompt is still an error)."""
    bb = tiny_backbone("sd")
    res = _run(bb, "ddim+masactrl", src="", options={"start_step": 0})
    assert res.report["source_branch_prompt"] == ""
    same = _run(bb, "ddim+masactrl", src=SRC, options={"start_step": 0})  # the source prompt is not used
    assert torch.equal(res.latents, same.latents)
    bare = _run(bb, "masactrl", src=SRC, inversion=InversionConfig(name="ddim"), solver="ddim",
                options={"start_step": 0})  # fmt: skip
    assert not torch.allclose(bare.latents[0], res.latents[0], atol=1e-4)
    with pytest.raises(ValueError, match="prompt is empty"):
        _run(bb, "ddim+p2p", src="")


def test_masactrl_keeps_fused_attention():
    res = _run(tiny_backbone("sd"), "ddim+masactrl", options={"start_step": 0, "start_layer": 0})
    assert res.report["attention_calls"]["materialised"] == 0


def test_local_blend_keeps_background():
    bb = tiny_backbone("sd")
    res = _run(bb, "ddim+p2p", options={"blend_words": "red green", "blend_start": 0.0, "blend_threshold": 0.99})
    assert res.latents is not None  # a threshold near 1 keeps almost everything at the source
    diff = (res.latents[1] - res.latents[0]).abs().mean()
    free = _run(bb, "ddim+p2p")
    assert diff < (free.latents[1] - free.latents[0]).abs().mean()


def test_dit4edit_runs_on_pixart_only():
    res = _run(tiny_backbone("pixart"), "dit4edit", steps=None)
    assert res.report["num_steps"] == 30 and res.report["guidance"] == 4.5 and res.report["solver"] == "dpmpp"
    assert res.report["inversion"] == "dpmpp"
    with pytest.raises(ValueError, match="does not support the sd family"):
        _run(tiny_backbone("sd"), "dit4edit")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rf_inversion_eta_one_returns_to_image_latent(family):
    """With eta = 1 on every step the controlled reverse ODE is the straight line to y0: exact recovery."""
    bb = tiny_backbone(family)
    res = _run(bb, "rf_inversion", steps=6, options={"eta": 1.0, "start": 0.0, "stop": 1.0})
    z0 = res.trajectory.latents[-1][0]
    assert torch.allclose(res.latents[-1], z0, atol=1e-4)  # the target row (no source branch by default)
    assert res.report["config"]["inversion"]["prompt"] == ""


@pytest.mark.parametrize("method", ["rf_inversion", "rf_solver", "fireflow"])
def test_flow_presets_run_and_count_nfe(method):
    bb = tiny_backbone("flux")
    res = _run(bb, method, steps=5)
    nfe = res.report["nfe"]
    expected = {"rf_inversion": (5, 5), "rf_solver": (10, 10), "fireflow": (6, 6)}[method]
    assert (nfe["inversion"], nfe["sampling"]) == expected


def test_every_preset_is_registered_and_known_editor():
    for p in PRESETS.values():
        assert p.editor in EDITORS
        assert set(p.families) <= set(FAMILIES)


def test_unknown_option_and_unsupported_family_are_errors():
    with pytest.raises(ValueError, match="unknown option"):
        _run(tiny_backbone("sd"), "ddim+p2p", options={"frobnicate": 1})
    with pytest.raises(ValueError, match="does not support the sd family"):
        _run(tiny_backbone("sd"), "rf_inversion")


def _source_error(res):
    z0 = res.trajectory.latents[-1][0]
    return float((res.latents[0] - z0).norm() / z0.norm())


def test_null_text_and_negative_prompt_beat_plain_ddim_under_guidance():
    bb = tiny_backbone("sd")
    kw = dict(steps=5, guidance=7.5)
    plain = _source_error(_run(bb, "ddim+p2p", **kw))
    nti = _run(bb, "null_text+p2p", **kw)
    npi = _source_error(_run(bb, "negative_prompt+p2p", **kw))
    per_step = [c.tensors["encoder_hidden_states"] for c in nti.trajectory.extras["uncond_per_step"]]
    assert len(per_step) == 5
    # one embedding per step: the optimiser's in-place updates must not reach the earlier steps' (they once did)
    assert len({t.data_ptr() for t in per_step}) == 5
    assert not torch.equal(per_step[0], per_step[-1])
    assert _source_error(nti) < plain and npi < plain, (_source_error(nti), npi, plain)
    assert nti.report["nfe"]["inversion"] > 5  # the optimisation's forward passes are counted


def test_p2p_self_copy_on_queries_keys_equals_map_copy():
    from retouch.backbones.base import LayerInfo
    from retouch.control.context import AttnContext, BatchLayout
    from retouch.control.installer import attention_probs
    from retouch.control.p2p import PromptToPrompt

    layout = BatchLayout(3, cfg=True)
    layer = LayerInfo("blk.attn1", "self", 0, "dit", 1)
    ctx = AttnContext(layer=layer, step=0, num_steps=10, phase="sample", layout=layout, latent_hw=(4, 4))
    editor = PromptToPrompt(alignment=None, self_steps=0.5)  # the self path never reads the text alignment
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.size, 2, 16, 8, generator=g) for _ in range(3))
    assert editor.applies(ctx) and not editor.needs_probs(ctx)
    out = torch.nn.functional.scaled_dot_product_attention(*editor.edit_qkv(q, k, v, ctx))
    probs = attention_probs(q, k)
    src = layout.row(0, True)
    for b in (1, 2):
        probs[layout.row(b, True)] = probs[src]
    assert torch.allclose(out, probs @ v, atol=1e-5)
    # the unconditional half and the source row are untouched
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out[: layout.branches + 1], plain[: layout.branches + 1], atol=1e-6)
    assert not torch.allclose(out[layout.row(1, True)], plain[layout.row(1, True)], atol=1e-3)


def test_p2p_replace_rewrite_touches_only_replaced_columns_and_equals_the_full_product():
    from retouch.control.p2p import PromptToPrompt, TextAlignment

    g = torch.Generator().manual_seed(2)
    matrix = torch.eye(12)
    matrix[3, 3], matrix[3, 4], matrix[5, 4] = 0.0, 0.5, 0.5  # a word of one token replaced by two
    weights = torch.ones(12)
    weights[7] = 2.0
    al = TextAlignment(mode="replace", matrix=matrix, mapper=None, alphas=None, weights=weights)
    assert al.changed_columns.tolist() == [3, 4] and al.reweighted
    a_src = torch.rand(2, 9, 12, generator=g)
    new = PromptToPrompt(al)._rewrite(a_src, torch.rand(2, 9, 12, generator=g))
    assert torch.allclose(new, (a_src @ matrix) * weights, atol=1e-6)
