"""Pure ODE steppers over an explicit :class:`~retouch.types.NoiseGrid`.

A *model function* ``model_fn(x, point) -> Pred`` evaluates the (guided) denoiser on latent ``x`` at a
:class:`~retouch.types.Point` (timestep, noise level, step index) and returns both the clean-data and the noise
estimate. Solvers never touch a model or a scheduler: they step ``k -> k+1`` with the formulas of their papers,
asking the grid for its points (``grid.at(k)``, ``grid.between(k, sigma)`` off the grid). Inverting by plain
reversal is the same loop over the flipped grid (:func:`retouch.schedules.flip`); other inversions add a
method's correction (see :mod:`retouch.inversion`).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from retouch.types import NoiseGrid, Point, Pred

ModelFn = Callable[[Tensor, Point], Pred]
StepCallback = Callable[[int, Tensor], Tensor | None]


class StepFn(Protocol):
    def __call__(
        self, model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]
    ) -> Tensor: ...


def ddim_update(p: Pred, grid: NoiseGrid, i: int) -> Tensor:
    """The DDIM update from point ``i`` to ``i + 1`` given the prediction at ``i``: ``a' x0 + s' eps``."""
    return grid.alphas[i + 1] * p.x0 + grid.sigmas[i + 1] * p.eps


def ddim_step(model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma=0): ``x' = a' x0 + s' eps``.

    On a flow grid (``alpha = 1 - sigma``) this is exactly the Euler step of the velocity ODE.
    """
    return ddim_update(model_fn(x, grid.at(i)), grid, i)


def euler_flow_step(model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]) -> Tensor:
    """Euler step of the rectified-flow ODE ``dx/dsigma = u`` (Liu et al. 2023): ``x' = x + (s' - s) u``."""
    if grid.kind != "flow":
        raise ValueError("flow_euler needs a flow grid (alpha = 1 - sigma); use ddim on a VP grid")
    p = model_fn(x, grid.at(i))
    return x + (grid.sigmas[i + 1] - grid.sigmas[i]) * p.velocity


def _dpm_first_order(x: Tensor, x0: Tensor, grid: NoiseGrid, s: int, t: int) -> Tensor:
    # DPM-Solver++(1) (Lu et al. 2022b, eq. 9): x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0
    h = grid.lambdas[t] - grid.lambdas[s]
    return (grid.sigmas[t] / grid.sigmas[s]) * x - grid.alphas[t] * torch.expm1(-h) * x0


def dpmpp_2m_coeffs(grid: NoiseGrid, i: int) -> tuple[float, float] | None:
    """Weights ``(w0, w1)`` with ``x0_eff = w0 * x0_i + w1 * x0_{i-1}`` for the 2M step ``i -> i+1``,
    or ``None`` where diffusers' rule takes a first-order step (first step; last step if ``lower_order_final``).
    """
    n = grid.num_steps
    if i == 0 or (i == n - 1 and grid.lower_order_final):
        return None
    lam = grid.lambdas
    h = lam[i + 1] - lam[i]
    h0 = lam[i] - lam[i - 1]
    r0 = float(h0 / h)
    if not torch.isfinite(torch.tensor(r0)):
        return None
    # x_t = (s_t/s_s) x - a_t phi (D0 + D1/2), D1 = (m0 - m1)/r0  (Lu et al. 2022b, Alg. 2, midpoint form)
    return 1.0 + 0.5 / r0, -0.5 / r0


def dpmpp_2m_step(model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]) -> Tensor:
    """Multistep DPM-Solver++(2M) in data prediction (Lu et al. 2022b, Alg. 2), diffusers' midpoint variant.

    ``state['x0_prev']`` keeps the previous data prediction; it is per batch row, so a two-branch batch keeps
    one history per branch.
    """
    p = model_fn(x, grid.at(i))
    coeffs = dpmpp_2m_coeffs(grid, i)
    x0 = p.x0 if coeffs is None or "x0_prev" not in state else coeffs[0] * p.x0 + coeffs[1] * state["x0_prev"]
    state["x0_prev"] = p.x0
    return _dpm_first_order(x, x0, grid, i, i + 1)


def midpoint_flow_step(
    model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]
) -> Tensor:
    """Explicit midpoint on the flow ODE (RF-Solver's second-order step, Wang et al. 2024): 2 NFE."""
    s, s_next = grid.sigmas[i], grid.sigmas[i + 1]
    v1 = model_fn(x, grid.at(i)).velocity
    x_mid = x + 0.5 * (s_next - s) * v1
    v2 = model_fn(x_mid, grid.between(i, 0.5 * (s + s_next))).velocity
    return x + (s_next - s) * v2


def fireflow_step(model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]) -> Tensor:
    """FireFlow (Deng et al. 2024): midpoint step reusing the previous midpoint velocity, ~1 NFE per step."""
    s, s_next = grid.sigmas[i], grid.sigmas[i + 1]
    v = state.get("v_mid")
    if v is None:
        v = model_fn(x, grid.at(i)).velocity
    x_mid = x + 0.5 * (s_next - s) * v
    v_mid = model_fn(x_mid, grid.between(i, 0.5 * (s + s_next))).velocity
    state["v_mid"] = v_mid
    return x + (s_next - s) * v_mid


