"""The editor contract (control/contract.py): every registered editor derives from it, the no-op defaults change
nothing, composition combines the run-level answers, the step context is validated, and the backbone adapters
declare the layers editors default to and hand Flux's text length to its processors as an argument."""

from __future__ import annotations

import logging

import pytest
import torch

from retouch.config import EditConfig
from retouch.control import Editor, IdentityEditor, StepContext, attention_editing
from retouch.control.compose import ComposedEditor
from retouch.control.editors import EDITORS
from retouch.control.steps import to_steps
from retouch.editing import edit
from retouch.guided import GuidedModel
from retouch.types import Pred

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_every_registered_editor_derives_from_the_contract(family):
    bb = tiny_backbone(family)
    cfg = EditConfig(SRC, TGT, num_steps=4, solver="ddim")
    built = []
    for spec in EDITORS.values():
        if family not in spec.families:
            continue
        options = {"lambdas": [0.5] * 4} if spec.name == "disentangle" else {}  # given weights: no CLIP needed
        editor = spec.build(bb, cfg, options)
        assert isinstance(editor, Editor), f"{spec.name} builds a {type(editor).__name__}, not an Editor"
        built.append(spec.name)
    assert {"identity", "p2p", "masactrl", "pnp", "p2p_zero", "flowedit", "disentangle"} <= set(built)


def test_default_hooks_change_nothing():
    e = Editor()
    x = torch.randn(2, 4, 8, 8)
    grid = tiny_backbone("sd").grid("ddim", 4, (8, 8))
    from retouch.control.context import BatchLayout

    ctx = StepContext(step=1, num_steps=4, grid=grid, layout=BatchLayout(2, False), latent_hw=(8, 8))
    p = Pred(x0=x, eps=x * 2)
    assert e.before_step(ctx, x, None) is None and e.after_step(ctx, x) is None  # type: ignore[arg-type]
    assert e.modify_prediction(ctx, x, p) is p
    assert e.step_conditioning(ctx, None) is None  # type: ignore[arg-type]
    assert e.grid_start(4) == 0 and e.branch_guidance(7.5) is None and e.source_branch
    assert e.set_mask(None) is None and e.sample(None, x, grid, None) is None  # type: ignore[arg-type]
    with e.install(None, None):  # type: ignore[arg-type]
        pass
    assert not e.applies(None)  # type: ignore[arg-type]


def test_step_context_reads_the_grid_and_refuses_a_step_outside_it():
    from retouch.control.context import BatchLayout

    grid = tiny_backbone("sd").grid("ddim", 4, (8, 8))
    ctx = StepContext(step=2, num_steps=4, grid=grid, layout=BatchLayout(2, True), latent_hw=(8, 8))
    assert torch.equal(ctx.sigma, grid.sigmas[2]) and torch.equal(ctx.alpha_next, grid.alphas[3])
    assert ctx.at(3).step == 3 and ctx.at(3).grid is grid
    with pytest.raises(ValueError, match="outside the grid"):
        StepContext(step=5, num_steps=4, grid=grid, layout=BatchLayout(2, True), latent_hw=(8, 8))


class _Guide(Editor):
    source_branch = False

    def branch_guidance(self, guidance: float) -> tuple[float, ...] | None:
        return (1.0, guidance)

    def grid_start(self, num_steps: int) -> int:
        return 2


def test_composition_combines_run_level_answers():
    both = ComposedEditor([IdentityEditor(), _Guide()])
    assert both.source_branch is False and both.branch_guidance(5.0) == (1.0, 5.0) and both.grid_start(9) == 2
    plain = ComposedEditor([IdentityEditor(), IdentityEditor()])
    assert plain.source_branch is True and plain.branch_guidance(5.0) is None and plain.grid_start(9) == 0


