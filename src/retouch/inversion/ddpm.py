"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, CVPR 2024, Alg. 1).

DDIM inversion runs the deterministic ODE backwards and is only approximately invertible. The edit-friendly
inversion instead fixes the whole noisy path first and stores, for every step, the noise that makes the
*stochastic* DDPM sampler land exactly on it:

1. for every grid point ``k < N`` draw an independent ``eps_k`` and set ``x_k = a_k x0 + s_k eps_k``
   (``x_N = x0``): unlike a DDPM forward chain, consecutive points share no noise, which makes the extracted
   maps larger and less correlated with the image (the paper's "edit-friendly" property);
2. from the noisiest point on, evaluate the model at ``x_k``, form the DDPM posterior mean ``mu_k`` of the
   step ``k -> k+1`` (``retouch.solvers.ddpm_step``) and keep the residual ``r_k = x_{k+1} - mu_k``, which is
   ``sigma_k z_k`` in the paper's notation. ``x_{k+1}`` is then replaced by ``mu_k + r_k`` (equal up to
   rounding) so the next model evaluation sees exactly what the sampler will produce.

Sampling with the ``ddpm`` solver and these maps reproduces ``x0``; editing changes the prediction (target
prompt, semantic guidance) while keeping the maps. We store the residual ``r_k`` rather than ``z_k``: the two
are the same where ``sigma_k > 0``, and the residual also covers a last step to ``sigma = 0`` (flow grids,
``set_alpha_to_one`` schedules), where ``z_k`` is undefined and the paper's form would not reconstruct.

The maths needs only ``x = a x0 + s eps`` and a monotone SNR, so it runs on VP grids (SD, PixArt) and on
rectified-flow grids (SD3, Flux) alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retouch.inversion.checks import check_start
from retouch.solvers import ModelFn, ddpm_sigma
from retouch.types import NoiseGrid, Trajectory


def ddpm_inversion(
    model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, *, generator: torch.Generator | None = None
) -> Trajectory:
    """Edit-friendly DDPM inversion of ``z0`` over ``grid``.

    Returns the trajectory ``latents[k]`` (``latents[0]`` the noisiest, ``latents[N]`` the reconstruction of
    ``z0``) with ``extras["noise_maps"]``: a tensor ``[N, *z0.shape]`` whose row ``k`` is the noise term the
    ``ddpm`` solver adds at step ``k``, and ``extras["noise_std"]``: the mean standard deviation of the
    normalised maps ``z_k`` over the steps with ``sigma_k > 0`` (about 1 for an image the model explains well).

    The independent noises are drawn from ``generator`` from the cleanest point to the noisiest (the order of
    diffusers' LEDITS++ pipeline, so the same seed gives the same path).
    """
    check_start(z0, grid)
    n = grid.num_steps
    xs: list[Tensor] = [torch.empty(0)] * (n + 1)
    xs[n] = z0
    for k in range(n - 1, -1, -1):
        eps = torch.randn(z0.shape, generator=generator, dtype=z0.dtype).to(z0.device)
        xs[k] = grid.alphas[k] * z0 + grid.sigmas[k] * eps
    maps = torch.empty((n, *z0.shape), dtype=z0.dtype, device=z0.device)
    stds: list[float] = []
    for k in range(n):
        p = model_fn(xs[k], grid.at(k))
        sigma = ddpm_sigma(grid, k)
        mean = grid.alphas[k + 1] * p.x0 + (grid.sigmas[k + 1] ** 2 - sigma**2).clamp_min(0).sqrt() * p.eps
        r = xs[k + 1] - mean
        maps[k] = r
        xs[k + 1] = mean + r
        if float(sigma) > 0:
            stds.append(float((r / sigma).std()))
    extras = {
        "noise_maps": maps,
        "noise_std": sum(stds) / len(stds) if stds else 0.0,
    }
    return Trajectory(latents=tuple(xs), grid=grid, nfe=n, extras=extras)
