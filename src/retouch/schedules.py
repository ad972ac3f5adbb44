"""Sampling grids, built from diffusers scheduler configs (diffusers *produces* grids; stepping is ours).

Each builder instantiates the scheduler diffusers would use, calls its ``set_timesteps`` and reads the
grid it produced, so our pure solvers walk exactly the points the stock pipelines walk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from retouch.types import NoiseGrid

_VP_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "timestep_spacing",
    "steps_offset",
    "prediction_type",
    "rescale_betas_zero_snr",
)


def _vp_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in _VP_KEYS if k in config and config[k] is not None}


def ddim_grid(config: Mapping[str, Any], num_steps: int) -> NoiseGrid:
    """The DDIM grid of ``DDIMScheduler(**config).set_timesteps(num_steps)`` (Song et al. 2021, eq. 12).

    The last point is DDIM's "previous timestep" of the final step: ``alphas_cumprod[t - stride]`` if that
    exists, else ``final_alpha_cumprod`` (``alphas_cumprod[0]`` unless ``set_alpha_to_one``).
    """
    from diffusers import DDIMScheduler

    kw = _vp_kwargs(config)
    kw["clip_sample"] = False
    kw["set_alpha_to_one"] = bool(config.get("set_alpha_to_one", False))
    sched = DDIMScheduler(**kw)
    sched.set_timesteps(num_steps)
    ts = sched.timesteps.to(torch.int64)
    stride = sched.config.num_train_timesteps // num_steps
    ac = sched.alphas_cumprod
    t_last = int(ts[-1]) - stride
    a_last = ac[t_last] if t_last >= 0 else sched.final_alpha_cumprod
    abar = torch.cat([ac[ts], a_last.reshape(1)])
    timesteps = torch.cat([ts, torch.tensor([t_last])]).to(torch.float32)
    return NoiseGrid(timesteps=timesteps, alphas=abar.sqrt(), sigmas=(1 - abar).sqrt(), kind="vp")


def dpm_grid(config: Mapping[str, Any], num_steps: int) -> NoiseGrid:
    """The grid of ``DPMSolverMultistepScheduler(**config).set_timesteps(num_steps)`` (Lu et al. 2022).

    diffusers stores VE sigmas ``s = sqrt((1-abar)/abar)``; we convert them the way it does
    (``alpha = 1/sqrt(s^2+1)``, ``sigma = s * alpha``). The final point follows ``final_sigmas_type``.
    """
    from diffusers import DPMSolverMultistepScheduler

    kw = _vp_kwargs(config)
    for k in ("final_sigmas_type", "lower_order_final", "euler_at_final", "lambda_min_clipped"):
        if k in config and config[k] is not None:
            kw[k] = config[k]
    kw.update(algorithm_type="dpmsolver++", solver_order=2)
    sched = DPMSolverMultistepScheduler(**kw)
    sched.set_timesteps(num_steps)
    ve = sched.sigmas.to(torch.float32)
    alphas = 1.0 / (ve**2 + 1) ** 0.5
    sigmas = ve * alphas
    ts = sched.timesteps.to(torch.float32)
    timesteps = torch.cat([ts, torch.tensor([0.0])])
    c = sched.config
    lof = bool(c.euler_at_final or (c.lower_order_final and num_steps < 15) or c.final_sigmas_type == "zero")
    return NoiseGrid(timesteps=timesteps, alphas=alphas, sigmas=sigmas, kind="vp", lower_order_final=lof)


def flux_shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """Resolution-dependent time shift of Flux (linear in the number of image tokens)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def flow_grid(config: Mapping[str, Any], num_steps: int, *, image_seq_len: int | None = None) -> NoiseGrid:
    """The grid of ``FlowMatchEulerDiscreteScheduler(**config)`` as the stock pipelines set it.

    With ``use_dynamic_shifting`` (Flux) the pipeline passes ``sigmas = linspace(1, 1/N, N)`` and
    ``mu = flux_shift_mu(image_seq_len)``; otherwise (SD3) it calls ``set_timesteps(N)``.
    ``alpha = 1 - sigma`` (rectified flow); the model is told ``timestep = 1000 * sigma``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    if sched.config.use_dynamic_shifting:
        if image_seq_len is None:
            raise ValueError("a dynamically shifted flow grid needs image_seq_len")
        sig = np.linspace(1.0, 1 / num_steps, num_steps)
        sched.set_timesteps(sigmas=sig, mu=flux_shift_mu(image_seq_len, sched.config))
    else:
        sched.set_timesteps(num_steps)
    sigmas = sched.sigmas.to(torch.float32)
    timesteps = torch.cat([sched.timesteps.to(torch.float32), torch.tensor([0.0])])
    return NoiseGrid(timesteps=timesteps, alphas=1 - sigmas, sigmas=sigmas, kind="flow")


def uniform_flow_grid(num_steps: int, shift: float = 1.0) -> NoiseGrid:
    """A plain rectified-flow grid ``sigma = shift*t / (1 + (shift-1) t)`` for t uniform in [1, 0]."""
    t = torch.linspace(1.0, 0.0, num_steps + 1)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return NoiseGrid(timesteps=sigmas * 1000, alphas=1 - sigmas, sigmas=sigmas, kind="flow")


def vp_grid_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: list[int], final_abar: float) -> NoiseGrid:
    """A VP grid at the given integer timesteps (descending) with an explicit final ``abar``."""
    ts = torch.tensor(timesteps, dtype=torch.int64)
    abar = torch.cat([alphas_cumprod[ts], torch.tensor([final_abar], dtype=alphas_cumprod.dtype)])
    t_all = torch.cat([ts.to(torch.float32), torch.tensor([-1.0])])
    return NoiseGrid(timesteps=t_all, alphas=abar.sqrt(), sigmas=(1 - abar).sqrt(), kind="vp")


def released_inverse_alphas(config: Mapping[str, Any], timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """``(abar_from, abar_to)`` of Pix2Pix-Zero's released inverse scheduler (``DDIMInverseScheduler`` as its
    code drives it) for each sampling timestep (noisiest first): it steps from ``abar[t - 1]`` and ends at
    ``abar[999]``, one index off the sampling grid."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**_vp_kwargs(config))
    ac = sched.alphas_cumprod
    n_train = int(sched.config.num_train_timesteps)
    stride = n_train // (timesteps.shape[0])
    t = timesteps.to(torch.int64)
    nxt = t + stride
    to = torch.where(nxt <= n_train, ac[(nxt - 1).clamp(max=n_train - 1)], ac[-1])
    return ac[t - 1], to


