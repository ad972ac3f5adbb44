"""Qwen-Image, Sana and SD3.5 on tiny random configs: parity of plain sampling with the stock diffusers
pipelines, identity-editor parity and restore, Sana's linear attention, SD3.5's config-read defaults, and every
applicable preset end to end. The family-generic exactness tests of ``test_methods.py`` (Direct Inversion's
exact source branch, equal prompts reproduce the reconstruction, P2P acts) are re-run here on these families by
overriding the ``family`` fixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retouch import solvers
from retouch.backbones.flux import pack, unpack
from retouch.config import EditConfig, InversionConfig, MergeConfig
from retouch.control import IdentityEditor, attention_editing
from retouch.editing import GuidedModel, edit
from retouch.presets import PRESETS
from test_methods import (  # noqa: F401  (re-collected here with this module's ``family`` fixture)
    test_direct_inversion_leaves_uncoupled_target_untouched,
    test_direct_inversion_source_branch_is_exact,
    test_equal_prompts_reproduce_reconstruction,
    test_p2p_changes_target_and_materialises_only_where_needed,
)

from conftest import random_image, tiny_backbone

NEW = ("qwenimage", "sana", "sd35")
PROMPT = "a red circle on a blue background"
SRC, TGT = PROMPT, "a green circle on a blue background"


@pytest.fixture(params=NEW)
def family(request) -> str:
    return request.param


def _noise(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = bb.vae_scale_factor
    return torch.randn(1, bb.latent_channels, 32 // f, 32 // f, generator=g)


def _pipeline_latents(bb, x_t, steps, guidance):
    """The stock pipeline from latent ``x_t`` (plain CFG, no skip-layer guidance), final latent unpacked."""
    kw = dict(num_inference_steps=steps, output_type="latent", height=32, width=32, return_dict=False)
    if bb.family == "qwenimage":  # true CFG needs a negative prompt; "" is what retouch uses
        out = bb.pipe(PROMPT, negative_prompt="", true_cfg_scale=guidance, latents=pack(x_t), **kw)[0]
        return unpack(out, x_t.shape[-2], x_t.shape[-1])
    if bb.family == "sana":
        return bb.pipe(PROMPT, latents=x_t.clone(), guidance_scale=guidance, use_resolution_binning=False, **kw)[0]
    return bb.pipe(PROMPT, latents=x_t.clone(), guidance_scale=guidance, max_sequence_length=256, **kw)[0]


CASES = [("qwenimage", "flow_euler"), ("sana", "dpmpp"), ("sd35", "flow_euler")]


@pytest.mark.parametrize(("name", "solver"), CASES)
@pytest.mark.parametrize("steps", [2, 4, 7])
def test_solver_matches_stock_pipeline(name, solver, steps):
    bb = tiny_backbone(name)
    x_t = _noise(bb)
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, steps, 5.0).float()
        cond, uncond = bb.encode_prompt([PROMPT]), bb.encode_prompt([""])
        grid = bb.grid(solvers.get_solver(solver).grid, steps, (x_t.shape[-2], x_t.shape[-1]))
        ours = solvers.sample(GuidedModel(bb, grid, cond, uncond, 5.0), x_t, grid, solver)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("materialize", [False, True])
def test_identity_editor_reproduces_default_processors(family, materialize):
    bb = tiny_backbone(family)
    x_t = _noise(bb, seed=2)
    before = dict(bb.denoiser.attn_processors)
    linear = any(i.linear for i in bb.attention_layers().values())
    with torch.no_grad():
        ref = _pipeline_latents(bb, x_t, 2, 4.0)
        if materialize and linear:  # Sana: a softmax map of a linear layer does not exist -> refused
            with pytest.raises(ValueError, match="linear"), attention_editing(bb, IdentityEditor(materialize=True)):
                _pipeline_latents(bb, x_t, 2, 4.0)
            with attention_editing(bb, IdentityEditor(True), layers=lambda i: not i.linear) as state:
                out = _pipeline_latents(bb, x_t, 2, 4.0)
        else:
            with attention_editing(bb, IdentityEditor(materialize=materialize)) as state:
                out = _pipeline_latents(bb, x_t, 2, 4.0)
        assert state.calls > 0
        assert (state.prob_calls > 0) == materialize
    atol = max(1e-5, 1e-6 * float(ref.abs().max()))
    assert torch.allclose(out, ref, rtol=0, atol=atol), ((out - ref).abs().max(), atol)
    after = bb.denoiser.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_processors_restored_after_exception(family):
    bb = tiny_backbone(family)
    before = dict(bb.denoiser.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), attention_editing(bb, IdentityEditor()):
        raise RuntimeError("boom")
    after = bb.denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_layer_tables_and_kinds():
    kinds = {n: {i.kind for i in tiny_backbone(n).attention_layers().values()} for n in NEW}
    assert kinds == {"qwenimage": {"joint"}, "sana": {"self", "cross"}, "sd35": {"joint", "self"}}
    sana = tiny_backbone("sana").attention_layers()
    assert all(i.linear == (i.kind == "self") for i in sana.values())
    qwen = tiny_backbone("qwenimage").attention_layers()
    assert all(i.text_first and i.downsample == 2 for i in qwen.values())


def test_linear_attention_matches_sana_processor():
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    from retouch.backbones.sana import SanaLinearProcessor
    from retouch.control.installer import linear_attention

    attn = tiny_backbone("sana").denoiser.transformer_blocks[0].attn1
    assert isinstance(attn, Attention)
    h = torch.randn(2, 16, attn.query_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = SanaLinearAttnProcessor2_0()(attn, h)
        info = tiny_backbone("sana").attention_layers()["transformer_blocks.0.attn1"]
        ours = SanaLinearProcessor(info, lambda q, k, v, layer, **kw: linear_attention(q, k, v))(attn, h)
    assert torch.allclose(ours, ref, atol=1e-6), (ours - ref).abs().max()


def test_sd35_defaults_come_from_the_config():
    sd3, sd35 = tiny_backbone("sd3"), tiny_backbone("sd35")
    assert (sd3.variant, sd3.default_steps, sd3.default_guidance) == ("sd3", 28, 7.0)
    assert (sd35.variant, sd35.default_steps, sd35.default_guidance) == ("sd3.5-medium", 40, 4.5)
    assert sd35.denoiser.config.qk_norm == "rms_norm"


def test_qwen_cfg_rescales_each_token_to_the_conditional_norm():
    bb = tiny_backbone("qwenimage")
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    out = bb.combine_guidance(u, c, 4.0)
    tok = pack  # [B, N, 64]: one row per 2x2 token
    assert torch.allclose(tok(out).norm(dim=-1), tok(c).norm(dim=-1), atol=1e-5)
    comb = u + 4.0 * (c - u)
    cos = torch.nn.functional.cosine_similarity(tok(out), tok(comb), dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_prompt_text_positions_line_up_with_the_encoded_sequence():
    """P2P's word positions must index the text tokens the attention sees (Qwen: after dropping the template's
    34-token prefix; Sana: after bos and the instruction's last token)."""
    from retouch.control import tokens

    qwen = tiny_backbone("qwenimage")
    ids = qwen.tokenizer(qwen.pipe.prompt_template_encode.format(PROMPT))["input_ids"]
    seg = qwen.text_segments()[0]
    tp = tokens.tokenize(seg.tokenizer, PROMPT, max_length=seg.length)
    assert ids[qwen.pipe.prompt_template_encode_start_idx :][: tp.num_real] == list(tp.ids[: tp.num_real])
    sana = tiny_backbone("sana")
    seg = sana.text_segments()[0]
    chi = "\n".join(sana.instruction)
    full = sana.tokenizer(chi + PROMPT)["input_ids"]
    n_chi = len(sana.tokenizer(chi)["input_ids"])
    tp = tokens.tokenize(seg.tokenizer, PROMPT, max_length=seg.length)
    selected = [full[0], *full[n_chi - 1 :]]  # the pipeline's [bos, last 299] selection
    start, stop = tp.num_head, tp.num_head + tp.num_real
    assert seg.offset == 0  # the instruction's trailing space merges into the first word ("▁a")
    assert sana.tokenizer.convert_ids_to_tokens(selected[seg.offset + start]) == "\u2581a"
    # every later prompt token sits where the bare tokenization puts it
    assert selected[seg.offset + start + 1 :] == list(tp.ids[start + 1 : stop])


