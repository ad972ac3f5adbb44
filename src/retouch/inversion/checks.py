"""Checks every inversion runs on its input (a module of its own: the registry in ``base.py`` imports the
inversions, so they must not import it)."""

from __future__ import annotations

from torch import Tensor

from retouch.types import NoiseGrid


def check_start(z0: Tensor, grid: NoiseGrid) -> None:
    """Refuse an empty grid or a non-float latent before an inversion starts."""
    if grid.num_steps < 1:
        raise ValueError("an inversion needs at least one step")
    if not z0.is_floating_point():
        raise TypeError("the latent to invert must be a floating-point tensor")