def tail(grid: NoiseGrid, num_steps: int) -> NoiseGrid:
    """The last ``num_steps`` steps of ``grid`` (its last ``num_steps + 1`` points): a run that starts part-way
    down the schedule, as LEDITS++ and edit-friendly DDPM inversion do with their ``skip``."""
    if grid.flipped:
        raise ValueError("tail() takes the end of a sampling grid, not of a flipped one")
    if not 1 <= num_steps <= grid.num_steps:
        raise ValueError(f"cannot take {num_steps} steps from a {grid.num_steps}-step grid")
    start = grid.num_steps - num_steps
    return NoiseGrid(
        timesteps=grid.timesteps[start:],
        alphas=grid.alphas[start:],
        sigmas=grid.sigmas[start:],
        kind=grid.kind,
        lower_order_final=grid.lower_order_final,
    )


def flip(grid: NoiseGrid) -> NoiseGrid:
    """``grid`` walked backwards (cleanest point first): sampling over it is the plain reversal of sampling
    over ``grid`` (an inversion), point ``k`` of the flipped grid being point ``N - k`` of ``grid``. Its
    points (:meth:`NoiseGrid.at`) keep the sampling grid's step indices, so editors count steps the same way
    while inverting and sampling."""
    return NoiseGrid(
        timesteps=grid.timesteps.flip(0),
        alphas=grid.alphas.flip(0),
        sigmas=grid.sigmas.flip(0),
        kind=grid.kind,
        lower_order_final=grid.lower_order_final,
        flipped=not grid.flipped,
    )


def skipped_steps(num_steps: int, skip: float) -> int:
    """Steps of the whole grid when the noisiest ``skip`` fraction (of ``num_steps``) is left out:
    ``int(num_steps * (1 + skip))``, the rule of diffusers' LEDITS++ pipeline."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    return int(num_steps * (1 + skip))


def check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1 or num_steps > 1000:
        raise ValueError(f"num_steps must be an integer in [1, 1000], got {num_steps!r}")


__all__ = [
    "check_steps",
    "ddim_grid",
    "dpm_grid",
    "flow_grid",
    "flux_shift_mu",
    "skipped_steps",
    "tail",
    "uniform_flow_grid",
    "released_inverse_alphas",
    "vp_grid_from_alphas_cumprod",
]
