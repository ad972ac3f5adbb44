"""Prompt-to-Prompt (Hertz et al., ICLR 2023): cross-attention replace / refine / reweight and local blend.

The target branch's image→text attention is rewritten from the source branch's during the first
``cross_steps`` of sampling (``int(cross_steps * (num_steps + 1))`` steps, P2P's
``get_time_words_attention_alpha``); self-attention maps are copied from the source during the first
``self_steps`` at the layers below the full-resolution level (P2P's "32x32 and below" at 512 px, i.e. a
threshold that follows the latent size; every layer of a single-level DiT); the copy is done on queries and
keys, so no self-attention map is materialised.
Only the conditional half of a CFG batch is edited. Works on cross-attention (SD, PixArt) and on the
image-query / text-key block of joint attention (SD3, Flux double and single blocks). There the engine
never builds the full map either: it runs the fused kernel, takes its log-sum-exp, forms only the N_img × T
block of probabilities and adds ``(P'_block - P_block) @ v_text`` to the fused output (exact; see
``retouch.control.installer.EditState._attend_block``).

Text positions are aligned per tokenizer segment (CLIP BPE for SD / SD3's first 77 tokens, T5
SentencePiece for PixArt, Flux and SD3's T5 part) by :mod:`retouch.control.tokens`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.backbones.base import LayerInfo, TextSegment
from retouch.control import tokens
from retouch.control.context import AttnContext
from retouch.control.contract import Editor, StepContext

log = logging.getLogger(__name__)

MODES = ("auto", "replace", "refine")


@dataclass(frozen=True)
class TextAlignment:
    """Text-sequence-level alignment of a source and a target prompt (length = total text tokens)."""

    mode: str  # "replace" | "refine"
    matrix: Tensor | None  # replace: [T, T], A_tgt = A_src @ matrix
    mapper: Tensor | None  # refine: [T] source position for each target position
    alphas: Tensor | None  # refine: [T] 1 where the target token is aligned to a source token
    weights: Tensor  # reweight: [T] multiplier on the target's text columns

    @cached_property
    def changed_columns(self) -> Tensor:
        """Replace mode: the columns where ``matrix`` differs from the identity (the replaced words)."""
        if self.matrix is None:
            return torch.zeros(0, dtype=torch.long)
        eye = torch.eye(self.matrix.shape[0], dtype=self.matrix.dtype)
        return torch.nonzero((self.matrix != eye).any(0)).flatten()

    @cached_property
    def reweighted(self) -> bool:
        return bool((self.weights != 1).any())


def align_prompts(
    segments: Sequence[TextSegment],
    source: str,
    target: str,
    *,
    mode: str = "auto",
    reweight: Mapping[str, float] | None = None,
) -> TextAlignment:
    """Build the token alignment over all text segments (positions outside segments map to themselves)."""
    if mode not in MODES:
        raise ValueError(f"unknown P2P mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        mode = "replace" if len(source.split()) == len(target.split()) else "refine"
    total = max(s.offset + s.length for s in segments)
    weights = torch.ones(total)
    if mode == "replace":
        matrix = torch.eye(total)
        for s in segments:
            m = tokens.replace_mapper(s.tokenizer, source, target, max_length=s.length)
            matrix[s.offset : s.offset + s.length, s.offset : s.offset + s.length] = m
        mapper = alphas = None
    else:
        matrix = None
        mapper = torch.arange(total)
        alphas = torch.ones(total)
        for s in segments:
            m, a = tokens.refine_mapper(s.tokenizer, source, target, max_length=s.length)
            m = m.clone()
            m[m >= 0] += s.offset
            m[m < 0] = s.offset  # new tokens: any valid index, their alpha is 0
            mapper[s.offset : s.offset + s.length] = m
            alphas[s.offset : s.offset + s.length] = a
    if reweight:
        for s in segments:
            w = tokens.reweight_vector(s.tokenizer, target, dict(reweight), max_length=s.length)
            weights[s.offset : s.offset + s.length] = w
    return TextAlignment(mode=mode, matrix=matrix, mapper=mapper, alphas=alphas, weights=weights)


def word_positions(segments: Sequence[TextSegment], prompt: str, words: Sequence[str]) -> list[int]:
    """Text-sequence positions of ``words`` in ``prompt`` over all segments."""
    out: list[int] = []
    for s in segments:
        for w in words:
            out.extend(s.offset + i for i in tokens.word_token_indices(s.tokenizer, prompt, w, max_length=s.length))
    if words and not out:
        raise ValueError(f"none of the words {list(words)} were found in {prompt!r}")
    return sorted(set(out))


def below_full_resolution(layers: Iterable[LayerInfo]) -> Callable[[LayerInfo], bool]:
    """P2P's self-attention layers: those below the denoiser's full-resolution attention level (the reference's
    ``32**2`` tokens at 512 px, i.e. (L/2)² for a latent side L), or every layer of a single-level denoiser (DiT)."""
    levels = {i.downsample for i in layers if i.kind == "self"}
    if len(levels) <= 1:
        return lambda info: True
    finest = min(levels)
    return lambda info: info.downsample > finest


def quarter_level(layers: Iterable[LayerInfo]) -> Callable[[LayerInfo], bool]:
    """P2P's local-blend layers: the text-attention layers at ¼ of the latent side (the reference's
    ``down_cross[2:4] + up_cross[:3]``, 16x16 at 512 px), or all of them when no layer is at that level (DiT)."""
    if any(i.kind in ("cross", "joint", "single") and i.downsample == 4 for i in layers):
        return lambda info: info.downsample == 4
    return lambda info: True


class LocalBlend:
    """P2P's local blend: keep the source latent outside the region the blend words attend to.

    Word maps (image-query attention to the words' tokens, conditional rows, averaged over heads and the
    recorded layers, summed over steps) are taken at ``map_size`` (default: the recorded layers' own grid,
    which on a UNet is ¼ of the latent side, the level P2P reads: 16x16 at 512 px; a DiT's token grid),
    max-pooled 3x3, upsampled to the latent (nearest), normalised by their maximum and thresholded; the union
    of the source-word and target-word masks is the editable region: ``x_tgt <- x_src + mask * (x_tgt - x_src)``
    after each step from ``start``. The target's maps are read after the cross-attention edit, as P2P's
    attention store holds them. Which layers are recorded is the factory's choice (``layers``); P2P's are the
    cross-attention layers at ¼ of the latent side.
    """

    def __init__(
        self,
        source_positions: list[int],
        target_positions: list[int],
        *,
        threshold: float = 0.3,
        start: float = 0.2,
        map_size: int | None = None,
        layers: Callable[[LayerInfo], bool] | None = None,
    ) -> None:
        self.positions = (source_positions, target_positions)
        self.threshold = threshold
        self.start = start
        self.map_size = map_size
        self.layers = layers or (lambda info: True)
        self.maps: Tensor | None = None  # [2, S, S] running sum (source words, target words)
        self.count = 0
        self.last_mask: Tensor | None = None

    def _size(self, ctx: AttnContext) -> tuple[int, int]:
        if self.map_size is None:  # the recorded layers' own grid (¼ of the latent side on a UNet; the first
            # recorded layer's when they differ, e.g. a UNet without that level)
            return self.maps.shape[-2:] if self.maps is not None else ctx.image_hw
        lh, lw = ctx.latent_hw
        return self.map_size, max(1, round(self.map_size * lw / lh))

    def record(self, a_src: Tensor, a_tgt: Tensor, ctx: AttnContext) -> None:
        """``a_src`` / ``a_tgt``: ``[h, N_img, T]`` image-query / text-key probabilities of the source row and
        of the (edited) target row."""
        if not self.layers(ctx.layer):
            return
        hh, ww = ctx.image_hw
        size = tuple(self._size(ctx))
        maps = []
        for a, pos in ((a_src, self.positions[0]), (a_tgt, self.positions[1])):
            m = a[..., pos].sum(-1).mean(0).float().reshape(1, 1, hh, ww)  # [1, 1, hh, ww]
            if (hh, ww) != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        grid = torch.cat(maps)[:, 0]
        self.maps = grid if self.maps is None else self.maps + grid
        self.count += 1

    def mask(self, latent_hw: tuple[int, int]) -> Tensor | None:
        if self.maps is None:
            return None
        m = F.max_pool2d(self.maps[:, None], 3, stride=1, padding=1)
        m = F.interpolate(m, size=latent_hw, mode="nearest")
        m = m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        return (m > self.threshold).any(0).float()  # [1, h, w]

    def apply(self, i: int, x: Tensor, num_steps: int) -> Tensor:
        if i < int(self.start * num_steps):
            return x
        mask = self.mask((x.shape[-2], x.shape[-1]))
        if mask is None:
            return x
        self.last_mask = mask
        out = x.clone()
        for b in range(1, x.shape[0]):
            out[b] = x[0] + mask.to(x.dtype) * (x[b] - x[0])
        return out


class PromptToPrompt(Editor):
    """The P2P attention editor (see module docstring).

    Args:
        alignment: text alignment of source and target (from :func:`align_prompts`).
        cross_steps: fraction of steps with cross-attention replacement (P2P default 0.8; PIE-Bench 0.4); the
            first ``int(cross_steps * (num_steps + 1))`` steps, as P2P counts them.
        self_steps: fraction of steps with self-attention replacement (P2P 0.4; PIE-Bench 0.6).
        self_layers: the self-attention layers whose maps are replaced (default: all).
        self_max_tokens: optionally, also only layers with at most this many image tokens.
        local_blend: optional :class:`LocalBlend`.
    """

    def __init__(
        self,
        alignment: TextAlignment,
        *,
        cross_steps: float = 0.8,
        self_steps: float = 0.4,
        self_layers: Callable[[LayerInfo], bool] | None = None,
        self_max_tokens: int | None = None,
        local_blend: LocalBlend | None = None,
    ) -> None:
        self.alignment = alignment
        self.cross_steps = cross_steps
        self.self_steps = self_steps
        self.self_layers = self_layers or (lambda info: True)
        self.self_max_tokens = self_max_tokens
        self.local_blend = local_blend

    # --- policy ---------------------------------------------------------------------------------------
    def _cross_active(self, ctx: AttnContext) -> bool:
        # P2P's alpha schedule has num_steps + 1 entries: words are replaced while step < int(f * (N + 1))
        return ctx.step < int(self.cross_steps * (ctx.num_steps + 1))

    def _self_active(self, ctx: AttnContext) -> bool:
        if ctx.step >= int(self.self_steps * ctx.num_steps) or not self.self_layers(ctx.layer):
            return False
        h, w = ctx.image_hw
        return self.self_max_tokens is None or h * w <= self.self_max_tokens

    def applies(self, ctx: AttnContext) -> bool:
        if ctx.phase != "sample" or ctx.layout.branches < 2:
            return False
        kind = ctx.layer.kind
        if kind == "self":
            return self._self_active(ctx)
        return self._cross_active(ctx) or (self.local_blend is not None and self.local_blend.layers(ctx.layer))

    def needs_probs(self, ctx: AttnContext) -> bool:
        # A self-attention map copy needs no map: softmax(q_src k_src^T) v_tgt is SDPA on the source's
        # queries and keys with the target's values (see edit_qkv), so only text maps are materialised.
        return ctx.layer.kind != "self" and self.applies(ctx)

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        if ctx.layer.kind != "self":
            return q, k, v
        layout = ctx.layout
        src = layout.row(0, cond=True)
        q, k = q.clone(), k.clone()
        for b in range(1, layout.branches):
            tgt = layout.row(b, True)
            q[tgt], k[tgt] = q[src], k[src]
        return q, k, v

    # --- rules ----------------------------------------------------------------------------------------
    def _rewrite(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        n = a_src.shape[-1]
        if n < self.alignment.weights.shape[0]:  # a text block narrower than the alignment: its first n tokens
            return self._rewrite_first(a_src, a_tgt, n)
        return self._rewrite_full(a_src, a_tgt)

    def _rewrite_first(self, a_src: Tensor, a_tgt: Tensor, n: int) -> Tensor:
        al = self.alignment
        if al.mode == "replace":
            cols = al.changed_columns[al.changed_columns < n]
            new = a_src.clone()
            if cols.numel():
                new[..., cols] = a_src @ al.matrix[:n, cols].to(device=a_src.device, dtype=a_src.dtype)
        else:
            mapper = al.mapper[:n].clamp(max=n - 1)
            alphas = al.alphas[:n].to(a_src.dtype) * (al.mapper[:n] < n).to(a_src.dtype)
            new = a_src[..., mapper] * alphas + a_tgt * (1 - alphas)
        if al.reweighted:
            new = new * al.weights[:n].to(a_src.dtype)
        return new

    def _rewrite_full(self, a_src: Tensor, a_tgt: Tensor) -> Tensor:
        """P2P's edit of target text maps ``[h, N, T]`` from source ones.

        Replace: ``A_src @ M``. M is the identity except in the columns of the replaced words, so only those
        columns are multiplied (a text of T tokens would otherwise cost N·T² per head)."""
        al = self.alignment
        if al.mode == "replace":
            cols = al.changed_columns
            new = a_src.clone()
            if cols.numel():
                new[..., cols] = a_src @ al.matrix[:, cols].to(device=a_src.device, dtype=a_src.dtype)
        else:
            alphas = al.alphas.to(a_src.dtype)
            new = a_src[..., al.mapper] * alphas + a_tgt * (1 - alphas)
        if al.reweighted:
            new = new * al.weights.to(a_src.dtype)
        return new

    def probs_block(self, ctx: AttnContext, seq_len: int) -> tuple[slice, slice] | None:
        """In joint attention only the image-query / text-key block is read or changed (see ``edit_block``)."""
        return ctx.image_text_block(seq_len) if ctx.layer.kind in ("joint", "single") else None

    def block_batch_rows(self, ctx: AttnContext) -> list[int]:
        """The conditional rows of every branch: the only ones read or changed (unconditional rows stay)."""
        return ctx.layout.cond_rows

    def edit_block(self, block: Tensor, ctx: AttnContext) -> dict[int, Tensor]:
        """Read the image-query / text-key probabilities ``[B, h, N_img, T]`` (cross-attention maps, or that
        block of a joint map) and return the target rows' new blocks ``{batch row: [h, N_img, T]}``."""
        layout = ctx.layout
        src = layout.row(0, cond=True)
        text_len = self.alignment.weights.shape[0]
        changes = {}
        if self._cross_active(ctx):
            n = min(text_len, block.shape[-1])
            a_src = block[src, ..., :text_len]
            for b in range(1, layout.branches):
                tgt = layout.row(b, True)
                new = block[tgt].clone()
                new[..., :n] = self._rewrite(a_src, block[tgt, ..., :text_len])[..., :n]
                changes[tgt] = new
        if self.local_blend is not None:  # the target's map as edited (P2P stores the maps after the edit)
            tgt = layout.row(1, True)
            a_tgt = changes.get(tgt, block[tgt])
            self.local_blend.record(block[src, ..., :text_len], a_tgt[..., :text_len], ctx)
        return changes

    def edit_probs(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        layout = ctx.layout
        if ctx.layer.kind == "self":  # reached only by callers that force maps (edit_qkv already copied q and k)
            src = layout.row(0, cond=True)
            probs = probs.clone()
            for b in range(1, layout.branches):
                probs[layout.row(b, True)] = probs[src]
            return probs
        rows, cols = ctx.image_text_block(probs.shape[-1])
        changes = self.edit_block(probs[:, :, rows, cols], ctx)
        if not changes:
            return probs
        probs = probs.clone()
        for r, new in changes.items():
            probs[r, :, rows, cols] = new
        return probs

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | None:
        if self.local_blend is None:
            return None
        return self.local_blend.apply(ctx.step, x, ctx.num_steps)
