"""First-order inversions: DDIM inversion and plain rectified-flow (Euler) inversion."""

from __future__ import annotations

from torch import Tensor

from retouch.inversion.checks import check_start
from retouch.schedules import flip
from retouch.solvers import ModelFn, sample
from retouch.types import NoiseGrid, Point, Pred, Trajectory


def no_inversion(model_fn: ModelFn, z0: Tensor, grid: NoiseGrid) -> Trajectory:
    """No inversion: every point of the trajectory is the clean latent (methods that start from the image
    itself, e.g. FlowEdit). Evaluates nothing."""
    check_start(z0, grid)
    return Trajectory(latents=(z0,) * (grid.num_steps + 1), grid=grid, nfe=0)


def ddim_inversion(model_fn: ModelFn, z0: Tensor, grid: NoiseGrid) -> Trajectory:
    """DDIM inversion (Song et al. 2021; Dhariwal & Nichol 2021, appendix F; as in Mokady et al. 2023).

    Step ``j -> j-1`` (towards noise) evaluates the model on the *cleaner* latent ``x_j`` at the *noisier*
    point ``j-1`` and applies DDIM with the roles of the endpoints swapped:
    ``x0 = (x_j - s_j eps) / a_j``, ``x_{j-1} = a_{j-1} x0 + s_{j-1} eps``.
    """
    check_start(z0, grid)
    n = grid.num_steps
    latents: list[Tensor] = [z0]
    x = z0
    for j in range(n, 0, -1):
        eps = model_fn(x, grid.at(j - 1)).eps
        x0 = (x - grid.sigmas[j] * eps) / grid.alphas[j]
        x = grid.alphas[j - 1] * x0 + grid.sigmas[j - 1] * eps
        latents.append(x)
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=n)


class _Counted:
    """``model_fn``, counting its evaluations."""

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn = model_fn
        self.nfe = 0

    def __call__(self, x: Tensor, at: Point) -> Pred:
        self.nfe += 1
        return self.model_fn(x, at)


def reversal_inversion(model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, solver: str) -> Trajectory:
    """An inversion that is the plain reversal of ``solver``: the shared sampling loop
    (:func:`retouch.solvers.sample`) run from the clean latent over the flipped grid, whose points keep the
    sampling grid's step indices (what the model's progress and the editors see)."""
    check_start(z0, grid)
    counted = _Counted(model_fn)
    latents: list[Tensor] = [z0]
    sample(counted, z0, flip(grid), solver, callback=lambda i, x: latents.append(x))
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=counted.nfe)


def flow_euler_inversion(model_fn: ModelFn, z0: Tensor, grid: NoiseGrid) -> Trajectory:
    """Rectified-flow inversion by explicit Euler from data to noise: ``x_{j-1} = x_j + (s_{j-1}-s_j) u(x_j, s_j)``
    (the flow_euler sampler over the flipped grid).

    The velocity is evaluated at the current (cleaner) point, so the first evaluation is at ``sigma = 0``.
    """
    check_start(z0, grid)
    if grid.kind != "flow":
        raise ValueError("flow_euler inversion needs a flow grid; use ddim inversion on a VP model")
    return reversal_inversion(model_fn, z0, grid, "flow_euler")


def flow_midpoint_inversion(
    model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, *, reuse_velocity: bool = False
) -> Trajectory:
    """Second-order flow inversion: the midpoint step of RF-Solver (Wang et al. 2024) run from data to noise
    (the rf_solver / fireflow sampler over the flipped grid).

    With ``reuse_velocity`` (FireFlow, Deng et al. 2024) the start velocity of each step is the previous step's
    midpoint velocity, so a step costs one model evaluation after the first.
    """
    check_start(z0, grid)
    if grid.kind != "flow":
        raise ValueError("midpoint flow inversion needs a flow grid")
    return reversal_inversion(model_fn, z0, grid, "fireflow" if reuse_velocity else "rf_solver")
