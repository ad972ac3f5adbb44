"""FlowEdit, RF-Inversion's reference modes and value replay on tiny random models (offline, fast)."""

from __future__ import annotations

import pytest
import torch

from retouch.config import EditConfig, InversionConfig
from retouch.editing import edit, resolve
from retouch.presets import PRESETS

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"


def _run(bb, method, src=SRC, tgt=TGT, **kw):
    return edit(bb, random_image(32, 32), EditConfig(src, tgt, method=method, **kw), keep_latents=True)


@pytest.mark.parametrize("family", ["sd", "pixart", "sd3", "flux"])
def test_flowedit_with_equal_prompts_and_guidance_returns_the_source(family):
    """z_tar = z_src while the edit is zero, so equal prompts at equal guidance give dV = 0 at every step: the
    output is the input latent (on VP grids through the flow view too), up to the rounding of
    ``x_src + z_src - x_src`` (the reference computes z_tar the same way), which the random models amplify to at
    most 2.6e-5 (PixArt, whose x0 = (x - s eps) / a divides by a = 0.07 at the noisy end); a real edit moves the
    latent by 0.2-2.8 on the same models."""
    bb = tiny_backbone(family)
    method = "flowedit" if family == "flux" else "flowedit_sd3"
    res = _run(bb, method, src=SRC, tgt=SRC, num_steps=6, guidance=3.0,
               options={"n_max": 5, "source_guidance": 3.0})  # fmt: skip
    assert torch.allclose(res.latents[1], res.latents[0], atol=1e-4)
    assert res.report["nfe"] == {"inversion": 0, "sampling": 5, "total": 5}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_flowedit_edits_and_n_max_zero_is_identity(family):
    bb = tiny_backbone(family)
    method = "flowedit" if family == "flux" else "flowedit_sd3"
    moved = _run(bb, method, num_steps=6, options={"n_max": 4})
    assert not torch.allclose(moved.latents[1], moved.latents[0], atol=1e-4)
    assert moved.report["guidance"] == [PRESETS[method].options["source_guidance"], PRESETS[method].guidance]
    still = _run(bb, method, num_steps=6, options={"n_max": 0})
    assert torch.equal(still.latents[1], still.latents[0])
    # n_max beyond the steps integrates them all (the reference's `T_steps - i > n_max` test)
    over = _run(bb, method, num_steps=6, options={"n_max": 9})
    assert over.report["nfe"]["sampling"] == 6
    with pytest.raises(ValueError, match="n_min"):
        _run(bb, method, num_steps=6, options={"n_max": 2, "n_min": 3})


def test_flowedit_n_min_switches_to_plain_sampling():
    bb = tiny_backbone("flux")
    a = _run(bb, "flowedit", num_steps=6, options={"n_max": 4, "n_min": 0})
    b = _run(bb, "flowedit", num_steps=6, options={"n_max": 4, "n_min": 2})
    assert a.report["nfe"]["sampling"] == b.report["nfe"]["sampling"] == 4
    assert not torch.allclose(a.latents[1], b.latents[1], atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rf_inversion_source_branch_adds_nothing_to_the_edit(family):
    """The controlled reverse ODE never reads the source branch: sampling it beside the target (the old default)
    leaves the edited row unchanged and only costs batch items."""
    bb = tiny_backbone(family)
    alone = _run(bb, "rf_inversion", num_steps=5)
    both = _run(bb, "rf_inversion", num_steps=5, options={"source_branch": True})
    assert alone.latents.shape[0] == 1 and both.latents.shape[0] == 2
    assert torch.allclose(alone.latents[0], both.latents[1], atol=1e-5)
    assert alone.reconstruction is None and both.reconstruction is not None


def test_rf_inversion_keeps_inversion_guidance_zero():
    """A preset's inversion guidance 0 (RF-Inversion's) used to become 1 on resolution (``0 or 1.0``)."""
    bb = tiny_backbone("flux")
    res = resolve(bb, EditConfig(SRC, TGT, method="rf_inversion"))
    assert res.config.inversion.guidance == 0.0


def test_rf_inversion_community_schedule_differs_and_is_validated():
    bb = tiny_backbone("flux")
    grid = _run(bb, "rf_inversion", num_steps=5)
    comm = _run(bb, "rf_inversion_ref", num_steps=5)
    assert comm.report["nfe"] == grid.report["nfe"] == {"inversion": 5, "sampling": 5, "total": 10}
    assert not torch.allclose(grid.trajectory.noise, comm.trajectory.noise, atol=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        _run(bb, "rf_inversion", num_steps=3, inversion=InversionConfig(options={"schedule": "uniform"}))


@pytest.mark.parametrize("method", ["rf_solver_ref", "fireflow_ref"])
def test_value_replay_runs_target_only_and_injects(method):
    bb = tiny_backbone("flux")
    res = _run(bb, method, num_steps=4)
    per_step = 2 if method == "rf_solver_ref" else 1
    assert res.report["source_branch"] is False and res.latents.shape[0] == 1
    assert res.report["nfe"]["sampling"] == 4 * per_step + (0 if per_step == 2 else 1)
    off = _run(bb, method, num_steps=4, options={"inject": 0})
    assert torch.equal(off.trajectory.noise, res.trajectory.noise)
    assert not torch.allclose(off.latents, res.latents, atol=1e-5)


def test_value_replay_refuses_families_without_single_blocks_and_bad_inject():
    with pytest.raises(ValueError, match="does not support"):
        _run(tiny_backbone("sd3"), "rf_solver_ref", num_steps=3)
    with pytest.raises(ValueError, match="inject"):
        _run(tiny_backbone("flux"), "rf_solver_ref", num_steps=3, options={"inject": -1})


def test_edit_uses_the_given_latent_and_noise():
    bb = tiny_backbone("flux")
    f = bb.vae_scale_factor
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, bb.latent_channels, 64 // f, 64 // f, generator=g)
    draws: list[tuple[int, ...]] = []

    def noise(shape):
        draws.append(tuple(shape))
        return torch.zeros(shape)

    res = edit(bb, random_image(64, 64), EditConfig(SRC, TGT, method="flowedit", num_steps=4, options={"n_max": 3}),
               latent=z, noise=noise, keep_latents=True)  # fmt: skip
    assert torch.equal(res.latents[0], z[0]) and len(draws) == 3
    with pytest.raises(ValueError, match="latent has shape"):
        edit(bb, random_image(64, 64), EditConfig(SRC, TGT, method="flowedit", num_steps=4, options={"n_max": 3}),
             latent=z[..., :2, :2])  # fmt: skip


def test_methods_json_lists_the_flow_reference_presets(capsys):
    import json

    from retouch.cli import main

    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in info["presets"]}
    assert {"flowedit", "flowedit_sd3", "rf_inversion_ref", "rf_solver_ref", "fireflow_ref"} <= names
    from retouch.backbones import FAMILIES

    def only(*families):
        return {family: family in families for family in FAMILIES}

    assert info["matrix"]["flowedit"] == only("flux", "flux2")  # the guidance-embedding settings (FLUX_exp)
    assert info["matrix"]["flowedit_sd3"] == only("sd", "pixart", "sd3", "qwenimage", "sana", "zimage", "flux2")
    assert info["matrix"]["value_replay"] == only("flux")
