"""Composition of editors: several policies acting on the same run (e.g. DiT4Edit = P2P + mutual self-attention)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from torch import Tensor

from retouch.control.context import AttnContext
from retouch.control.contract import Editor, GuidedPrediction, StepContext
from retouch.types import Conditioning, NoiseGrid, Pred, Trajectory

if TYPE_CHECKING:
    from retouch.backbones.base import Backbone
    from retouch.control.installer import EditState


class ComposedEditor(Editor):
    """Applies each editor in turn; probabilities are materialised if any applicable editor needs them.

    Run-level answers combine as: ``source_branch`` only if every editor keeps it, ``needs_mask`` if any
    needs one, ``grid_start`` the largest, ``branch_guidance`` / ``sample`` the first editor that gives one."""

    def __init__(self, editors: Sequence[Editor]) -> None:
        if not editors:
            raise ValueError("compose at least one editor")
        self.editors = list(editors)

    def _active(self, ctx: AttnContext) -> list[Editor]:
        return [e for e in self.editors if e.applies(ctx)]

    def applies(self, ctx: AttnContext) -> bool:
        return bool(self._active(ctx))

    def needs_probs(self, ctx: AttnContext) -> bool:
        return any(e.needs_probs(ctx) for e in self._active(ctx))

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        for e in self._active(ctx):
            q, k, v = e.edit_qkv(q, k, v, ctx)
        return q, k, v

    def probs_block(self, ctx: AttnContext, seq_len: int) -> tuple[slice, slice] | None:
        """The block every active editor that needs probabilities edits, if they all name the same one."""
        blocks = set()
        for e in self._active(ctx):
            if e.needs_probs(ctx):
                block = e.probs_block(ctx, seq_len)
                if block is None:
                    return None
                blocks.add((block[0].start, block[0].stop, block[1].start, block[1].stop))
        if len(blocks) != 1:
            return None
        r0, r1, c0, c1 = blocks.pop()
        return slice(r0, r1), slice(c0, c1)

    def block_batch_rows(self, ctx: AttnContext) -> list[int] | None:
        """The union of the batch rows the block editors read or change (None: all rows)."""
        out: set[int] = set()
        for e in self._active(ctx):
            if e.needs_probs(ctx):
                rows = e.block_batch_rows(ctx)
                if rows is None:
                    return None
                out.update(rows)
        return sorted(out)

    def edit_block(self, block: Tensor, ctx: AttnContext) -> dict[int, Tensor]:
        """Each block editor in turn sees the rows the ones before it changed; returns every changed row."""
        current, changed = block, {}
        for e in self._active(ctx):
            if e.needs_probs(ctx):
                changes = e.edit_block(current, ctx)
                if changes:
                    current = current.clone() if current is block else current
                    for r, new in changes.items():
                        current[r] = new
                    changed.update(changes)
        return {r: current[r] for r in changed}

    def edit_probs(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        for e in self._active(ctx):
            if e.needs_probs(ctx):
                probs = e.edit_probs(probs, ctx)
        return probs

    def logit_bias(self, ctx: AttnContext, q: Tensor, k: Tensor) -> Tensor | None:
        out = None
        for e in self._active(ctx):
            bias = e.logit_bias(ctx, q, k)
            if bias is not None:
                out = bias if out is None else out + bias
        return out

    # --- run level --------------------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def source_branch(self) -> bool:
        return all(e.source_branch for e in self.editors)

    @property  # type: ignore[override]
    def needs_mask(self) -> bool:
        return any(e.needs_mask for e in self.editors)

    def set_mask(self, mask: Tensor | None) -> Tensor | None:
        """Pass the run's mask through every editor that shapes it (KV-Edit binarises it)."""
        for e in self.editors:
            mask = e.set_mask(mask)
        return mask

    def grid_start(self, num_steps: int) -> int:
        return max(e.grid_start(num_steps) for e in self.editors)

    def branch_guidance(self, guidance: float) -> tuple[float, ...] | None:
        for e in self.editors:
            out = e.branch_guidance(guidance)
            if out is not None:
                return out
        return None

    @contextmanager
    def install(self, backbone: Backbone, state: EditState) -> Iterator[None]:
        with ExitStack() as stack:
            for e in self.editors:
                stack.enter_context(e.install(backbone, state))
            yield

    def begin(self, trajectory: Trajectory) -> None:
        for e in self.editors:
            e.begin(trajectory)

    def prepare_conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        for e in self.editors:
            cond = e.prepare_conditioning(cond, uncond)
        return cond

    def wrap_model(self, model: GuidedPrediction) -> GuidedPrediction:
        """Each editor's model wrapper in turn (e.g. LEDITS++'s concept batch)."""
        for e in self.editors:
            model = e.wrap_model(model)
        return model

    def sample(self, model: GuidedPrediction, z0: Tensor, grid: NoiseGrid, noise: Any) -> Tensor | None:
        for e in self.editors:
            out = e.sample(model, z0, grid, noise)
            if out is not None:
                return out
        return None

    # --- per step ----------------------------------------------------------------------------------------------
    def step_conditioning(self, ctx: StepContext, cond: Conditioning) -> Conditioning | None:
        out = None
        for e in self.editors:
            res = e.step_conditioning(ctx, cond if out is None else out)
            out = res if res is not None else out
        return out

    def before_step(self, ctx: StepContext, x: Tensor, model: GuidedPrediction) -> Tensor | None:
        for e in self.editors:
            out = e.before_step(ctx, x, model)
            x = x if out is None else out
        return x

    def modify_prediction(self, ctx: StepContext, x: Tensor, p: Pred) -> Pred:
        for e in self.editors:
            p = e.modify_prediction(ctx, x, p)
        return p

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | None:
        for e in self.editors:
            out = e.after_step(ctx, x)
            x = x if out is None else out
        return x
