"""Feature sharing as RF-Solver-Edit (Wang et al. 2024) and FireFlow (Deng et al. 2024) release it.

Their official code keeps no source branch while editing. During inversion (source prompt) it stores the
attention values ``V`` of the selected single-stream blocks, for the last ``inject`` inversion steps; while
sampling the target alone it replaces those blocks' ``V`` (text and image tokens) with the stored ones, for the
first ``inject`` sampling steps. Stored and replayed values are matched by *grid interval* and *stage*:

* stage ``"grid"``: the step's first evaluation. Inversion makes it at the interval's clean end, sampling at its
  noisy end, so the replayed ``V`` comes from the other end of the same interval (as in the reference);
* stage ``"mid"``: the midpoint evaluation, at the same sigma in both passes.

A value is replayed only where one was stored. FireFlow reuses the previous midpoint velocity instead of a first
evaluation, so its only first-stage evaluations are the first inversion step and the first sampling step, which
lie in different intervals unless there is a single step: they are never matched (FireFlow's code checks that the
key exists; RF-Solver-Edit's evaluates both stages everywhere, so every key exists).

retouch's ``rf_solver`` / ``fireflow`` presets instead share the source branch's image values at the same sampling
step (:class:`~retouch.control.masactrl.MutualSelfAttention` with ``share="v"``); ``docs/methods.md`` compares.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from retouch.backbones.base import LayerInfo
from retouch.control.context import AttnContext
from retouch.control.contract import Editor


class InversionValueReplay(Editor):
    """Store ``V`` of ``layers`` during inversion, replay it while sampling (target branch only).

    Args:
        inject: number of grid intervals, counted from the noisiest, where values are stored and replayed.
        layers: predicate selecting the layers.
    """

    source_branch = False  # the reference samples the target prompt alone

    def __init__(self, *, inject: int, layers: Callable[[LayerInfo], bool]) -> None:
        self.inject = inject
        self.layers = layers
        self.store: dict[tuple[int, str, str], Tensor] = {}

    @staticmethod
    def _interval(ctx: AttnContext) -> int:
        # inversion's first evaluation of interval j-1 sits at its clean end, grid point j
        if ctx.stage == "grid" and ctx.phase == "invert":
            return ctx.point - 1
        return ctx.point

    def _key(self, ctx: AttnContext) -> tuple[int, str, str]:
        return (self._interval(ctx), ctx.stage, ctx.layer.name)

    def applies(self, ctx: AttnContext) -> bool:
        if ctx.stage not in ("grid", "mid") or not self.layers(ctx.layer):
            return False
        if not 0 <= self._interval(ctx) < self.inject:
            return False
        if ctx.phase == "invert":
            return True
        return ctx.phase == "sample" and self._key(ctx) in self.store

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        key = self._key(ctx)
        if ctx.phase == "invert":
            self.store[key] = v.detach().clone()
            return q, k, v
        stored = self.store[key]
        if stored.shape != v.shape:
            raise RuntimeError(f"stored values {tuple(stored.shape)} do not fit {tuple(v.shape)} in {ctx.layer.name}")
        return q, k, stored.to(device=v.device, dtype=v.dtype)
