"""P2P's resolution constants follow the latent size (issue 14): the reference's "32**2 tokens" (below the
full-resolution level) and "16x16 maps of down_cross[2:4] + up_cross[:3]" (the ¼-of-latent-side level) are
UNet levels, not token counts, so they must select the same layers at 64 px as at 512 or 1024 px."""

from __future__ import annotations

import pytest

from retouch.backbones.base import LayerInfo
from retouch.control.context import AttnContext, BatchLayout
from retouch.control.p2p import PromptToPrompt, TextAlignment, below_full_resolution, quarter_level


def _sd15_layers() -> list[LayerInfo]:
    """SD 1.x's attention layers as the SD adapter describes them (levels 1, 2, 4 down; 8 mid; 4, 2, 1 up)."""
    out = []
    for place, ds, n in (("down", 1, 2), ("down", 2, 2), ("down", 4, 2), ("mid", 8, 1), ("up", 4, 3), ("up", 2, 3),
                         ("up", 1, 3)):  # fmt: skip
        for _ in range(n):
            for kind in ("self", "cross"):
                out.append(LayerInfo(name=f"{place}{len(out)}", kind=kind, depth=len(out) // 2, place=place,
                                     downsample=ds))  # fmt: skip
    return out


@pytest.mark.parametrize("latent_side", [16, 64, 128])  # 64 px on shapes-sd, 512 px and 1024 px on SD 1.x
def test_self_attention_levels_do_not_depend_on_the_size(latent_side):
    layers = _sd15_layers()
    rule = below_full_resolution(layers)
    chosen = [i for i in layers if i.kind == "self" and rule(i)]
    # the reference at 512 px (latent 64): layers with at most 32**2 tokens
    at_512 = [i for i in layers if i.kind == "self" and (64 // i.downsample) ** 2 <= 32**2]
    assert chosen == at_512
    assert {i.downsample for i in chosen} == {2, 4, 8}
    assert all((latent_side // i.downsample) ** 2 <= (latent_side // 2) ** 2 for i in chosen)


def test_local_blend_reads_the_quarter_level():
    layers = _sd15_layers()
    rule = quarter_level(layers)
    cross = [i for i in layers if i.kind == "cross" and rule(i)]
    assert [(i.place, i.downsample) for i in cross] == [("down", 4)] * 2 + [("up", 4)] * 3  # down[2:4] + up[:3]


def test_single_level_dit_uses_every_layer():
    dit = [LayerInfo(name=f"b{d}.{k}", kind=k, depth=d, place="dit", downsample=2) for d in range(4)
           for k in ("self", "cross")]  # fmt: skip
    assert all(below_full_resolution(dit)(i) for i in dit)
    assert all(quarter_level(dit)(i) for i in dit)


@pytest.mark.parametrize(("steps", "fraction", "replaced"), [(50, 0.4, 20), (4, 0.4, 2), (10, 0.8, 8), (5, 0.4, 2)])
def test_cross_steps_count_as_p2p(steps, fraction, replaced):
    """P2P's get_time_words_attention_alpha has num_steps + 1 entries: int(fraction * (steps + 1)) steps."""
    import torch

    al = TextAlignment(mode="refine", matrix=None, mapper=torch.arange(4), alphas=torch.ones(4), weights=torch.ones(4))
    p2p = PromptToPrompt(al, cross_steps=fraction)
    layer = LayerInfo(name="x", kind="cross", depth=0, place="down", downsample=1)
    active = [
        p2p._cross_active(AttnContext(layer, i, steps, "sample", BatchLayout(2, True), (16, 16))) for i in range(steps)
    ]
    assert sum(active) == replaced and active == sorted(active, reverse=True)
