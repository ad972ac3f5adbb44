"""Token merging inside edits: applied ratio, branch alignment, reversibility, composition with control."""

from __future__ import annotations

import pytest
import torch

from retouch.config import EditConfig, InversionConfig, MergeConfig
from retouch.editing import edit

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"


def _run(bb, method="identity", tgt=SRC, ratio=0.5, steps=3, size=(32, 32), **kw):
    cfg = EditConfig(SRC, tgt, method=method, num_steps=steps, merge=MergeConfig(ratio=ratio), **kw)
    return edit(bb, random_image(*size), cfg, keep_latents=True)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.8])
def test_requested_ratio_is_applied(family, ratio):
    bb = tiny_backbone(family)
    res = _run(bb, ratio=ratio, size=(64, 64))
    m = res.report["merge"]
    assert m["merged_calls"] > 0
    assert abs(m["applied_ratio"] - ratio) < 0.05, m


def test_merging_changes_output_and_restores_processors(family):
    bb = tiny_backbone(family)
    before = dict(bb.denoiser.attn_processors)
    plain = _run(bb, ratio=0.0)
    merged = _run(bb, ratio=0.5)
    assert plain.report["merge"] is None
    assert not torch.allclose(plain.latents, merged.latents)
    after = bb.denoiser.attn_processors
    assert all(after[k] is before[k] for k in before)
    again = _run(bb, ratio=0.0)
    assert torch.equal(again.latents, plain.latents)


@pytest.mark.parametrize("method", ["ddim+p2p", "masactrl"])
def test_shared_plans_keep_branches_aligned(family, method):
    """Equal prompts + merging + control: both branches stay identical (one merge plan for all rows). The bare
    ``masactrl`` editor on DDIM inversion: the MasaCtrl presets regenerate the source branch under "")."""
    bb = tiny_backbone(family)
    kw = {"options": {"start_step": 0}, "inversion": InversionConfig(name="ddim"), "solver": "ddim"}
    res = _run(bb, method=method, ratio=0.5, size=(32, 64), **(kw if method == "masactrl" else {}))
    assert torch.allclose(res.latents[0], res.latents[1], atol=1e-5)


def test_merge_config_validation():
    with pytest.raises(ValueError, match="merge ratio"):
        MergeConfig(ratio=0.99)
