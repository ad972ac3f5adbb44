"""DPM-Solver++(2M) inversion with the fixed-point (backward-Euler) correction of Hong et al. (CVPR 2024,
"On Exact Inversion of DPM-Solvers", Alg. 1 and 2).

Sampling step ``s -> t`` of DPM-Solver++ is a DDIM step with an *effective* data prediction
``x0_eff = w0 * x0(x_s) + w1 * x0(x_r)`` (``w1 = 0`` for first-order steps; ``r`` is the previous, noisier
point). Its exact inverse is the ``x_s`` solving ``x_t = a_t x0_eff + s_t eps_eff(x_s)``. We solve it by the
fixed point, written in the noise form so that it also holds at the clean end where ``s_t = 0``::

    eps_eff = (x_s - a_s x0_eff(x_s)) / s_s
    x_s    <- (1 - eta) x_s + eta * [ (a_s / a_t) (x_t - s_t eps_eff) + s_s eps_eff ]

starting from the naive (explicit) inversion guess. As in Hong et al., the second-order term needs
``x0(x_r)`` at a point not yet inverted; it is estimated once per step by a naive look-ahead step and frozen.
``iterations = 0`` gives the naive DPM-Solver++ inversion.
"""

from __future__ import annotations

import logging

from torch import Tensor

from retouch.inversion.checks import check_start
from retouch.solvers import ModelFn, dpmpp_2m_coeffs
from retouch.types import NoiseGrid, Trajectory

log = logging.getLogger(__name__)


def dpmpp_inversion(
    model_fn: ModelFn,
    z0: Tensor,
    grid: NoiseGrid,
    *,
    iterations: int = 6,
    eta: float = 1.0,
    tol: float = 1e-6,
    sweeps: int = 1,
) -> Trajectory:
    """Invert ``grid``'s DPM-Solver++(2M) sampler from the clean latent ``z0``.

    Args:
        iterations: fixed-point iterations per step (0 = naive inversion).
        eta: relaxation of the fixed point (1 = plain iteration, Hong et al. use 0.5 with their step size).
        tol: stop a step's iterations when the mean squared residual relative to ``mean(x_t^2)`` is below it.
        sweeps: passes over the whole grid. Pass 1 is Hong et al.'s (look-ahead estimate of the second-order
            term); each further pass takes that term from the previous pass's latents, which converges to
            the exact inverse of the 2M sampler (our extension; 1 extra NFE per step and pass).
    """
    check_start(z0, grid)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    n = grid.num_steps
    a, s = grid.alphas, grid.sigmas
    nfe = 0
    previous: list[Tensor] | None = None  # latents of the previous sweep, grid-indexed
    for _sweep in range(sweeps):
        latents: list[Tensor] = [z0]
        residuals: list[float] = []
        x_t = z0
        for t in range(n, 0, -1):
            i = t - 1  # the sampler's step i: point i -> point t
            coeffs = dpmpp_2m_coeffs(grid, i)
            if previous is None:
                # naive guess: the model on the cleaner latent at the noisier point (as DDIM inversion)
                eps = model_fn(x_t, grid.at(i)).eps
                nfe += 1
                x_s = a[i] * ((x_t - s[t] * eps) / a[t]) + s[i] * eps
            else:
                x_s = previous[i]

            x0_prev = None
            if coeffs is not None and previous is None:
                # look-ahead: naive step to the previous (noisier) point r = i-1, frozen x0 there
                p = model_fn(x_s, grid.at(i - 1))
                y_r = a[i - 1] * ((x_s - s[i] * p.eps) / a[i]) + s[i - 1] * p.eps
                x0_prev = model_fn(y_r, grid.at(i - 1)).x0
                nfe += 2
            elif coeffs is not None:
                x0_prev = model_fn(previous[i - 1], grid.at(i - 1)).x0
                nfe += 1

            x_s, rel, used = _fixed_point(model_fn, x_s, x_t, grid, i, t, coeffs, x0_prev, iterations, eta, tol)
            nfe += used
            residuals.append(rel)
            latents.append(x_s)
            x_t = x_s
        previous = list(reversed(latents))
    finite = [r for r in residuals if r == r]
    if finite:
        log.debug("dpmpp inversion: worst relative residual %.3g", max(finite))
    return Trajectory(
        latents=tuple(previous),
        grid=grid,
        nfe=nfe,
        extras={"residuals": tuple(reversed(residuals)), "iterations": iterations, "sweeps": sweeps},
    )


def _fixed_point(
    model_fn: ModelFn,
    x_s: Tensor,
    x_t: Tensor,
    grid: NoiseGrid,
    i: int,
    t: int,
    coeffs: tuple[float, float] | None,
    x0_prev: Tensor | None,
    iterations: int,
    eta: float,
    tol: float,
) -> tuple[Tensor, float, int]:
    """Solve ``step_i(x_s) = x_t`` for ``x_s``; returns (x_s, best relative residual, NFE used).

    Damped fixed point with backtracking: an iteration that raises the residual is undone and the
    relaxation halved (the role of the plateau scheduler in Hong et al.'s code). This keeps steps with large
    second-order weights (the last steps of a steep grid) convergent.
    """
    a, s = grid.alphas, grid.sigmas
    scale = x_t.pow(2).mean().clamp_min(1e-12)
    best_rel = float("inf")
    best_x = best_target = x_s
    used = 0
    step = eta
    for _ in range(iterations):
        x0 = model_fn(x_s, grid.at(i)).x0
        used += 1
        x0_eff = x0 if coeffs is None else coeffs[0] * x0 + coeffs[1] * x0_prev
        eps_eff = (x_s - a[i] * x0_eff) / s[i]
        residual = a[t] * x0_eff + s[t] * eps_eff - x_t
        rel = float(residual.pow(2).mean() / scale)
        if rel < best_rel:
            if s[t] > a[t]:  # noisy half: the data form contracts (d x0/dx is small)
                target = a[i] * x0_eff + (s[i] / s[t]) * (x_t - a[t] * x0_eff)
            else:  # clean half: the noise form contracts (d eps/dx is small) and allows s_t = 0
                target = (a[i] / a[t]) * (x_t - s[t] * eps_eff) + s[i] * eps_eff
            best_rel, best_x, best_target = rel, x_s, target
        else:
            step *= 0.5
        if best_rel < tol:
            break
        x_s = (1 - step) * best_x + step * best_target
    return best_x, (best_rel if used else float("nan")), used
