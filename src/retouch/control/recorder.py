"""Per-word attention maps (the classic Prompt-to-Prompt figure) for any family with text attention.

The recorder reads image-query → text-key probabilities of the conditional rows at every cross / joint /
single layer during sampling, sums each word's tokens, averages heads, resizes every layer's map to a common
grid and accumulates over layers and steps (memory: one small grid per word and branch, whatever the
number of steps). Composed after the editing policy, it shows what the branches actually attended to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.backbones.base import TextSegment
from retouch.control import tokens
from retouch.control.context import AttnContext
from retouch.control.contract import Editor


class AttentionRecorder(Editor):
    def __init__(self, segment: TextSegment, prompts: Sequence[str], *, grid: int = 16) -> None:
        self.segment = segment
        self.prompts = list(prompts)
        self.grid = grid
        self.words: list[list[tuple[str, list[int]]]] = []
        for prompt in self.prompts:
            tp = tokens.tokenize(segment.tokenizer, prompt, max_length=segment.length)
            per_word = []
            for k, word in enumerate(tp.words):
                pos = [segment.offset + i for i, w in enumerate(tp.word_of_token) if w == k]
                if pos:
                    per_word.append((word, pos))
            self.words.append(per_word)
        self.sums: list[Tensor | None] = [None] * len(self.prompts)
        self.count = 0

    def applies(self, ctx: AttnContext) -> bool:
        return ctx.phase == "sample" and ctx.layer.kind != "self" and ctx.layout.branches == len(self.prompts)

    def needs_probs(self, ctx: AttnContext) -> bool:
        return True

    def probs_block(self, ctx: AttnContext, seq_len: int) -> tuple[slice, slice] | None:
        """Joint attention: only the image-query / text-key block is read (the full map is never built)."""
        return ctx.image_text_block(seq_len) if ctx.layer.kind in ("joint", "single") else None

    def edit_probs(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        rows, cols = ctx.image_text_block(probs.shape[-1])
        self.edit_block(probs[:, :, rows, cols], ctx)
        return probs

    def block_batch_rows(self, ctx: AttnContext) -> list[int]:
        return ctx.layout.cond_rows

    def edit_block(self, block: Tensor, ctx: AttnContext) -> dict[int, Tensor]:
        """Record the image-query / text-key probabilities ``[B, h, N_img, T]``; changes nothing."""
        hh, ww = ctx.image_hw
        size = (self.grid, max(1, round(self.grid * ww / hh)))
        for b, per_word in enumerate(self.words):
            row = block[ctx.layout.row(b, True)].float().mean(0)  # [N_img, T]
            maps = torch.stack([row[:, pos].sum(-1) for _, pos in per_word])  # [W, N_img]
            maps = F.interpolate(maps.reshape(1, -1, hh, ww), size=size, mode="bilinear", align_corners=False)[0]
            self.sums[b] = maps if self.sums[b] is None else self.sums[b] + maps
        self.count += 1
        return {}

    def maps(self) -> list[dict[str, np.ndarray]]:
        """Per branch: {"<index>_<word>": [h, w] map normalised to [0, 1]}."""
        out = []
        for b, per_word in enumerate(self.words):
            s = self.sums[b]
            d: dict[str, np.ndarray] = {}
            if s is not None:
                for k, (word, _) in enumerate(per_word):
                    m = s[k].cpu().numpy()
                    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
                    d[f"{k:02d}_{word}"] = m
            out.append(d)
        return out


def heatmap_rgb(m: np.ndarray) -> np.ndarray:
    """A [0, 1] map -> uint8 RGB with a dark-blue → red → yellow ramp."""
    stops = np.array([[0, 0, 40], [90, 0, 140], [220, 40, 40], [255, 220, 60]], dtype=np.float64)
    x = np.clip(m, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)
