"""MasaCtrl mutual self-attention (Cao et al., ICCV 2023) and its joint-attention analogue.

From step ``start_step`` on, in the selected layers, the target branch's queries attend to the *source*
branch's keys and values: ``out_tgt = softmax(Q_tgt K_src^T / sqrt(d)) V_src``, in each CFG half separately.
The source branch keeps its own attention, so it reproduces itself. Only K/V are swapped, so the fused
``scaled_dot_product_attention`` path stays (no probabilities are materialised).

In joint attention (SD3, Flux) only the *image* tokens' keys/values are taken from the source; text tokens
keep the target prompt's keys/values ("key/value injection from the source branch").
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from retouch.backbones.base import LayerInfo
from retouch.control.context import AttnContext
from retouch.control.contract import Editor


class MutualSelfAttention(Editor):
    """Mutual self-attention control.

    Args:
        start_step: first sampling step (0 = noisiest) at which K/V are shared.
        end_step: step at which sharing stops (exclusive; ``None`` = to the end).
        layers: predicate selecting the layers (self-attention, or joint / single for SD3 / Flux).
    """

    def __init__(
        self,
        *,
        start_step: int = 4,
        end_step: int | None = None,
        layers: Callable[[LayerInfo], bool] | None = None,
        share: str = "kv",
    ) -> None:
        self.share = share  # kv (MasaCtrl) or v (RF-Solver-Edit's value injection); checked by MasaCtrlOptions
        self.start_step = start_step
        self.end_step = end_step
        self.layers = layers or (lambda info: True)

    def applies(self, ctx: AttnContext) -> bool:
        if ctx.phase != "sample" or ctx.layout.branches < 2 or ctx.layer.kind == "cross":
            return False
        if ctx.step < self.start_step or (self.end_step is not None and ctx.step >= self.end_step):
            return False
        return self.layers(ctx.layer)

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        layout = ctx.layout
        k, v = (k.clone() if self.share == "kv" else k), v.clone()
        seq = k.shape[2]
        img = ctx.image_slice(seq)
        for cond in (False, True) if layout.cfg else (True,):
            src = layout.row(0, cond)
            for b in range(1, layout.branches):
                tgt = layout.row(b, cond)
                if self.share == "kv":
                    k[tgt, :, img] = k[src, :, img]
                v[tgt, :, img] = v[src, :, img]
        return q, k, v
