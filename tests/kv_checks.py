"""KV-Edit's foreground-independence check, shared by the tests of every family it runs on."""

from __future__ import annotations

import torch
from torch import Tensor

from retouch.backbones.base import Backbone
from retouch.control import attention_editing
from retouch.control.kv_edit import make_kv_edit
from retouch.editing import GuidedModel
from retouch.types import Conditioning, NoiseGrid


def check_foreground_attends_to_cached_background(
    bb: Backbone, cfg, cond: Conditioning, z0: Tensor, grid: NoiseGrid, lat: Tensor
) -> None:
    """With the cache filled at grid point 2, the target's foreground prediction does not depend on the target's
    own background latent (its background keys / values are the cached ones); without KV-Edit it does. A target
    equal to the cached source reproduces the source's prediction. ``lat`` is the latent mask, ``cond`` two rows
    (source, target), ``z0`` the clean latent ``[1, C, h, w]``."""
    fg_cells = lat[0, 0] > 0
    assert 0 < int(fg_cells.sum()) < fg_cells.numel()
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    x_src = grid.alphas[2] * z0 + grid.sigmas[2] * noise
    bg_only = (~fg_cells).float()
    g = torch.Generator().manual_seed(2)
    x_a = torch.cat([x_src, x_src + bg_only * torch.randn(z0.shape, generator=g)])
    x_b = torch.cat([x_src, x_src + bg_only * torch.randn(z0.shape, generator=g)])

    def predict(editor, xs):
        with attention_editing(bb, editor) as state:
            state.num_steps = 4
            if editor is not None:
                editor.set_mask(lat)
                state.phase = "invert"
                GuidedModel(bb, grid, cond.select([0]), None, 1.0, state)(x_src, grid.at(2))
                assert editor.cache, "the inversion call cached no background keys / values"
            state.phase, state.step = "sample", 2
            model = GuidedModel(bb, grid, cond, None, 1.0, state)
            return [model(x, grid.at(2)).x0 for x in xs]

    with torch.no_grad():
        kv = make_kv_edit(bb, cfg, skip=0, attn_scale=0.0)
        a, b, same = predict(kv, [x_a, x_b, torch.cat([x_src, x_src])])
        assert torch.allclose(a[1][:, fg_cells], b[1][:, fg_cells], atol=1e-5)
        assert torch.allclose(same[1], same[0], atol=1e-5)
        a0, b0 = predict(None, [x_a, x_b])
        assert not torch.allclose(a0[1][:, fg_cells], b0[1][:, fg_cells], atol=1e-4)
