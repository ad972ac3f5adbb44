"""Direct Inversion / PnP Inversion (Ju et al., ICLR 2024, Alg. 1).

Inversion itself is the sampler's own (DDIM for DDIM, corrected DPM-Solver++ for DPM-Solver++, Euler for
flow Euler). The method lives in the sampling loop: after every step the source branch is set to the stored
inversion latent ``z*_{i+1}``. This equals the paper's "add the offset ``o_i = z*_{i+1} - step(z_i)`` to the
source row" exactly (the offset form and the overwrite form coincide because editors never change the
source branch's computation), and leaves the target branch untouched.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from retouch.solvers import ModelFn
from retouch.types import NoiseGrid, Trajectory

NATURAL = {
    "ddim": "ddim",
    "dpmpp": "dpmpp",
    "flow_euler": "flow_euler",
    "rf_solver": "rf_solver",
    "fireflow": "fireflow",
    "ddpm": "ddpm",
}


def base_inversion(solver: str) -> str:
    """The inversion whose trajectory Direct Inversion pins the source branch to, for a sampler."""
    return NATURAL.get(solver, "ddim")


def direct_inversion(
    model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, *, base: str = "ddim", **kwargs: Any
) -> Trajectory:
    """The base inversion's trajectory, marked for source correction."""
    from retouch.inversion.base import get_inversion

    traj = get_inversion(base).invert(model_fn, z0, grid, **kwargs)
    return Trajectory(
        latents=traj.latents,
        grid=traj.grid,
        nfe=traj.nfe,
        extras={**traj.extras, "source_correction": True, "base": base},
    )
