"""Direct Inversion / PnP Inversion (Ju et al., ICLR 2024, Alg. 1).

Inversion itself is the sampler's own (DDIM for DDIM, corrected DPM-Solver++ for DPM-Solver++, Euler for
flow Euler). The method lives in the sampling loop: after every step the source branch is set to the stored
inversion latent ``z*_{i+1}``. This equals the paper's "add the offset ``o_i = z*_{i+1} - step(z_i)`` to the
source row" exactly (the offset form and the overwrite form coincide because editors never change the
source branch's computation), and leaves the target branch untouched. The registry's ``direct`` entry
(:func:`retouch.inversion.base.direct_inversion`) runs the base inversion and marks the trajectory.
"""

from __future__ import annotations

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
