"""Gaussian data whose probability-flow ODE is solved in closed form: exact oracles for solver tests.

Data ``x0 ~ N(mu, s^2)`` per coordinate. On the grid ``x_t = a x0 + sig eps`` the optimal denoiser is
``E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sig^2) (x_t - a mu)`` and the ODE keeps
``z = (x_t - a mu) / sqrt(a^2 s^2 + sig^2)`` constant, so ``x`` at any point is known exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from retouch.types import NoiseGrid, Point, Pred, Prediction, to_x0_eps


class GaussianOracle:
    def __init__(self, dim: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(dim, generator=g, dtype=dtype) * 0.7
        self.s = torch.rand(dim, generator=g, dtype=dtype) * 0.6 + 0.2
        self.dtype = dtype
        self.nfe = 0

    def scale(self, a: Tensor, sig: Tensor) -> Tensor:
        return torch.sqrt(a**2 * self.s**2 + sig**2)

    def exact(self, x: Tensor, a_from: Tensor, s_from: Tensor, a_to: Tensor, s_to: Tensor) -> Tensor:
        z = (x - a_from * self.mu) / self.scale(a_from, s_from)
        return a_to * self.mu + self.scale(a_to, s_to) * z

    def sample_data(self, n: int, seed: int = 1) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.mu + self.s * torch.randn(n, self.mu.shape[0], generator=g, dtype=self.dtype)

    def raw(self, x: Tensor, a: Tensor, sig: Tensor, kind: Prediction) -> Tensor:
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sig**2) * (x - a * self.mu)
        if kind is Prediction.FLOW:
            # u = dx/dsigma along the ODE with a = 1 - sigma
            c = self.scale(a, sig)
            z = (x - a * self.mu) / c
            dc = (-(a) * self.s**2 + sig) / c
            return -self.mu + dc * z
        eps = (x - a * x0) / sig
        if kind is Prediction.EPSILON:
            return eps
        return a * eps - sig * x0  # v

    def model_fn(self, grid: NoiseGrid, kind: Prediction):
        oracle = self

        def fn(x: Tensor, at: Point) -> Pred:
            oracle.nfe += 1
            a, s = at.alpha.to(x.dtype), at.sigma.to(x.dtype)
            return to_x0_eps(oracle.raw(x, a, s, kind), x, a, s, kind)

        return fn


def as_double(grid: NoiseGrid) -> NoiseGrid:
    return NoiseGrid(
        timesteps=grid.timesteps.double(),
        alphas=grid.alphas.double(),
        sigmas=grid.sigmas.double(),
        kind=grid.kind,
        lower_order_final=grid.lower_order_final,
    )
