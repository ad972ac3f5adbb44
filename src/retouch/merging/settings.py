"""How token merging is applied inside an edit: which layers, which ratio, one plan shared by the branches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo
from retouch.merging.kernels import MergePlan, plan_merge


@dataclass
class TokenMerger:
    """Merges image tokens before a layer's self / joint attention and unmerges its output (ToMe for SD).

    The plan of each call is computed from the *source* branch's tokens (conditional row) and applied to
    every row, so source and target stay token-aligned for P2P and MasaCtrl. Destination tokens are drawn
    from a generator seeded by ``(seed, step, layer depth)``: deterministic, and fresh per step like tomesd.
    """

    ratio: float
    layers: Callable[[LayerInfo], bool]
    seed: int = 0
    stride: tuple[int, int] | None = None
    random_dst: bool = True
    applied: list[float] = field(default_factory=list)

    def plan(self, tokens: Tensor, layer: LayerInfo, grid_hw: tuple[int, int], source_row: int, step: int) -> MergePlan:
        g = None
        if self.random_dst:
            g = torch.Generator(device=tokens.device).manual_seed(
                self.seed * 1_000_003 + max(step, 0) * 1009 + layer.depth
            )
        plan = plan_merge(tokens[source_row : source_row + 1], grid_hw, self.ratio, stride=self.stride, generator=g)
        self.applied.append(plan.applied_ratio)
        return plan

    def report(self) -> dict[str, float | int]:
        n = len(self.applied)
        return {
            "requested_ratio": self.ratio,
            "applied_ratio": (sum(self.applied) / n) if n else 0.0,
            "merged_calls": n,
        }
