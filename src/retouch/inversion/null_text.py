"""Optimisation-based and prompt-based fixes of classifier-free-guided DDIM reconstruction.

* **Null-text inversion** (Mokady et al., CVPR 2023): DDIM inversion at guidance 1 gives pivots ``z*``; then,
  from the noisiest step on, the unconditional embedding of each step is optimised (Adam, a few iterations,
  early stop) so that the guided DDIM step from ``z_i`` lands on ``z*_{i+1}``. The per-step embeddings are
  used as the unconditional input of *both* branches while editing.
* **Negative-prompt inversion** (Miyake et al. 2023): no optimisation; the unconditional input while sampling
  is the source prompt's embedding, which makes the guided step equal the conditional one on the source
  branch.

Both return the pivot trajectory with ``extras["uncond_per_step"]`` (one single-row Conditioning per step).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from retouch.guided import GuidedModel
from retouch.inversion.checks import check_start
from retouch.inversion.naive import ddim_inversion
from retouch.solvers import ddim_update
from retouch.types import Conditioning, NoiseGrid, Point, Trajectory

log = logging.getLogger(__name__)


def _guided_model(model_fn: Any) -> GuidedModel:
    if not isinstance(model_fn, GuidedModel):
        raise TypeError("this inversion needs the editing loop's guided model (retouch.guided.GuidedModel)")
    if not model_fn.backbone.uses_cfg:
        raise ValueError(f"{model_fn.backbone.family} uses no classifier-free guidance: nothing to invert")
    return model_fn


def negative_prompt_inversion(model_fn: Any, z0: Tensor, grid: NoiseGrid, **_: Any) -> Trajectory:
    """DDIM pivots; while sampling, the unconditional input is the source prompt's embedding."""
    model = _guided_model(model_fn)
    traj = ddim_inversion(model_fn, z0, grid)
    source = model.cond.select([0])
    return Trajectory(
        latents=traj.latents, grid=grid, nfe=traj.nfe, extras={"uncond_per_step": [source] * grid.num_steps}
    )


def null_text_inversion(
    model_fn: Any,
    z0: Tensor,
    grid: NoiseGrid,
    *,
    uncond: Conditioning | None = None,
    guidance: float = 7.5,
    inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    **_: Any,
) -> Trajectory:
    """Null-text inversion (Mokady et al. 2023, Alg. 1) over the DDIM grid; optimises ``encoder_hidden_states``
    of the unconditional conditioning per step (pooled / extra embeddings stay as they are). Every network call
    goes through the guided model's row probe (:meth:`GuidedModel.predict_rows`, weights frozen); the
    conditional output of a step is computed once and reused by its inner iterations, as in the paper's code."""
    check_start(z0, grid)
    model = _guided_model(model_fn)
    if uncond is None:
        raise ValueError("null-text inversion needs the unconditional conditioning")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    pivots = ddim_inversion(model_fn, z0, grid)
    nfe = pivots.nfe
    cond = model.cond.select([0])
    null = uncond.tensors["encoder_hidden_states"].detach().clone()
    per_step: list[Conditioning] = []
    losses: list[float] = []
    z = pivots.latents[0]
    for i in range(grid.num_steps):
        at = grid.at(i)
        target = pivots.latents[i + 1]

        def step(u: Conditioning, raw_c: Tensor, z: Tensor = z, at: Point = at, i: int = i) -> Tensor:
            """The guided DDIM step from ``z`` with unconditional input ``u`` (the conditional output given)."""
            raw_u = model.predict_rows(z, at.timestep, u, frozen=True).float()
            return ddim_update(model.to_pred(model.guide(raw_u, raw_c, guidance), z, at), grid, i)

        with torch.no_grad():
            raw_c = model.predict_rows(z, at.timestep, cond).float()
        nfe += 1
        # a fresh tensor per step: Adam updates it in place, and the previous steps keep theirs
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=lr * (1.0 - i / 100.0))
        threshold = early_stop + i * 2e-5  # Mokady et al.'s code: a fixed slope of 2e-5 per step
        loss_value = float("nan")
        for _ in range(inner_steps):
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(step(uncond.replace(encoder_hidden_states=null), raw_c), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
            nfe += 1
            loss_value = float(loss)
            if loss_value < threshold:
                break
        null = null.detach()
        step_uncond = uncond.replace(encoder_hidden_states=null)
        per_step.append(step_uncond)
        losses.append(loss_value)
        with torch.no_grad():
            z = step(step_uncond, raw_c)
        nfe += 1
    log.info("null-text inversion: final step loss %.3g", losses[-1] if losses else float("nan"))
    return Trajectory(
        latents=pivots.latents, grid=grid, nfe=nfe, extras={"uncond_per_step": per_step, "losses": tuple(losses)}
    )
