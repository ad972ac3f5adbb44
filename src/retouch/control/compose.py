"""Composition of editors: several policies acting on the same run (e.g. DiT4Edit = P2P + mutual self-attention)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor

from retouch.control.context import AttentionEditor, AttnContext


class ComposedEditor:
    """Applies each editor in turn; probabilities are materialised if any applicable editor needs them."""

    def __init__(self, editors: Sequence[AttentionEditor]) -> None:
        if not editors:
            raise ValueError("compose at least one editor")
        self.editors = list(editors)

    def _active(self, ctx: AttnContext) -> list[AttentionEditor]:
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
                fn = getattr(e, "probs_block", None)
                block = fn(ctx, seq_len) if fn is not None else None
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
                fn = getattr(e, "block_batch_rows", None)
                rows = fn(ctx) if fn is not None else None
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

    def after_step(self, i: int, x: Tensor, state: Any) -> Tensor:
        for e in self.editors:
            hook = getattr(e, "after_step", None)
            if hook is not None:
                out = hook(i, x, state)
                x = x if out is None else out
        return x

    def begin(self, trajectory: Any) -> None:
        for e in self.editors:
            hook = getattr(e, "begin", None)
            if hook is not None:
                hook(trajectory)

    def wrap_model(self, model: Any) -> Any:
        """Each editor's model wrapper in turn (e.g. LEDITS++'s concept batch); the model itself if none."""
        for e in self.editors:
            hook = getattr(e, "wrap_model", None)
            if hook is not None:
                model = hook(model)
        return model

    def modify_prediction(self, i: int, x: Tensor, p: Any, grid: Any, num_steps: int) -> Any:
        for e in self.editors:
            hook = getattr(e, "modify_prediction", None)
            if hook is not None:
                p = hook(i, x, p, grid, num_steps)
        return p

    @contextmanager
    def install(self, backbone: Any, state: Any) -> Iterator[None]:
        with ExitStack() as stack:
            for e in self.editors:
                if hasattr(e, "install"):
                    stack.enter_context(e.install(backbone, state))
            yield

    def prepare_conditioning(self, cond: Any, uncond: Any) -> Any:
        for e in self.editors:
            if hasattr(e, "prepare_conditioning"):
                cond = e.prepare_conditioning(cond, uncond)
        return cond

    def step_conditioning(self, i: int, cond: Any) -> Any:
        out = None
        for e in self.editors:
            if hasattr(e, "step_conditioning"):
                res = e.step_conditioning(i, cond if out is None else out)
                out = res if res is not None else out
        return out

    @property
    def needs_mask(self) -> bool:
        return any(getattr(e, "needs_mask", False) for e in self.editors)

    def set_mask(self, mask: Any) -> Any:
        """Pass the run's mask through every editor that shapes it (KV-Edit binarises it)."""
        for e in self.editors:
            if hasattr(e, "set_mask"):
                mask = e.set_mask(mask)
        return mask

    def grid_start(self, num_steps: int) -> int:
        return max((e.grid_start(num_steps) for e in self.editors if hasattr(e, "grid_start")), default=0)

    def logit_bias(self, ctx: AttnContext, q: Tensor, k: Tensor) -> Tensor | None:
        out = None
        for e in self._active(ctx):
            fn = getattr(e, "logit_bias", None)
            bias = fn(ctx, q, k) if fn is not None else None
            if bias is not None:
                out = bias if out is None else out + bias
        return out

    def before_step(self, i: int, x: Tensor, model: Any, grid: Any) -> Tensor:
        for e in self.editors:
            if hasattr(e, "before_step"):
                out = e.before_step(i, x, model, grid)
                x = x if out is None else out
        return x
