"""Pix2Pix-Zero's released DDIM inversion (PnP-Inversion's ``models/pix2pix_zero``), as a reference mode.

Two things set it apart from :func:`retouch.inversion.naive.ddim_inversion`:

* **Its inverse scheduler** (``models/pix2pix_zero/scheduler.py``) evaluates the model at the grid's timesteps
  ``t`` (1, 21, ..., 981 for 50 SD steps) but steps between ``alphas_cumprod[t - 1]`` and
  ``alphas_cumprod[t + stride - 1]`` (``alphas_cumprod[T - 1]`` past the end): the clean latent is taken to sit
  at ``alphas_cumprod[0]`` and the inverted noise at ``alphas_cumprod[999]``, one index off the sampling grid.
* **The noise regulariser** (Parmar et al. §3.1): before each step the predicted noise takes ``reg_steps``
  rounds of ``ac_rolls`` gradient steps on an auto-correlation loss (random roll amounts, on a pyramid of the
  noise map down to 8 px) and one on a KL loss towards N(0, 1), with weights ``lambda_ac`` / ``lambda_kl``
  (20 / 20 as released). The roll amounts come from a ``random.Random(reg_seed)`` (the released code draws them
  from python's global generator after ``setup_seed(1234)``).

The trajectory it returns puts the latents on the sampling grid's points as the released code pairs them with
the sampler (``latent_list[-1 - i]`` at step ``i``); the sampler itself is unchanged.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.control.contract import GuidedPrediction
from retouch.inversion.checks import check_start
from retouch.schedules import released_inverse_alphas
from retouch.types import NoiseGrid, Trajectory


def auto_corr_loss(noise: Tensor, rng: random.Random) -> Tensor:
    """Pix2Pix-Zero's auto-correlation loss of a ``[1, C, H, W]`` noise map (random roll per pyramid level)."""
    if noise.shape[0] != 1:
        raise ValueError("the auto-correlation regulariser works on one latent at a time")
    loss = noise.new_zeros(())
    for ch in range(noise.shape[1]):
        x = noise[0, ch][None, None]
        while True:
            roll = rng.randrange(x.shape[2] // 2)
            loss = loss + (x * torch.roll(x, shifts=roll, dims=2)).mean() ** 2
            loss = loss + (x * torch.roll(x, shifts=roll, dims=3)).mean() ** 2
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, kernel_size=2)
    return loss


def kl_divergence(x: Tensor) -> Tensor:
    mu, var = x.mean(), x.var()
    return var + mu**2 - 1 - torch.log(var + 1e-7)


def regularise(
    eps: Tensor, *, lambda_ac: float, lambda_kl: float, reg_steps: int, ac_rolls: int, rng: random.Random
) -> Tensor:
    """The released noise regulariser (module docstring)."""
    e = eps.detach()
    with torch.enable_grad():
        for _ in range(reg_steps):
            if lambda_ac > 0:
                for _ in range(ac_rolls):
                    v = e.detach().clone().requires_grad_(True)
                    (g,) = torch.autograd.grad(auto_corr_loss(v, rng), v)
                    e = e - lambda_ac * g / ac_rolls
            if lambda_kl > 0:
                v = e.detach().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(kl_divergence(v), v)
                e = e - lambda_kl * g
            e = e.detach()
    return e


def released_ddim_inversion(
    model_fn: GuidedPrediction,
    z0: Tensor,
    grid: NoiseGrid,
    *,
    lambda_ac: float = 20.0,
    lambda_kl: float = 20.0,
    reg_steps: int = 5,
    ac_rolls: int = 5,
    reg_seed: int = 0,
) -> Trajectory:
    """Pix2Pix-Zero's released inversion (module docstring) on the sampling grid's timesteps. The scheduler's
    ``alphas_cumprod`` table comes from the guided model's backbone (``model_fn.backbone.scheduler_config``)."""
    check_start(z0, grid)
    scheduler_config = model_fn.backbone.scheduler_config
    if grid.kind != "vp":
        raise ValueError("Pix2Pix-Zero's released inversion is a DDIM (VP) inversion")
    for label, v in (("lambda_ac", lambda_ac), ("lambda_kl", lambda_kl)):
        if v < 0:
            raise ValueError(f"{label} must be >= 0, got {v}")
    if reg_steps < 0 or ac_rolls < 1:
        raise ValueError(f"reg_steps must be >= 0 and ac_rolls >= 1, got {reg_steps}, {ac_rolls}")
    n = grid.num_steps
    a_from, a_to = released_inverse_alphas(scheduler_config, grid.timesteps[:n])
    rng = random.Random(reg_seed)
    latents: list[Tensor] = [z0]
    x = z0
    for j in range(n, 0, -1):
        k = j - 1  # the model runs at the grid's timestep k (ascending as j falls)
        eps = model_fn(x, grid.at(k)).eps
        if lambda_ac > 0 or lambda_kl > 0:
            eps = regularise(eps, lambda_ac=lambda_ac, lambda_kl=lambda_kl, reg_steps=reg_steps,
                             ac_rolls=ac_rolls, rng=rng)  # fmt: skip
        af, at = a_from[k].to(x.dtype), a_to[k].to(x.dtype)
        x0 = (x - (1 - af).sqrt() * eps) / af.sqrt()
        x = at.sqrt() * x0 + (1 - at).sqrt() * eps
        latents.append(x)
    return Trajectory(latents=tuple(reversed(latents)), grid=grid, nfe=n)
