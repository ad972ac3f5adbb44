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
from retouch.control.context import AttnContext, BatchLayout
from retouch.control.contract import Editor

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


def _additive(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))


def _chunked_lse(q: Tensor, k: Tensor, attn_mask: Tensor | None, chunk: int = 1024) -> Tensor:
    """``logsumexp`` of each query row's scaled scores, ``chunk`` query rows at a time (no full map)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    mask = _additive(attn_mask, q.dtype)
    out = []
    for i in range(0, q.shape[-2], chunk):
        scores = (q[:, :, i : i + chunk] @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask[..., i : i + chunk, :] if mask.shape[-2] > 1 else scores + mask
        out.append(scores.float().logsumexp(-1))
    return torch.cat(out, dim=-1)


_CUDA_LSE_OK: dict[tuple[str, torch.dtype], bool] = {}


def _cuda_fused_lse(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The memory-efficient CUDA kernel's output and log-sum-exp, or None where it is unavailable. Checked
    once per device and dtype against the chunked computation before it is trusted."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
    if op is None:
        return None

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
        res = op(q, k, v, mask, True)
        return res[0], res[1][..., : q.shape[-2]].float()

    key = (str(q.device), q.dtype)
    try:
        if key not in _CUDA_LSE_OK:
            g = torch.Generator(device=q.device).manual_seed(0)
            tq, tk, tv = (
                torch.randn((1, 2, n, q.shape[-1]), generator=g, device=q.device, dtype=q.dtype) for n in (40, 50, 50)
            )
            _, lse = run(tq, tk, tv, None)
            _CUDA_LSE_OK[key] = bool(torch.allclose(lse, _chunked_lse(tq, tk, None), atol=1e-2, rtol=1e-2))
        if not _CUDA_LSE_OK[key]:
            return None
        return run(q, k, v, _additive(attn_mask, q.dtype))
    except (RuntimeError, NotImplementedError):
        _CUDA_LSE_OK[key] = False
        return None


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused attention ``[B, h, Nq, d]`` and the log-sum-exp of every query row's scores ``[B, h, Nq]``.

    The fused kernels compute the log-sum-exp anyway (the CPU flash kernel and CUDA's memory-efficient kernel
    return it); elsewhere it is computed a chunk of rows at a time. With it, any block of the probabilities
    is ``exp(q_rows k_colsᵀ / sqrt(d) - lse_rows)`` without the full map.
    """
    if q.device.type == "cpu":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, attn_mask=_additive(attn_mask, q.dtype)
            )
            return out, lse.float()
        except (RuntimeError, NotImplementedError):
            pass
    elif q.device.type == "cuda":
        res = _cuda_fused_lse(q, k, v, attn_mask)
        if res is not None:
            return res
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), _chunked_lse(q, k, attn_mask)


def linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """ReLU linear attention ``[B, h, N, d]`` (Katharopoulos et al. 2020, eq. 4 with ``φ = ReLU``; Sana):
    ``out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)``, computed as ``φ(Q) [φ(K)ᵀ V, φ(K)ᵀ 1]`` in float32
    (as diffusers' ``SanaLinearAttnProcessor2_0``, with its 1e-15 guard on the denominator)."""
    q, k, v32 = F.relu(q).float(), F.relu(k).float(), v.float()
    v1 = torch.cat([v32, torch.ones_like(v32[..., :1])], dim=-1)  # [B, h, N, d+1]
    out = q @ (k.transpose(-1, -2) @ v1)  # [B, h, N, d+1]
    return (out[..., :-1] / (out[..., -1:] + 1e-15)).to(v.dtype)


def attention_block(
    q: Tensor, k: Tensor, lse: Tensor, rows: slice, cols: slice, attn_mask: Tensor | None = None
) -> Tensor:
    """Softmax probabilities of query ``rows`` against key ``cols`` ``[B, h, Nr, Nc]`` from the rows' ``lse``.

    ``exp(q k^T / sqrt(d) - lse)`` in one product: ``[q / sqrt(d), -lse] @ [k, 1]^T``, then ``exp`` in place
    (the block can be large, so it is written once and exponentiated where it lies)."""
    qr = q[:, :, rows] * (1.0 / math.sqrt(q.shape[-1]))
    kc = k[:, :, cols]
    qa = torch.cat([qr, -lse[:, :, rows, None].to(q.dtype)], dim=-1)
    ka = torch.cat([kc, torch.ones_like(kc[..., :1])], dim=-1)
    scores = qa @ ka.transpose(-1, -2)
    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        m = mask[..., rows, :] if mask.shape[-2] > 1 else mask
        scores += m[..., cols]
    return scores.exp_()


