"""Small shared value types: predictions, conditioning, noise grids, model outputs.

Nothing here knows a model family; backbones produce these and algorithms consume them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class Prediction(enum.StrEnum):
    """What a denoiser's raw output means.

    With ``x_t = alpha_t * x0 + sigma_t * eps``:

    * ``EPSILON``: the noise ``eps`` (SD 1.x, PixArt after its learned-sigma split);
    * ``V``: ``v = alpha_t * eps - sigma_t * x0`` (SD 2.x 768, Salimans & Ho 2022, eq. in §4);
    * ``FLOW``: the rectified-flow velocity ``u = eps - x0`` with ``alpha_t = 1 - sigma_t``
      (SD3, Flux; Liu et al. 2023, Esser et al. 2024).
    """

    EPSILON = "epsilon"
    V = "v_prediction"
    FLOW = "flow"


@dataclass(frozen=True)
class Pred:
    """A model prediction converted to both the clean-data and the noise estimate."""

    x0: Tensor
    eps: Tensor

    @property
    def velocity(self) -> Tensor:
        """Rectified-flow velocity ``eps - x0`` (valid on a flow grid)."""
        return self.eps - self.x0


def to_x0_eps(raw: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, kind: Prediction) -> Pred:
    """Convert a raw model output at ``(x, alpha, sigma)`` into ``Pred(x0, eps)``."""
    if kind is Prediction.EPSILON:
        return Pred(x0=(x - sigma * raw) / alpha, eps=raw)
    if kind is Prediction.V:
        return Pred(x0=alpha * x - sigma * raw, eps=sigma * x + alpha * raw)
    if kind is Prediction.FLOW:
        # x = (1 - s) x0 + s eps and u = eps - x0  =>  x0 = x - s u, eps = x + (1 - s) u
        return Pred(x0=x - sigma * raw, eps=x + (1 - sigma) * raw)
    raise ValueError(f"unknown prediction type {kind!r}")


@dataclass(frozen=True)
class NoiseGrid:
    """An explicit sampling grid, noisiest point first.

    Point ``k`` (0..N) has the latent ``x_k = alphas[k] * x0 + sigmas[k] * eps``; the model is told
    ``timesteps[k]`` (in the scheduler's own convention, e.g. 0..999 for SD, 1000*sigma for flows).
    Sampling steps go ``k -> k+1``; inversion goes ``k+1 -> k``. ``timesteps[N]`` may be a value the model
    was never trained on (DDIM's final point is "t = -stride"); it is only used where a method asks for it.
    """

    timesteps: Tensor  # [N+1]
    alphas: Tensor  # [N+1]
    sigmas: Tensor  # [N+1]
    kind: str  # "vp" | "flow"
    lower_order_final: bool = True  # multistep solvers take a first-order last step (diffusers' rule)
    # walked backwards (:func:`retouch.schedules.flip`): point k is point N - k of the sampling grid
    flipped: bool = False

    def __post_init__(self) -> None:
        n = self.timesteps.shape[0]
        if n < 2 or self.alphas.shape[0] != n or self.sigmas.shape[0] != n:
            raise ValueError("a NoiseGrid needs matching timesteps/alphas/sigmas with at least 2 points")
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"grid kind must be 'vp' or 'flow', got {self.kind!r}")

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0] - 1

    @property
    def lambdas(self) -> Tensor:
        """Half log-SNR ``log(alpha / sigma)`` (DPM-Solver's lambda); +inf where sigma = 0."""
        return torch.log(self.alphas) - torch.log(self.sigmas)

    def step_of(self, k: int) -> int:
        """The sampling grid's index of point ``k`` (``N - k`` on a flipped grid)."""
        return self.num_steps - k if self.flipped else k

    def at(self, k: int) -> Point:
        """Grid point ``k`` as the :class:`Point` a model function is evaluated at."""
        return Point(self.timesteps[k], self.alphas[k], self.sigmas[k], self.step_of(k))

    def between(self, i: int, sigma: Tensor) -> Point:
        """The off-grid point of noise level ``sigma`` inside interval ``i`` (points ``i`` and ``i + 1``), on a
        flow grid (``alpha = 1 - sigma``; the model is told ``1000 * sigma``): the midpoint solvers' second
        evaluation. Its ``step`` is the sampling grid's interval, whichever way this grid is walked."""
        if self.kind != "flow":
            raise ValueError("off-grid evaluation needs a flow grid (alpha = 1 - sigma)")
        sigma = torch.as_tensor(sigma, dtype=self.sigmas.dtype)
        step = self.num_steps - i - 1 if self.flipped else i
        return Point(sigma * 1000, 1 - sigma, sigma, step, mid=True)


@dataclass(frozen=True)
class Point:
    """Where a model function is evaluated: ``model_fn(x, point) -> Pred``.

    ``timestep`` is what the network is told (the scheduler's convention); ``alpha`` and ``sigma`` the noise
    level that turns its raw output into :class:`Pred`. ``step`` is the point's index on the *sampling* grid
    (for an off-grid point, the interval it lies in): what editors' step schedules count, whichever grid the
    solver walks (a flipped one while inverting). ``mid``: an off-grid evaluation (midpoint solvers).
    """

    timestep: Tensor
    alpha: Tensor
    sigma: Tensor
    step: int
    mid: bool = False


@dataclass(frozen=True)
class Conditioning:
    """Everything a denoiser needs besides ``(x, t)``, batched along dim 0.

    ``tensors`` are batch-first and follow the latent batch; ``static`` values (e.g. Flux's ``txt_ids``)
    are shared by the whole batch. What the keys mean is the backbone's business.
    """

    tensors: Mapping[str, Tensor]
    static: Mapping[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def select(self, index: Sequence[int] | slice) -> Conditioning:
        idx = list(index) if not isinstance(index, slice) else index
        return Conditioning({k: v[idx] for k, v in self.tensors.items()}, self.static)

    def repeat(self, n: int) -> Conditioning:
        """Repeat the batch ``n`` times (``[a, b] -> [a, b, a, b]`` for n=2)."""
        return Conditioning({k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.tensors.items()}, self.static)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return Conditioning(out, self.static)

    def replace(self, **tensors: Tensor) -> Conditioning:
        return Conditioning({**self.tensors, **tensors}, self.static)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch; all items must have the same keys and static values."""
        if not items:
            raise ValueError("nothing to concatenate")
        keys = set(items[0].tensors)
        for c in items[1:]:
            if set(c.tensors) != keys:
                raise ValueError(f"conditionings disagree on keys: {sorted(keys)} vs {sorted(c.tensors)}")
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in items[0].tensors}, items[0].static)


@dataclass(frozen=True)
class Trajectory:
    """Latents of an inversion, indexed like the grid: ``latents[0]`` is the noisiest (x_T),
    ``latents[N]`` the clean latent that was inverted."""

    latents: tuple[Tensor, ...]
    grid: NoiseGrid
    extras: Mapping[str, Any] = field(default_factory=dict)
    nfe: int = 0

    def __post_init__(self) -> None:
        if len(self.latents) != self.grid.num_steps + 1:
            raise ValueError(f"trajectory has {len(self.latents)} latents for a {self.grid.num_steps}-step grid")

    @property
    def noise(self) -> Tensor:
        return self.latents[0]
