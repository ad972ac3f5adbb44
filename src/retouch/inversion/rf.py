"""RF-Inversion (Rout et al., ICLR 2025): controlled forward and reverse ODEs for rectified flows.

In our flow convention ``x = (1 - s) x0 + s eps`` and the model's velocity ``u = eps - x0`` drives
``dx/ds = u``. The paper's controlled vector fields become:

* forward (inversion, Alg. 1): ``u_hat = u + gamma * (u_cond - u)`` with ``u_cond = (y1 - x) / (1 - s)``, the
  straight line towards a fixed noise sample ``y1``;
* reverse (editing, Alg. 2): ``u_hat = u + eta_i * (u_cond - u)`` with ``u_cond = (x - y0) / s``, the straight
  line back to the image latent ``y0``; ``eta_i = eta`` for ``start <= i < stop`` else 0.

Unlike diffusers' community pipeline we evaluate the model at the grid's own sigmas during inversion (that
pipeline evaluates at uniform ``i/N`` while stepping with shifted sigma gaps, see the reference notes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from retouch.inversion.base import check_start
from retouch.inversion.naive import flow_euler_inversion
from retouch.solvers import ModelFn
from retouch.types import NoiseGrid, Pred, Prediction, Trajectory, to_x0_eps


def _with_velocity(p: Pred, u_hat: Tensor, x: Tensor, sigma: Tensor) -> Pred:
    return to_x0_eps(u_hat, x, 1 - sigma, sigma, Prediction.FLOW)


def rf_inversion(
    model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, *, gamma: float = 0.5, generator: torch.Generator | None = None
) -> Trajectory:
    """Controlled forward ODE from the image latent ``z0`` towards a seeded noise sample ``y1``."""
    check_start(z0, grid)
    if grid.kind != "flow":
        raise ValueError("RF-Inversion needs a flow model (SD3 or Flux)")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    y1 = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)

    def controlled(x: Tensor, k: int) -> Pred:
        p = model_fn(x, k)
        s = grid.sigmas[k]
        u = p.velocity
        u_cond = (y1 - x) / (1 - s)
        return _with_velocity(p, u + gamma * (u_cond - u), x, s)

    traj = flow_euler_inversion(controlled, z0, grid)
    return Trajectory(latents=traj.latents, grid=grid, nfe=traj.nfe, extras={"gamma": gamma})


class RFReverseControl:
    """The controlled reverse ODE as a prediction hook of the sampling loop (no attention editing)."""

    def __init__(self, y0: Tensor | None = None, *, eta: float = 0.9, start: float = 0.0, stop: float = 0.25) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(f"need 0 <= start <= stop <= 1, got start={start}, stop={stop}")
        self.y0 = y0
        self.eta, self.start, self.stop = eta, start, stop

    # the attention-editor protocol: this controller never touches attention
    def applies(self, ctx) -> bool:
        return False

    def needs_probs(self, ctx) -> bool:
        return False

    def edit_qkv(self, q, k, v, ctx):
        return q, k, v

    def edit_probs(self, probs, ctx):
        return probs

    def begin(self, trajectory: Trajectory) -> None:
        self.y0 = trajectory.latents[-1]

    def modify_prediction(self, i: int, x: Tensor, p: Pred, grid: NoiseGrid, num_steps: int) -> Pred:
        if self.y0 is None or not int(self.start * num_steps) <= i < int(self.stop * num_steps):
            return p
        s = grid.sigmas[i]
        u = p.velocity
        u_cond = (x - self.y0) / s
        return _with_velocity(p, u + self.eta * (u_cond - u), x, s)
