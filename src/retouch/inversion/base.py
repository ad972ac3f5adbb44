"""The inversion registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor

from retouch.solvers import ModelFn
from retouch.types import NoiseGrid, Trajectory

Inverter = Callable[..., Trajectory]


@dataclass(frozen=True)
class Inversion:
    name: str
    invert: Inverter
    solver: str  # the sampler whose steps this inversion undoes ("*" = whichever sampler is used)
    families: tuple[str, ...]
    description: str
    source_correction: bool = False  # the sampling loop pins the source branch to the trajectory


def direct_inversion(
    model_fn: ModelFn, z0: Tensor, grid: NoiseGrid, *, base: str = "ddim", **kwargs: Any
) -> Trajectory:
    """Direct Inversion (:mod:`retouch.inversion.direct`): the base inversion's trajectory, marked for source
    correction."""
    traj = get_inversion(base).invert(model_fn, z0, grid, **kwargs)
    return Trajectory(
        latents=traj.latents,
        grid=traj.grid,
        nfe=traj.nfe,
        extras={**traj.extras, "source_correction": True, "base": base},
    )


def _registry() -> dict[str, Inversion]:
    from retouch.inversion import ddpm, dpm, naive, null_text, p2pzero, rf

    items = (
        Inversion(
            "ddim",
            naive.ddim_inversion,
            "ddim",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "DDIM inversion: eps at the noisier timestep applied to the cleaner latent",
        ),
        Inversion(
            "dpmpp",
            dpm.dpmpp_inversion,
            "dpmpp",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "DPM-Solver++(2M) inversion with the fixed-point correction of Hong et al. (2024)",
        ),
        Inversion(
            "flow_euler",
            naive.flow_euler_inversion,
            "flow_euler",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "plain rectified-flow inversion: explicit Euler from the clean latent to noise",
        ),
        Inversion(
            "rf_inversion",
            rf.rf_inversion,
            "flow_euler",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "RF-Inversion (Rout et al. 2025): controlled forward ODE towards a seeded noise (gamma)",
        ),
        Inversion(
            "rf_solver",
            naive.flow_midpoint_inversion,
            "rf_solver",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "RF-Solver inversion: second-order midpoint steps from data to noise (2 NFE per step)",
        ),
        Inversion(
            "fireflow",
            partial(naive.flow_midpoint_inversion, reuse_velocity=True),
            "fireflow",
            ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "FireFlow inversion: midpoint steps reusing the previous velocity (~1 NFE)",
        ),
        Inversion(
            "null_text",
            null_text.null_text_inversion,
            "ddim",
            ("sd", "pixart", "sd3", "qwenimage", "sana"),
            "Null-text inversion (Mokady et al. 2023): per-step unconditional embeddings optimised so the "
            "guided DDIM path hits the guidance-1 pivots",
        ),
        Inversion(
            "negative_prompt",
            null_text.negative_prompt_inversion,
            "ddim",
            ("sd", "pixart", "sd3", "qwenimage", "sana"),
            "Negative-prompt inversion (Miyake et al. 2023): the source prompt replaces the null prompt",
        ),
        Inversion(
            "ddpm",
            ddpm.ddpm_inversion,
            "ddpm",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): independent noisy latents, per-step "
            "noise maps that make the stochastic `ddpm` sampler reproduce the image exactly (seeded)",
            source_correction=True,
        ),
        Inversion(
            "direct",
            direct_inversion,
            "*",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "Direct Inversion (Ju et al. 2024): the sampler's own inversion, then the source branch is "
            "pinned to the inversion trajectory at every step (exact source reconstruction)",
            source_correction=True,
        ),
        Inversion(
            "p2pzero_released",
            p2pzero.released_ddim_inversion,
            "ddim",
            ("sd",),
            "Pix2Pix-Zero's released DDIM inversion (PnP-Inversion's models/pix2pix_zero): its inverse scheduler's "
            "alphas (one index off the grid) and the auto-correlation / KL noise regulariser (lambda 20 / 20)",
        ),
        Inversion(
            "direct_p2pzero_released",
            p2pzero.released_ddim_inversion,
            "ddim",
            ("sd",),
            "Direct Inversion on Pix2Pix-Zero's released DDIM inversion (PnP-Inversion's "
            "directinversion+pix2pix-zero): the source branch pinned to that trajectory",
            source_correction=True,
        ),
        Inversion(
            "none",
            naive.no_inversion,
            "*",
            ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
            "no inversion (0 NFE): the trajectory holds the clean latent at every point, for inversion-free "
            "editors that build their own latents (FlowEdit, kv_edit_inf)",
        ),
    )
    return {i.name: i for i in items}


INVERSIONS: dict[str, Inversion] = _registry()


def get_inversion(name: str) -> Inversion:
    try:
        return INVERSIONS[name]
    except KeyError:
        raise ValueError(f"unknown inversion {name!r}; choose one of {sorted(INVERSIONS)}") from None