def _applicable(name):
    fam = tiny_backbone(name).family
    return [p for p in PRESETS.values() if fam in p.families]


@pytest.mark.parametrize("name", NEW)
def test_every_applicable_preset_runs_end_to_end(name):
    bb = tiny_backbone(name)
    presets = _applicable(name)
    assert {"direct+p2p", "direct+masactrl", "direct+pnp", "rf_inversion", "rf_solver", "fireflow"} <= {
        p.name for p in presets
    }
    for p in presets:
        opts = {"lambdas": [0.5] * 3} if p.editor == "disentangle" else {}
        inv = InversionConfig(iterations=1)
        cfg = EditConfig(SRC, TGT, method=p.name, num_steps=3, options=opts, inversion=inv)
        mask = None
        if p.editor == "kv_edit":  # mask-based presets need a mask: the centre quarter
            mask = np.zeros((32, 32), np.float32)
            mask[8:24, 8:24] = 1.0
        res = edit(bb, random_image(32, 32), cfg, mask=mask, keep_latents=True)
        assert res.image.size == (32, 32), p.name
        assert torch.isfinite(res.latents).all(), p.name
        assert res.report["nfe"]["sampling"] >= 3, p.name


@pytest.mark.parametrize("name", NEW)
def test_token_merging_runs_and_reports_the_applied_ratio(name):
    bb = tiny_backbone(name)
    cfg = EditConfig(SRC, TGT, method="direct+p2p", num_steps=2, merge=MergeConfig(ratio=0.5))
    res = edit(bb, random_image(64, 64), cfg)
    rep = res.report["merge"]
    assert rep["merged_calls"] > 0 and rep["applied_ratio"] > 0.3, rep