class _Counter(Editor):
    """Counts the loop hooks and checks the context each one gets."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {"step_conditioning": [], "before": [], "after": [], "pred": []}

    def step_conditioning(self, ctx, cond):
        self.seen["step_conditioning"].append(ctx.step)
        return None

    def before_step(self, ctx, x, model):
        assert ctx.num_steps == 3 and ctx.layout.branches == 2 and ctx.cond is not None
        self.seen["before"].append(ctx.step)
        return None

    def modify_prediction(self, ctx, x, p):
        self.seen["pred"].append(ctx.step)
        return p

    def after_step(self, ctx, x):
        self.seen["after"].append(ctx.step)
        return None


def test_the_loop_calls_every_step_hook_once_per_step(monkeypatch):
    bb = tiny_backbone("sd")
    counter = _Counter()
    import dataclasses

    spec = dataclasses.replace(EDITORS["identity"], factory=lambda backbone, config, **kw: counter)
    monkeypatch.setitem(EDITORS, "identity", spec)
    res = edit(bb, random_image(), EditConfig(SRC, TGT, method="identity", num_steps=3, solver="ddim"))
    assert counter.seen == {"step_conditioning": [0, 1, 2], "before": [0, 1, 2], "after": [0, 1, 2], "pred": [0, 1, 2]}
    assert res.report["nfe"]["sampling"] == 3


def test_step_fractions_mean_one_thing():
    assert to_steps(1.0, 50, "x") == 50 and to_steps(1, 50, "x") == 1 and to_steps(0.5, 7, "x") == 4
    assert to_steps(10 / 16, 16, "x") == 10 and to_steps(4, 50, "x") == 4
    for bad in (1.5, -1, True, "3"):
        with pytest.raises(ValueError, match="x"):
            to_steps(bad, 10, "x")  # type: ignore[arg-type]


def test_adapters_declare_the_editor_default_layers():
    sd = tiny_backbone("sd")
    assert sd.pnp_feature_layers() == ["up_blocks.1.resnets.1"] and sd.multiscale
    assert all(".up_blocks." in "." + n for n in sd.pnp_attention_layers())
    for family in ("pixart", "sd3", "flux"):
        bb = tiny_backbone(family)
        blocks = sorted(bb.feature_blocks().values(), key=lambda i: i.depth)
        assert bb.pnp_feature_layers() == [blocks[(len(blocks) - 1) // 2].name]
        depths = [bb.attention_layers()[n].depth for n in bb.pnp_attention_layers()]
        top = max(i.depth for i in bb.attention_layers().values()) + 1
        assert depths and min(depths) >= round(top / 2) and not bb.multiscale
        assert bb.masactrl_start_layer == 0.5
    assert sd.masactrl_start_layer == 10 / 16


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_flux_text_length_reaches_the_processors_as_an_argument(family, caplog):
    if family == "flux2":
        from retouch.backbones import from_pipeline
        from retouch.models.tiny_next import tiny_flux2_pipeline

        bb = from_pipeline(tiny_flux2_pipeline(variant="dev"))
    else:
        bb = tiny_backbone(family)
    cond = bb.encode_prompt([SRC])
    grid = bb.grid("flow", 2, (8, 8))
    x = torch.randn(1, bb.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        plain = GuidedModel(bb, grid, cond, None, 1.0)(x, grid.at(0)).x0
        with attention_editing(bb, IdentityEditor()) as state:
            real = state.attend

            def attend(q, k, v, layer, **kw):
                if layer.kind == "single":
                    seen.append(kw["num_text"])
                return real(q, k, v, layer, **kw)

            state.attend = attend  # type: ignore[method-assign]
            procs = bb.attn_processors()
            for p in procs.values():
                p.attend = attend
            routed = GuidedModel(bb, grid, cond, None, 1.0, state)(x, grid.at(0)).x0
    assert seen and set(seen) == {cond.tensors["encoder_hidden_states"].shape[1]}
    assert torch.allclose(plain, routed, atol=1e-5)
    assert "not expected" not in caplog.text  # diffusers' own processors are not handed the argument
