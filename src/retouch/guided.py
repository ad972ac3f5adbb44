"""The one guided prediction: ``model_fn(x, k) -> Pred`` over a backbone, and the editor's prediction hook.

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
from retouch.control.contract import Editor, GuidedPrediction, StepContext
from retouch.types import Conditioning, NoiseGrid, Pred, to_x0_eps

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
    """``model_fn(x, k) -> Pred`` over a backbone: batches CFG, counts NFE, keeps math in float32."""

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
            cond=self.cond, mask=mask,
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
        return self.backbone.combine_guidance(u, c, g)

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

    def _mark(self, point: int, stage: str) -> None:
        if self.state is not None:
            self.state.point, self.state.stage = point, stage

    def __call__(self, x: Tensor, k: int, *, x_cond: Tensor | None = None) -> Pred:
        if self.on_eval is not None:
            self.on_eval(k)
        self._mark(k, "grid")
        g = self.grid
        raw = self.raw(x, g.timesteps[k], x_cond=x_cond)
        return to_x0_eps(raw, x, g.alphas[k], g.sigmas[k], self.backbone.prediction)

    def at_sigma(self, x: Tensor, sigma: Tensor, i: int) -> Pred:
        """Evaluate off-grid on a flow grid (midpoint solvers)."""
        if self.grid.kind != "flow":
            raise ValueError("off-grid evaluation needs a flow model")
        self._mark(i, "mid")
        raw = self.raw(x, sigma * 1000)
        return to_x0_eps(raw, x, 1 - sigma, sigma, self.backbone.prediction)


class HookedModel:
    """A model function whose on-grid predictions pass through the editor's ``modify_prediction``.

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
        self.model = model
        self.guided = guided
        self.editor = editor
        self.num_steps = num_steps
        self.mask = mask

    @property
    def nfe(self) -> int:
        return self.model.nfe

    @property
    def backbone(self) -> Backbone:
        return self.guided.backbone

    @property
    def grid(self) -> NoiseGrid:
        return self.guided.grid

    def __call__(self, x: Tensor, k: int) -> Pred:
        ctx = self.guided.context(k, self.num_steps, (x.shape[-2], x.shape[-1]), self.mask)
        return self.editor.modify_prediction(ctx, x, self.model(x, k))

    def predict_rows(self, x: Tensor, timestep: Tensor, cond: Conditioning, *, frozen: bool = False) -> Tensor:
        return self.guided.predict_rows(x, timestep, cond, frozen=frozen)

    def at_sigma(self, x: Tensor, sigma: Tensor, i: int) -> Pred:
        return self.model.at_sigma(x, sigma, i)  # type: ignore[attr-defined]
