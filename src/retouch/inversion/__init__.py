"""Inversions: latent -> trajectory of noisy latents, one algorithm per module, one signature for all.

Every inverter is ``invert(model_fn, z0, grid, **options) -> Trajectory`` where ``model_fn`` evaluates the
(guided) denoiser on the *source* conditioning.
"""

from retouch.inversion.base import INVERSIONS, Inversion, get_inversion

__all__ = ["INVERSIONS", "Inversion", "get_inversion"]