@dataclass
class EditState:
    """Mutable per-run state the sampling loop updates: step, phase, batch layout, latent size."""

    editor: Editor | None
    step: int = -1
    num_steps: int = 0
    phase: str = "other"
    layout: BatchLayout = field(default_factory=lambda: BatchLayout(1, False))
    latent_hw: tuple[int, int] = (0, 0)
    calls: int = 0
    prob_calls: int = 0  # calls that materialised the full probability map
    block_calls: int = 0  # calls that edited only a block of it (fused output + a low-rank correction)
    merger: Any = None  # a retouch.merging.TokenMerger, or None
    point: int = -1  # grid point / interval of the current model evaluation (see AttnContext)
    stage: str = ""

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
        if layer.linear:
            return self._attend_linear(editor, q, k, v, layer, num_text)
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
            point=self.point,
            stage=self.stage,
        )
        if not editor.applies(ctx):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        q, k, v = editor.edit_qkv(q, k, v, ctx)
        bias = editor.logit_bias(ctx, q, k)  # an additive logit bias (KV-Edit's masks / scale)
        if bias is not None:
            attn_mask = bias if attn_mask is None else _additive(attn_mask, q.dtype) + bias
        if editor.needs_probs(ctx):
            rows_cols = editor.probs_block(ctx, k.shape[-2])
            if rows_cols is not None:
                return self._attend_block(editor, ctx, q, k, v, rows_cols, attn_mask)
            self.prob_calls += 1
            probs = editor.edit_probs(attention_probs(q, k, attn_mask), ctx)
            return probs.to(v.dtype) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    def _context(self, layer: LayerInfo, num_text: int) -> AttnContext:
        return AttnContext(
            layer=layer,
            step=self.step,
            num_steps=self.num_steps,
            phase=self.phase,
            layout=self.layout,
            latent_hw=self.latent_hw,
            num_text=num_text,
        )

    def _attend_linear(
        self, editor: Editor | None, q: Tensor, k: Tensor, v: Tensor, layer: LayerInfo, num_text: int
    ) -> Tensor:
        """A linear-attention layer: editors may change q, k, v; one that needs the softmax map is refused."""
        if editor is None:
            return linear_attention(q, k, v)
        ctx = self._context(layer, num_text)
        if not editor.applies(ctx):
            return linear_attention(q, k, v)
        q, k, v = editor.edit_qkv(q, k, v, ctx)
        if editor.needs_probs(ctx):
            raise ValueError(
                f"{type(editor).__name__} needs the softmax attention probabilities of layer {layer.name}, but "
                "that layer computes linear (ReLU-kernel) attention and has no softmax map; restrict the editor "
                "to softmax layers (e.g. cross-attention) or use an editor that acts on queries/keys/values"
            )
        return linear_attention(q, k, v)

    def _attend_block(
        self,
        editor: Editor,
        ctx: AttnContext,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rows_cols: tuple[slice, slice],
        attn_mask: Tensor | None,
    ) -> Tensor:
        """Exact attention when the editor changes only the block ``rows × cols`` of the probabilities:
        ``out = fused(q, k, v)`` then ``out[rows] += (P'_block - P_block) @ v[cols]`` for the batch rows the
        editor changed (``edit_block`` returns ``{batch row: new block row}``). The block is formed only for the
        batch rows the editor reads (``block_batch_rows``, e.g. the conditional half); it is zero elsewhere."""
        self.block_calls += 1
        rows, cols = rows_cols
        out, lse = attention_with_lse(q, k, v, attn_mask)
        bi = editor.block_batch_rows(ctx)
        if bi is None or len(bi) == q.shape[0]:
            p = attention_block(q, k, lse, rows, cols, attn_mask)
        else:
            mask = attn_mask[bi] if attn_mask is not None and attn_mask.shape[0] > 1 else attn_mask
            n_rows = len(range(*rows.indices(q.shape[2])))
            n_cols = len(range(*cols.indices(k.shape[2])))
            p = q.new_zeros(q.shape[0], q.shape[1], n_rows, n_cols)
            p[bi] = attention_block(q[bi], k[bi], lse[bi], rows, cols, mask)
        changes = editor.edit_block(p, ctx)
        if not changes:
            return out
        out = out.clone()
        for r, new in changes.items():
            out[r, :, rows] += (new - p[r]).to(v.dtype) @ v[r, :, cols]
        return out


@contextmanager
def attention_editing(
    backbone: Backbone, editor: Editor | None, *, layers: LayerSelector = all_layers, merger: Any = None
) -> Iterator[EditState]:
    """Install ``editor`` on the layers ``layers`` selects; restore the original processors on exit.

    Raises:
        ValueError: if the selector matches no attention layer.
    """
    original = backbone.attn_processors()
    infos = backbone.attention_layers()
    chosen = {name: info for name, info in infos.items() if layers(info)}
    if not chosen:
        raise ValueError(f"the layer selector matched none of the {len(infos)} attention layers of {backbone.family}")
    state = EditState(editor=editor, merger=merger)
    procs = dict(original)
    for name, info in infos.items():
        if name in chosen or (merger is not None and merger.layers(info)):
            procs[f"{name}.processor"] = backbone.make_processor(info, state.attend, state.merge)
    backbone.set_attn_processors(procs)
    try:
        yield state
    finally:
        backbone.set_attn_processors(original)
