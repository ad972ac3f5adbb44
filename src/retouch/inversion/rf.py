"""RF-Inversion (Rout et al., ICLR 2025): controlled forward and reverse ODEs for rectified flows.

In our flow convention ``x = (1 - s) x0 + s eps`` and the model's velocity ``u = eps - x0`` drives
``dx/ds = u``. The paper's controlled vector fields become:

* forward (inversion, Alg. 1): ``u_hat = u + gamma * (u_cond - u)`` with ``u_cond = (y1 - x) / (1 - s)``, the
  straight line towards a fixed noise sample ``y1``;
* reverse (editing, Alg. 2): ``u_hat = u + eta_i * (u_cond - u)`` with ``u_cond = (x - y0) / s``, the straight
  line back to the image latent ``y0``; ``eta_i = eta`` for ``start <= i < stop`` else 0.

By default (``schedule="grid"``) the forward ODE evaluates the model at the grid's own sigmas. diffusers' community
pipeline (``examples/community/pipeline_flux_rf_inversion.py``, the code the paper's authors point to) does not:
with ``N`` steps it evaluates at ``t_i = i / (N + 1)`` (uniform, and over ``N + 1``: it divides by the length of
the sigma array, which holds the final 0) and steps by the shifted grid's gaps read from the noisy end,
``sigmas[i] - sigmas[i + 1]``, while walking from the clean end. ``schedule="community"`` reproduces that loop
exactly; ``docs/methods.md`` measures what it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from retouch.control.contract import Editor, StepContext
from retouch.inversion.checks import check_start
from retouch.inversion.naive import flow_euler_inversion
from retouch.solvers import ModelFn
from retouch.types import NoiseGrid, Point, Pred, Prediction, Trajectory, to_x0_eps


def _with_velocity(p: Pred, u_hat: Tensor, x: Tensor, sigma: Tensor) -> Pred:
    return to_x0_eps(u_hat, x, 1 - sigma, sigma, Prediction.FLOW)


def rf_inversion(
    model_fn: ModelFn,
    z0: Tensor,
    grid: NoiseGrid,
    *,
    gamma: float = 0.5,
    generator: torch.Generator | None = None,
    noise: Callable[[Sequence[int]], Tensor] | None = None,
    schedule: str = "grid",
) -> Trajectory:
    """Controlled forward ODE from the image latent ``z0`` towards a seeded noise sample ``y1``.

    ``noise(shape)`` draws ``y1`` (default: ``torch.randn`` from ``generator``); ``schedule`` is ``"grid"`` or
    ``"community"`` (module docstring).
    """
    check_start(z0, grid)
    if grid.kind != "flow":
        raise ValueError("RF-Inversion needs a flow model (SD3 or Flux)")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if schedule not in ("grid", "community"):
        raise ValueError(f"RF-Inversion schedule must be 'grid' or 'community', got {schedule!r}")
    if noise is not None:
        y1 = noise(tuple(z0.shape)).to(device=z0.device, dtype=z0.dtype)
    else:
        y1 = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
    if schedule == "community":
        return _community_forward(model_fn, z0, grid, y1, gamma)

    def controlled(x: Tensor, at: Point) -> Pred:
        p = model_fn(x, at)
        s = at.sigma
        u = p.velocity
        u_cond = (y1 - x) / (1 - s)
        return _with_velocity(p, u + gamma * (u_cond - u), x, s)

    traj = flow_euler_inversion(controlled, z0, grid)
    return Trajectory(latents=traj.latents, grid=grid, nfe=traj.nfe, extras={"gamma": gamma})


def _community_forward(model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, y1: Tensor, gamma: float) -> Trajectory:
    """The forward loop of diffusers' community RF-Inversion pipeline (module docstring), step for step."""
    n = grid.num_steps
    x = z0
    latents = [z0]
    for i in range(n):
        t = torch.tensor(i / (n + 1), dtype=torch.float32)
        u = model_fn(x, grid.between(n - 1 - i, t)).velocity
        u_hat = u + gamma * ((y1 - x) / (1 - t) - u)
        x = x + (grid.sigmas[i] - grid.sigmas[i + 1]) * u_hat
        latents.append(x)
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=n, extras={"gamma": gamma})


class RFReverseControl(Editor):
    """The controlled reverse ODE as a prediction hook of the sampling loop (no attention editing)."""

    def __init__(
        self,
        y0: Tensor | None = None,
        *,
        eta: float = 0.9,
        start: float = 0.0,
        stop: float = 0.25,
        source_branch: bool = True,
    ) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(f"need 0 <= start <= stop <= 1, got start={start}, stop={stop}")
        self.y0 = y0
        self.eta, self.start, self.stop = eta, start, stop
        # False: sample the target branch alone, as the paper's pipeline does (the source branch only
        # yields a reconstruction to look at; the control never reads it)
        self.source_branch = source_branch

    def begin(self, trajectory: Trajectory) -> None:
        self.y0 = trajectory.latents[-1]

    def modify_prediction(self, ctx: StepContext, x: Tensor, p: Pred) -> Pred:
        i, grid, num_steps = ctx.step, ctx.grid, ctx.num_steps
        if self.y0 is None or not int(self.start * num_steps) <= i < int(self.stop * num_steps):
            return p
        s = grid.sigmas[i]
        u = p.velocity
        u_cond = (x - self.y0) / s
        return _with_velocity(p, u + self.eta * (u_cond - u), x, s)
