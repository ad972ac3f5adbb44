"""FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models").

No inversion: an ODE is integrated directly from the source image towards the edit. With the flow convention
``z_t = (1 - t) x0 + t eps`` and velocity ``V = eps - x0``, at each step ``i`` (Alg. 1 of the paper, as the
authors' ``FlowEdit_utils.py`` implements it):

1. draw ``eps`` and noise the source: ``z_src = (1 - t_i) x_src + t_i eps``;
2. shift it by the edit so far: ``z_tar = z_edit + z_src - x_src``;
3. ``dV = V(z_tar, t_i, target) - V(z_src, t_i, source)``, averaged over ``n_avg`` draws;
4. ``z_edit <- z_edit + (t_{i+1} - t_i) dV``.

Only the last ``n_max`` of the ``N`` steps are integrated (``z_edit`` starts as ``x_src``); over the last
``n_min`` of them the method switches to plain sampling of the target from ``z_tar`` (SDEdit-like).

**Other families.** Nothing above needs a flow *model*, only a flow *view* of the sampling ODE. A VP model
(SD, PixArt) with ``x = a x0 + s eps`` is the flow ``y = x / (a + s)`` at time ``tau = s / (a + s)``
(``y = (1 - tau) x0 + tau eps``), and its ``x0`` / ``eps`` predictions give ``V = eps - x0`` in that view; DDIM
is exactly Euler on it. So the same loop runs on any grid: noisy points are built in the flow view and handed
to the model as ``x = (a + s) y``. On flow grids ``a + s = 1`` and this is the reference loop, operation for
operation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from retouch.control.contract import Editor
from retouch.solvers import ModelFn
from retouch.types import NoiseGrid

Noise = Callable[[Sequence[int]], Tensor]


def flowedit(
    model_fn: ModelFn,
    x_src: Tensor,
    grid: NoiseGrid,
    noise: Noise,
    *,
    n_max: int,
    n_min: int = 0,
    n_avg: int = 1,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """FlowEdit's ODE (module docstring) over ``grid``; returns the edited latent ``[1, C, h, w]``.

    ``model_fn(x, grid.at(i))`` evaluates a two-row batch, row 0 under the source prompt and row 1 under the target;
    ``noise(shape)`` draws the forward noise (one draw per average, as the reference). ``on_step(i, z)`` sees the
    edit latent after each integrated step.
    """
    n = grid.num_steps
    if x_src.shape[0] != 1:
        raise ValueError("FlowEdit edits one image at a time (x_src must have batch 1)")
    if not 0 <= n_min <= n_max <= n:
        raise ValueError(f"FlowEdit needs 0 <= n_min <= n_max <= num_steps, got n_min={n_min}, n_max={n_max}, N={n}")
    if n_avg < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg}")
    if grid.kind == "flow":
        scale = torch.ones_like(grid.sigmas)
        tau = grid.sigmas
    else:
        scale = grid.alphas + grid.sigmas
        tau = grid.sigmas / scale
    shape = tuple(x_src.shape)
    z_edit = x_src.clone()
    y_tar: Tensor | None = None
    for i in range(n - n_max, n):
        t, t_next = tau[i], tau[i + 1]
        if n - i > n_min:
            dv = torch.zeros_like(x_src)
            for _ in range(n_avg):
                eps = noise(shape).to(x_src)
                y_src = (1 - t) * x_src + t * eps
                y_tar_i = z_edit + y_src - x_src
                v = model_fn(torch.cat([y_src, y_tar_i]) * scale[i], grid.at(i)).velocity
                dv += (1 / n_avg) * (v[1:] - v[:1])
            z_edit = z_edit + (t_next - t) * dv
            if on_step is not None:
                on_step(i, z_edit)
        else:  # the last n_min steps: plain sampling of the target from the shifted point
            if y_tar is None:
                eps = noise(shape).to(x_src)
                y_tar = z_edit + (1 - t) * x_src + t * eps - x_src
            # the source row is evaluated too (one model batch) and ignored
            v = model_fn(torch.cat([y_tar, y_tar]) * scale[i], grid.at(i)).velocity
            y_tar = y_tar + (t_next - t) * v[1:]
            if on_step is not None:
                on_step(i, y_tar)
    if y_tar is None:
        return z_edit
    return y_tar * scale[n] if grid.kind != "flow" else y_tar


class FlowEditMethod(Editor):
    """FlowEdit as a method of :func:`retouch.editing.edit`: it replaces inversion and the sampling loop.

    ``source_guidance`` / the run's guidance are the source and target scales (classifier-free guidance on SD,
    PixArt and SD3; the guidance embedding on Flux). The edit returns ``[x_src, z_edit]``, so the "source
    branch" is the input latent itself.
    """

    def __init__(self, *, n_max: int, n_min: int = 0, n_avg: int = 1, source_guidance: float = 1.5) -> None:
        # values checked by FlowEditOptions (retouch.control.editors); flowedit() checks them against the grid
        self.n_max, self.n_min, self.n_avg = n_max, n_min, n_avg
        self.source_guidance = source_guidance
        self.trace: dict[int, Tensor] = {}  # edit latent after each step (parity tests read a few)

    def branch_guidance(self, guidance: float) -> tuple[float, float]:
        return (self.source_guidance, guidance)

    def sample(self, model_fn: ModelFn, x_src: Tensor, grid: NoiseGrid, noise: Noise) -> Tensor:  # type: ignore[override]
        if self.n_max > grid.num_steps:
            raise ValueError(f"n_max={self.n_max} exceeds the {grid.num_steps} steps")
        self.trace = {}

        def keep(i: int, z: Tensor) -> None:
            self.trace[i] = z.detach().clone()

        z = flowedit(model_fn, x_src, grid, noise, n_max=self.n_max, n_min=self.n_min, n_avg=self.n_avg, on_step=keep)
        return torch.cat([x_src, z])