def test_models_and_methods_list_the_new_families(capsys):
    import json

    from retouch.cli import main

    main(["models", "--json"])
    fams = json.loads(capsys.readouterr().out)["families"]
    assert {"qwenimage", "sana"} <= set(fams)
    main(["methods", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert {"qwenimage", "sana"} <= set(info["families"])


def test_saved_tiny_pipelines_load_through_load_backbone(tmp_path):
    """The hub / folder path: the pipeline class in model_index.json picks the family; the offline tokenizers
    round-trip (Gemma keeps its bos, so Sana's prompt offset probe gives the same answer)."""
    from retouch.backbones import load_backbone
    from retouch.models.tiny import save_tiny_pipeline

    for name in ("qwenimage", "sana"):
        bb = load_backbone(str(save_tiny_pipeline(name, tmp_path / name)))
        ref = tiny_backbone(name)
        assert bb.family == ref.family and bb.attention_layers().keys() == ref.attention_layers().keys()
        assert bb.text_segments()[0].offset == ref.text_segments()[0].offset
        with torch.no_grad():
            assert torch.allclose(
                bb.encode_prompt([PROMPT]).tensors["encoder_hidden_states"],
                ref.encode_prompt([PROMPT]).tensors["encoder_hidden_states"],
            )


@pytest.mark.parametrize("name", ["qwenimage", "sana"])
def test_guidance_distilled_configs_are_refused(name):
    from types import SimpleNamespace

    cls = type(tiny_backbone(name))
    pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=True)))
    with pytest.raises(ValueError, match="guidance"):
        cls(pipe)


from test_benchmarks_smoke import _check_entry, scale  # noqa: E402, F401  (the benchmark module fixture)


@pytest.mark.parametrize(("model", "presets"), [("tiny-qwenimage", ["direct+p2p"]), ("tiny-sana", ["direct+pnp"])])
def test_scale_benchmark_runs_the_new_families(scale, tmp_path, model, presets):  # noqa: F811
    import json

    scale.run_benchmark([(model, (64, 64))], presets=presets, ratios=[0.75], nfe=1, warmup=0, isolate=False,
                        results_dir=tmp_path)  # fmt: skip
    (entry,) = json.loads((tmp_path / f"scale_{model}.json").read_text())["entries"]
    _check_entry(entry, model, presets, 0.75)


@pytest.mark.parametrize(
    ("model", "billions"), [("qwenimage", 20.4), ("sana", 1.6), ("sd35-medium", 2.5), ("sd35-large", 8.1)]
)
def test_published_configs_have_the_published_sizes(scale, model, billions):  # noqa: F811
    """The real-scale specs build (on the meta device: no memory) with the models' published sizes."""
    import diffusers

    spec = scale.MODELS[model]
    with torch.device("meta"):
        denoiser = getattr(diffusers, spec.denoiser_class)(**spec.config)
    # the published counts include SD3's fixed sin-cos position table (a buffer: 384² × 1536 on 3.5 medium)
    n = sum(t.numel() for t in (*denoiser.parameters(), *denoiser.buffers())) / 1e9
    assert n == pytest.approx(billions, rel=0.06), n
