"""First-order inversions: DDIM inversion and plain rectified-flow (Euler) inversion."""

from __future__ import annotations

from torch import Tensor

from retouch.inversion.base import check_start
from retouch.solvers import ModelFn
from retouch.types import NoiseGrid, Trajectory


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
        eps = model_fn(x, j - 1).eps
        x0 = (x - grid.sigmas[j] * eps) / grid.alphas[j]
        x = grid.alphas[j - 1] * x0 + grid.sigmas[j - 1] * eps
        latents.append(x)
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=n)


def flow_euler_inversion(model_fn: ModelFn, z0: Tensor, grid: NoiseGrid) -> Trajectory:
    """Rectified-flow inversion by explicit Euler from data to noise: ``x_{j-1} = x_j + (s_{j-1}-s_j) u(x_j, s_j)``.

    The velocity is evaluated at the current (cleaner) point, so the first evaluation is at ``sigma = 0``.
    """
    check_start(z0, grid)
    if grid.kind != "flow":
        raise ValueError("flow_euler inversion needs a flow grid; use ddim inversion on a VP model")
    n = grid.num_steps
    latents: list[Tensor] = [z0]
    x = z0
    for j in range(n, 0, -1):
        u = model_fn(x, j).velocity
        x = x + (grid.sigmas[j - 1] - grid.sigmas[j]) * u
        latents.append(x)
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=n)


def flow_midpoint_inversion(
    model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, *, reuse_velocity: bool = False
) -> Trajectory:
    """Second-order flow inversion: the midpoint step of RF-Solver (Wang et al. 2024) run from data to noise.

    With ``reuse_velocity`` (FireFlow, Deng et al. 2024) the start velocity of each step is the previous step's
    midpoint velocity, so a step costs one model evaluation after the first.
    """
    check_start(z0, grid)
    if grid.kind != "flow":
        raise ValueError("midpoint flow inversion needs a flow grid")
    at_sigma = getattr(model_fn, "at_sigma", None)
    if at_sigma is None:
        raise TypeError("midpoint inversion evaluates between grid points; the model function needs .at_sigma")
    n = grid.num_steps
    latents: list[Tensor] = [z0]
    x = z0
    nfe = 0
    v_prev = None
    for j in range(n, 0, -1):
        s, s_next = grid.sigmas[j], grid.sigmas[j - 1]
        if v_prev is None or not reuse_velocity:
            v = model_fn(x, j).velocity
            nfe += 1
        else:
            v = v_prev
        x_mid = x + 0.5 * (s_next - s) * v
        v_mid = at_sigma(x_mid, 0.5 * (s + s_next), j - 1).velocity
        nfe += 1
        x = x + (s_next - s) * v_mid
        v_prev = v_mid
        latents.append(x)
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=nfe)
