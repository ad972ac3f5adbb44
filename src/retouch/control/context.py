"""What an attention editor is told at every call (the editor contract itself: :mod:`retouch.control.contract`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from retouch.backbones.base import LayerInfo


@dataclass(frozen=True)
class BatchLayout:
    """How the model batch is laid out: ``[uncond x branches, cond x branches]`` with CFG, else
    ``[cond x branches]``. Branch 0 is the source, branches 1.. are targets."""

    branches: int
    cfg: bool

    @property
    def halves(self) -> int:
        return 2 if self.cfg else 1

    @property
    def size(self) -> int:
        return self.halves * self.branches

    def row(self, branch: int, cond: bool = True) -> int:
        if not self.cfg:
            return branch
        return (self.branches if cond else 0) + branch

    @property
    def cond_rows(self) -> list[int]:
        """The conditional row of every branch (source first)."""
        return [self.row(b, True) for b in range(self.branches)]

    def split(self, t: Tensor) -> Tensor:
        """``[halves*branches, ...] -> [halves, branches, ...]``."""
        return t.view(self.halves, self.branches, *t.shape[1:])


@dataclass(frozen=True)
class AttnContext:
    """Where an attention call happens: which layer, which step, which rows are which branch."""

    layer: LayerInfo
    step: int  # sampling step index (0 = noisiest); -1 outside a sampling loop
    num_steps: int
    phase: str  # "invert" | "sample" | "other"
    layout: BatchLayout
    latent_hw: tuple[int, int]
    num_text: int = 0  # text tokens in a joint / single sequence
    # which model evaluation this is: stage "grid" at grid point ``point`` (0 = noisiest), stage "mid" between
    # points ``point`` and ``point + 1`` (midpoint solvers); "" when unknown
    point: int = -1
    stage: str = ""

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.layer.resolution(self.latent_hw)

    def text_slice(self, seq_len: int) -> slice:
        if self.layer.kind not in ("joint", "single"):
            raise ValueError("only joint attention has a text span in its sequence")
        return slice(0, self.num_text) if self.layer.text_first else slice(seq_len - self.num_text, seq_len)

    def image_text_block(self, seq_len: int) -> tuple[slice, slice] | None:
        """Image-query / text-key block of this layer's map: the whole map of a cross-attention layer, that
        block of a joint / single one, None for self-attention."""
        if self.layer.kind == "cross":
            return slice(None), slice(None)
        if self.layer.kind in ("joint", "single"):
            return self.image_slice(seq_len), self.text_slice(seq_len)
        return None

    def image_slice(self, seq_len: int) -> slice:
        if self.layer.kind not in ("joint", "single"):
            return slice(0, seq_len)
        return slice(self.num_text, seq_len) if self.layer.text_first else slice(0, seq_len - self.num_text)
