"""The one guided prediction: ``model_fn(x, point) -> Pred`` over a backbone, and the editor's prediction hook.

:class:`GuidedModel` batches classifier-free guidance (the combine is the backbone's ``combine_guidance``),
counts NFE and keeps the math in float32. With ``checkpointed=True`` every network call runs under gradient
checkpointing while gradients are on (the optimising methods: disentanglement's chain through the sampler).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retouch.backbones.base import Backbone
from retouch.control.context import BatchLayout
from retouch.control.contract import Editor, GuidedPrediction, StepContext, WrappedModel
from retouch.types import Conditioning, NoiseGrid, Point, Pred, to_x0_eps

if TYPE_CHECKING:
    from retouch.control.installer import EditState


@contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Temporarily turn off ``requires_grad`` of the modules' parameters (restored on exit), so that a backward
    pass to the *inputs* keeps no activations for weight gradients."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


_frozen = frozen  # predict_rows' argument of that name shadows it


class GuidedModel:
    """``model_fn(x, point) -> Pred`` over a backbone: batches CFG, counts NFE, keeps math in float32.

    ``on_eval(step)``, when set, is called before every evaluation with the point's sampling-grid step (the
    editing loop's inversion progress bar)."""

    def __init__(
        self,
        backbone: Backbone,
        grid: NoiseGrid,
        cond: Conditioning,
        uncond: Conditioning | None,
        guidance: float | Sequence[float],
        state: EditState | None = None,
        *,
        checkpointed: bool = False,
    ) -> None:
        self.backbone = backbone
        self.grid = grid
        self.cond = cond
        # one scale for every branch, or one per branch (FlowEdit guides source and target differently)
        per_branch = not isinstance(guidance, (int, float))
        scales = [float(g) for g in guidance] if per_branch else [float(guidance)]
        if per_branch and len(scales) != cond.batch_size:
            raise ValueError(f"{len(scales)} guidance scales for {cond.batch_size} branches")
        self.guidance: float | Tensor = torch.tensor(scales).view(-1, 1, 1, 1) if per_branch else scales[0]
        self.cfg = backbone.uses_cfg and uncond is not None and any(g != 1.0 for g in scales)
        self.uncond = uncond
        self.batch_cond = Conditioning.cat([uncond, cond]) if self.cfg else cond
        self.state = state
        self.checkpointed = checkpointed
        self.nfe = 0
        self.on_eval: Callable[[int], None] | None = None

    def set_uncond(self, uncond: Conditioning) -> None:
        """Replace the unconditional conditioning (per-step embeddings of null-text inversion)."""
        self.uncond = uncond
        if self.cfg:
            self.batch_cond = Conditioning.cat([uncond, self.cond])

    def set_cond(self, cond: Conditioning) -> None:
        """Replace the conditional conditioning (per-step prompt mixing)."""
        if cond.batch_size != self.cond.batch_size:
            raise ValueError("replacement conditioning must keep the batch size")
        self.cond = cond
        self.batch_cond = Conditioning.cat([self.uncond, cond]) if self.cfg else cond

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(branches=self.cond.batch_size, cfg=self.cfg)

    def context(self, step: int, num_steps: int, latent_hw: tuple[int, int], mask: Tensor | None = None) -> StepContext:
        """The :class:`StepContext` of sampling step ``step`` with this model's layout and conditioning."""
        return StepContext(
            step=step, num_steps=num_steps, grid=self.grid, layout=self.layout, latent_hw=latent_hw,
            cond=self.cond, mask=mask, uncond=self.uncond if self.cfg else None,
        )  # fmt: skip

    def _forward(self, inp: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        self.nfe += 1
        if not (self.checkpointed and torch.is_grad_enabled()):
            return self.backbone.predict(inp, timestep, cond)
        keys = list(cond.tensors)
        static = cond.static

        def run(inp: Tensor, *values: Tensor) -> Tensor:
            return self.backbone.predict(inp, timestep, Conditioning(dict(zip(keys, values, strict=True)), static))

        return checkpoint(run, inp, *(cond.tensors[k] for k in keys), use_reentrant=False)

    def raw(self, x: Tensor, timestep: Tensor, *, x_cond: Tensor | None = None) -> Tensor:
        """The guided raw output at ``x``; ``x_cond``: the conditional half of the CFG batch evaluated at other
        latents (Pix2Pix-Zero's released guidance step moves the two halves apart)."""
        if x.shape[0] != self.cond.batch_size:
            raise ValueError(f"latent batch {x.shape[0]} does not match the {self.cond.batch_size} prompts")
        if x_cond is not None and (not self.cfg or x_cond.shape != x.shape):
            raise ValueError("x_cond needs classifier-free guidance and the shape of x")
        if self.state is not None:
            self.state.layout = self.layout
            self.state.latent_hw = (x.shape[-2], x.shape[-1])
        inp = torch.cat([x, x if x_cond is None else x_cond]) if self.cfg else x
        out = self._forward(inp, timestep, self.batch_cond).float()
        if not self.cfg:
            return out
        u, c = out.chunk(2)
        g = self.guidance.to(u.device) if isinstance(self.guidance, Tensor) else self.guidance
        return self.guide(u, c, g)

    def predict_rows(self, x: Tensor, timestep: Tensor, cond: Conditioning, *, frozen: bool = False) -> Tensor:
        """One raw forward of rows of their own (``len(x)`` branches, no guidance), counted in ``nfe``: for
        editors that probe the model (Pix2Pix-Zero's attention guidance). Attention editors see the batch
        layout of these rows; the run's layout is restored afterwards. ``frozen``: the denoiser's weights take
        no gradient (a backward to ``x`` only)."""
        state = self.state
        saved = (state.layout, state.latent_hw) if state is not None else None
        if state is not None:
            state.layout, state.latent_hw = BatchLayout(x.shape[0], False), (x.shape[-2], x.shape[-1])
        try:
            with _frozen(self.backbone.denoiser) if frozen else nullcontext():
                return self._forward(x, timestep, cond)
        finally:
            if state is not None and saved is not None:
                state.layout, state.latent_hw = saved

    def to_pred(self, raw: Tensor, x: Tensor, at: Point) -> Pred:
        """A raw (guided) output at ``x`` and point ``at`` as :class:`Pred`, in the backbone's parameterisation."""
        return to_x0_eps(raw, x, at.alpha, at.sigma, self.backbone.prediction)

    def guide(self, uncond_raw: Tensor, cond_raw: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance of two raw outputs at ``scale`` (the backbone's combine)."""
        return self.backbone.combine_guidance(uncond_raw, cond_raw, scale)

    def __call__(self, x: Tensor, at: Point, *, x_cond: Tensor | None = None) -> Pred:
        if self.on_eval is not None:
            self.on_eval(at.step)
        if self.state is not None:
            self.state.point, self.state.stage = at.step, "mid" if at.mid else "grid"
        return self.to_pred(self.raw(x, at.timestep, x_cond=x_cond), x, at)


class HookedModel(WrappedModel):
    """A model function whose on-grid predictions pass through the editor's ``modify_prediction`` (off-grid
    evaluations of the midpoint solvers pass unchanged).

    ``model`` is what the solver calls (the guided model, or an editor's wrapper of it); ``guided`` the
    :class:`GuidedModel` underneath, which gives the step context its layout and conditioning."""

    def __init__(
        self,
        model: GuidedPrediction,
        guided: GuidedModel,
        editor: Editor,
        num_steps: int,
        mask: Tensor | None = None,
    ) -> None:
        super().__init__(model)
        self.guided = guided
        self.editor = editor
        self.num_steps = num_steps
        self.mask = mask

    def __call__(self, x: Tensor, at: Point) -> Pred:
        p = self.inner(x, at)
        if at.mid:
            return p
        ctx = self.guided.context(at.step, self.num_steps, (x.shape[-2], x.shape[-1]), self.mask)
        return self.editor.modify_prediction(ctx, x, p)