def ddpm_sigma(grid: NoiseGrid, i: int, eta: float = 1.0) -> Tensor:
    """Standard deviation of the stochastic step ``i -> i+1``: the DDPM posterior's, times ``eta``.

    For ``x_k = a_k x0 + s_k eps`` with Markov forward transitions, ``q(x_{k+1} | x_k, x0)`` has variance
    ``s'^2 (1 - (a s' / (a' s))^2)`` (primes: the cleaner point ``k+1``). On a VP grid this is DDIM's
    ``sigma_t(eta)`` (Song et al. 2021, eq. 16); on a flow grid (``a = 1 - s``) it is the same posterior of the
    rectified-flow interpolant, and it is 0 on a last step to ``sigma = 0``.
    """
    a, s = grid.alphas[i], grid.sigmas[i]
    a1, s1 = grid.alphas[i + 1], grid.sigmas[i + 1]
    ratio = (a * s1) / (a1 * s)
    return eta * s1 * (1 - ratio**2).clamp_min(0).sqrt()


def ddpm_step(model_fn: ModelFn, x: Tensor, grid: NoiseGrid, i: int, state: MutableMapping[str, Any]) -> Tensor:
    """Stochastic DDPM step (DDIM with eta = 1; Song et al. 2021, eq. 12):
    ``x' = a' x0 + sqrt(s'^2 - sigma^2) eps + sigma z``.

    The noise term ``sigma z`` is ``state['noise_maps'][i]`` when an edit-friendly inversion left one (its
    per-step maps reproduce the inverted image exactly, Huberman-Spiegelglas et al. 2024), else ``sigma`` times
    a draw from ``state['generator']``.
    """
    p = model_fn(x, grid.at(i))
    sigma = ddpm_sigma(grid, i)
    mean = grid.alphas[i + 1] * p.x0 + (grid.sigmas[i + 1] ** 2 - sigma**2).clamp_min(0).sqrt() * p.eps
    maps = state.get("noise_maps")
    if maps is not None:
        if i >= maps.shape[0]:
            raise ValueError(f"the inversion left {maps.shape[0]} noise maps; step {i} needs one more")
        return mean + maps[i].to(mean)
    z = torch.randn(mean.shape, generator=state.get("generator"), dtype=mean.dtype).to(mean.device)
    return mean + sigma * z


@dataclass(frozen=True)
class Solver:
    """A named stepper. ``grid`` names the diffusers scheduler whose grid it walks by default."""

    name: str
    step: StepFn
    order: int
    nfe_per_step: float
    grid: str  # "ddim" | "dpm" | "flow"
    families: tuple[str, ...]
    description: str


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (
        Solver(
            "ddim",
            ddim_step,
            1,
            1,
            "ddim",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "deterministic DDIM (Euler in the flow parameterisation)",
        ),
        Solver(
            "dpmpp",
            dpmpp_2m_step,
            2,
            1,
            "dpm",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "multistep DPM-Solver++(2M), data prediction",
        ),
        Solver(
            "ddpm",
            ddpm_step,
            1,
            1,
            "ddim",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "stochastic DDPM (DDIM eta=1); replays the noise maps of the edit-friendly `ddpm` inversion",
        ),
        Solver(
            "flow_euler",
            euler_flow_step,
            1,
            1,
            "flow",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "Euler on the rectified-flow ODE",
        ),
        Solver(
            "rf_solver",
            midpoint_flow_step,
            2,
            2,
            "flow",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "RF-Solver: second-order midpoint on the flow ODE",
        ),
        Solver(
            "fireflow",
            fireflow_step,
            2,
            1,
            "flow",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "FireFlow: midpoint with reused velocity, ~1 NFE per step",
        ),
    )
}


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def sample(
    model_fn: ModelFn,
    x: Tensor,
    grid: NoiseGrid,
    solver: Solver | str,
    *,
    start: int = 0,
    callback: StepCallback | None = None,
    before: StepCallback | None = None,
    state: MutableMapping[str, Any] | None = None,
) -> Tensor:
    """The sampling loop (the only one: :func:`retouch.editing.edit`, disentanglement's optimised chain and
    the tests all run it). Integrates over the explicit ``grid`` from point ``start`` to the end.

    ``before(i, x)`` runs before step ``i`` and ``callback(i, x_next)`` after it; either may return
    replacement latents (None: unchanged). ``state``: the solver's per-run state (multistep history, the
    generator and noise maps of the stochastic solver), a fresh one by default."""
    solver = get_solver(solver) if isinstance(solver, str) else solver
    state = {} if state is None else state
    for i in range(start, grid.num_steps):
        if before is not None:
            out = before(i, x)
            x = x if out is None else out
        x = solver.step(model_fn, x, grid, i, state)
        if callback is not None:
            out = callback(i, x)
            x = x if out is None else out
    return x
