"""The reversible installer: puts routing processors on a backbone's attention layers and restores the
original processors on exit, whatever happens inside."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.backbones.base import Backbone, LayerInfo
from retouch.control.context import AttentionEditor, AttnContext, BatchLayout

log = logging.getLogger(__name__)

LayerSelector = Callable[[LayerInfo], bool]


def all_layers(layer: LayerInfo) -> bool:
    return True


def attention_probs(q: Tensor, k: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Softmax attention probabilities ``[B, h, Nq, Nk]`` as SDPA computes them (scale 1/sqrt(d))."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(dim=-1)


@dataclass
class EditState:
    """Mutable per-run state the sampling loop updates: step, phase, batch layout, latent size."""

    editor: AttentionEditor | None
    step: int = -1
    num_steps: int = 0
    phase: str = "other"
    layout: BatchLayout = field(default_factory=lambda: BatchLayout(1, False))
    latent_hw: tuple[int, int] = (0, 0)
    calls: int = 0
    prob_calls: int = 0
    merger: Any = None  # a retouch.merging.TokenMerger, or None

    def merge(self, hidden: Tensor, layer: LayerInfo) -> tuple[Tensor, Any]:
        """Merge the image tokens ``[B, N, C]`` of ``layer`` if merging applies there; returns (tokens, plan)."""
        merger = self.merger
        if merger is None or merger.ratio <= 0 or not merger.layers(layer) or self.latent_hw == (0, 0):
            return hidden, None
        grid = layer.resolution(self.latent_hw)
        if grid[0] * grid[1] != hidden.shape[1]:
            return hidden, None
        source_row = self.layout.row(0, cond=True) if hidden.shape[0] == self.layout.size else 0
        plan = merger.plan(hidden, layer, grid, source_row, self.step)
        return plan.merge(hidden), plan

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layer: LayerInfo,
        *,
        attn_mask: Tensor | None = None,
        num_text: int = 0,
    ) -> Tensor:
        self.calls += 1
        editor = self.editor
        if editor is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        ctx = AttnContext(
            layer=layer,
            step=self.step,
            num_steps=self.num_steps,
            phase=self.phase,
            layout=self.layout,
            latent_hw=self.latent_hw,
            num_text=num_text,
        )
        if not editor.applies(ctx):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        q, k, v = editor.edit_qkv(q, k, v, ctx)
        if editor.needs_probs(ctx):
            self.prob_calls += 1
            probs = editor.edit_probs(attention_probs(q, k, attn_mask), ctx)
            return probs.to(v.dtype) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


@contextmanager
def attention_editing(
    backbone: Backbone, editor: AttentionEditor | None, *, layers: LayerSelector = all_layers, merger: Any = None
) -> Iterator[EditState]:
    """Install ``editor`` on the layers ``layers`` selects; restore the original processors on exit.

    Raises:
        ValueError: if the selector matches no attention layer.
    """
    den = backbone.denoiser
    original = dict(den.attn_processors)
    infos = backbone.attention_layers()
    chosen = {name: info for name, info in infos.items() if layers(info)}
    if not chosen:
        raise ValueError(f"the layer selector matched none of the {len(infos)} attention layers of {backbone.family}")
    state = EditState(editor=editor, merger=merger)
    procs = dict(original)
    for name, info in infos.items():
        if name in chosen or (merger is not None and merger.layers(info)):
            procs[f"{name}.processor"] = backbone.make_processor(info, state.attend, state.merge)
    den.set_attn_processor(procs)
    try:
        yield state
    finally:
        den.set_attn_processor(original)
