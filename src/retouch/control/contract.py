"""The editor contract: every hook the editing loop, the attention installer and :class:`ComposedEditor` call.

An editor is anything that takes part in an edit (an attention policy, a prediction hook, a latent guidance,
a method with its own loop). It derives from :class:`Editor` and overrides only the hooks it needs; every
hook has a no-op default, so the loop calls each of them without asking whether it exists.

When the hooks run in one edit (:func:`retouch.editing.edit`)::

    set_mask(mask)                      the run's latent mask (or None) -> the mask the run uses
    grid_start(N)                       skip the noisiest points of the grid
    branch_guidance(g)                  one guidance scale per branch, or None (one scale for all)
    install(backbone, state)            reversible model modifications (forward hooks), a context manager
      -- inversion (attention hooks see phase "invert") --
    begin(trajectory)                   the inversion's trajectory
    prepare_conditioning(cond, uncond)  the sampling conditioning, once
    wrap_model(model)                   a model function of its own over the guided model
    sample(model, z0, grid, noise)      a loop of its own (returns the final latents), or None: the shared loop
      -- per sampling step i (StepContext) --
    step_conditioning(ctx, cond)        this step's conditioning, or None (unchanged)
    before_step(ctx, x, model)          latents before the solver step, or None (unchanged)
    modify_prediction(ctx, x, pred)     every on-grid prediction of the step
    after_step(ctx, x)                  latents after the solver step, or None (unchanged)

Attention hooks (called by the installer at every attention call with an :class:`AttnContext`):
``applies`` (does the editor touch this call at all; when no editor does, the fused kernel runs unchanged),
``edit_qkv``, ``logit_bias``, ``needs_probs`` (materialise the softmax map), then either
``probs_block`` / ``block_batch_rows`` / ``edit_block`` (exact edit of one block of the map from the fused
output) or ``edit_probs`` (the whole map).

Editors read the run through the contexts (:class:`StepContext`, :class:`AttnContext`) and the model
function they are handed (:class:`GuidedPrediction`), never through another object's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from retouch.control.context import AttnContext, BatchLayout
from retouch.types import Conditioning, NoiseGrid, Point, Pred, Trajectory

if TYPE_CHECKING:
    from retouch.backbones.base import Backbone
    from retouch.control.installer import EditState

__all__ = ["AttentionEditor", "Editor", "GuidedPrediction", "IdentityEditor", "StepContext"]


@dataclass(frozen=True)
class StepContext:
    """What a loop hook is told about the current sampling step.

    ``step`` is the loop's step index ``i`` (0 = noisiest); the step goes from grid point ``i`` to ``i + 1``
    of ``grid`` (so :attr:`sigma` / :attr:`sigma_next` are the step's two ends). ``layout`` is the model
    batch's layout (branch 0 the source), ``cond`` the conditioning the step runs with (after
    ``step_conditioning``), ``uncond`` the unconditional conditioning of its classifier-free guidance (None
    without guidance), ``mask`` the run's latent mask (None without one).
    """

    step: int
    num_steps: int
    grid: NoiseGrid
    layout: BatchLayout
    latent_hw: tuple[int, int]
    cond: Conditioning | None = None
    mask: Tensor | None = None
    phase: str = "sample"
    uncond: Conditioning | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.step <= self.grid.num_steps:
            raise ValueError(f"step {self.step} is outside the grid's {self.grid.num_steps} steps")
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {self.num_steps}")

    @property
    def timestep(self) -> Tensor:
        return self.grid.timesteps[self.step]

    @property
    def alpha(self) -> Tensor:
        return self.grid.alphas[self.step]

    @property
    def sigma(self) -> Tensor:
        return self.grid.sigmas[self.step]

    @property
    def alpha_next(self) -> Tensor:
        return self.grid.alphas[self.step + 1]

    @property
    def sigma_next(self) -> Tensor:
        return self.grid.sigmas[self.step + 1]

    def at(self, step: int) -> StepContext:
        """The same context at another grid point (a prediction hook is called at every evaluated point)."""
        return dataclasses.replace(self, step=step)


class GuidedPrediction(Protocol):
    """The model function the loop hands to ``before_step`` / ``wrap_model`` / ``sample``.

    ``model(x, point)`` is the guided prediction at a :class:`~retouch.types.Point` (``grid.at(k)`` for grid point
    ``k``); ``predict_rows`` one raw forward of its own
    rows (no guidance, batch layout of its own, counted in ``nfe``) for editors that probe the model;
    ``backbone`` and ``grid`` are the model and grid it evaluates on."""

    nfe: int
    backbone: Backbone
    grid: NoiseGrid

    def __call__(self, x: Tensor, at: Point) -> Pred: ...

    def predict_rows(self, x: Tensor, timestep: Tensor, cond: Conditioning, *, frozen: bool = False) -> Tensor: ...


class WrappedModel:
    """Base of a model function that wraps another (what :meth:`Editor.wrap_model` returns): NFE, backbone,
    grid and ``predict_rows`` are the wrapped model's; a subclass overrides ``__call__`` (calling
    ``self.inner(x, at)`` where it wants the plain prediction)."""

    def __init__(self, inner: GuidedPrediction) -> None:
        self.inner = inner
        self.backbone: Backbone = inner.backbone
        self.grid: NoiseGrid = inner.grid

    @property
    def nfe(self) -> int:
        return self.inner.nfe

    def __call__(self, x: Tensor, at: Point) -> Pred:
        return self.inner(x, at)

    def predict_rows(self, x: Tensor, timestep: Tensor, cond: Conditioning, *, frozen: bool = False) -> Tensor:
        return self.inner.predict_rows(x, timestep, cond, frozen=frozen)


class Editor:
    """Base class of every editor: each hook is a documented no-op; override what the method needs."""

    #: False: sample the target branch alone (the source branch then is neither run nor returned)
    source_branch: bool = True
    #: True: the editor cannot run without a mask (the run refuses to start without one)
    needs_mask: bool = False

    # --- attention (called by the installer at every attention call) -----------------------------------------
    def applies(self, ctx: AttnContext) -> bool:
        """Whether the editor touches this attention call at all (False: the fused kernel runs unchanged)."""
        return False

    def needs_probs(self, ctx: AttnContext) -> bool:
        """Whether the softmax probabilities must be materialised (only then is ``edit_probs`` called)."""
        return False

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``[B, heads, N, d]`` before attention."""
        return q, k, v

    def logit_bias(self, ctx: AttnContext, q: Tensor, k: Tensor) -> Tensor | None:
        """An additive bias on the attention logits (e.g. KV-Edit's masks), or None."""
        return None

    def edit_probs(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        """The full probability map ``[B, heads, Nq, Nk]`` (called when ``needs_probs``)."""
        return probs

    def probs_block(self, ctx: AttnContext, seq_len: int) -> tuple[slice, slice] | None:
        """The only ``(rows, cols)`` block of the map the editor changes, or None (it edits the full map)."""
        return None

    def block_batch_rows(self, ctx: AttnContext) -> list[int] | None:
        """The batch rows ``edit_block`` reads or changes (None: all)."""
        return None

    def edit_block(self, block: Tensor, ctx: AttnContext) -> dict[int, Tensor]:
        """The block of ``probs_block``: returns ``{batch row: new block row}`` for the rows it changes."""
        return {}

    # --- set-up of the run --------------------------------------------------------------------------------------
    def set_mask(self, mask: Tensor | None) -> Tensor | None:
        """The run's latent mask ``[1, 1, h, w]`` (or None): check and shape it; returns the mask the run uses."""
        return mask

    def grid_start(self, num_steps: int) -> int:
        """How many of the noisiest grid steps to skip (inversion and sampling run on the rest)."""
        return 0

    def branch_guidance(self, guidance: float) -> tuple[float, ...] | None:
        """One guidance scale per branch (source first) for the run's ``guidance``, or None (one for all)."""
        return None

    @contextmanager
    def install(self, backbone: Backbone, state: EditState) -> Iterator[None]:
        """Reversible model modifications for the run (e.g. forward hooks); ``state`` is the run's
        :class:`~retouch.control.installer.EditState` (phase, step). Restore everything on exit."""
        yield

    def begin(self, trajectory: Trajectory) -> None:
        """The inversion's trajectory (point 0 the noise, the last point the image latent)."""

    def prepare_conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        """The sampling conditioning (branches ``[source, target...]``), set once before sampling."""
        return cond

    def wrap_model(self, model: GuidedPrediction) -> GuidedPrediction:
        """A model function of the editor's own over the guided model (e.g. LEDITS++'s concept batch)."""
        return model

    def sample(self, model: GuidedPrediction, z0: Tensor, grid: NoiseGrid, noise: Any) -> Tensor | None:
        """A sampling loop of the editor's own (FlowEdit's inversion-free ODE): the final latents of every
        branch, or None to run the shared loop. ``noise(shape)`` draws the run's noise."""
        return None

    # --- per sampling step -----------------------------------------------------------------------------------
    def step_conditioning(self, ctx: StepContext, cond: Conditioning) -> Conditioning | None:
        """This step's conditioning (e.g. per-step embedding mixing), or None for ``cond`` unchanged."""
        return None

    def before_step(self, ctx: StepContext, x: Tensor, model: GuidedPrediction) -> Tensor | None:
        """Latents before the solver step (e.g. Pix2Pix-Zero's attention guidance), or None (unchanged)."""
        return None

    def modify_prediction(self, ctx: StepContext, x: Tensor, p: Pred) -> Pred:
        """Every on-grid prediction at grid point ``ctx.step`` (e.g. RF-Inversion's controlled velocity)."""
        return p

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | None:
        """Latents after the solver step (e.g. local blend), or None (unchanged)."""
        return None


AttentionEditor = Editor  # the former protocol's name


class IdentityEditor(Editor):
    """Changes nothing. With ``materialize=True`` it still forces the explicit softmax path (for tests)."""

    def __init__(self, materialize: bool = False) -> None:
        self.materialize = materialize

    def applies(self, ctx: AttnContext) -> bool:
        return True

    def needs_probs(self, ctx: AttnContext) -> bool:
        return self.materialize
