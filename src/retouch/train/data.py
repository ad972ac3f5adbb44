"""Training and held-out data from ShapesWorld: scenes, renders as tensors, captions.

Training scenes of step ``k`` come from :func:`~retouch.train.common.step_rng` ``(seed, k)``, so they are the
same on every resume. Held-out scenes are ``sample_scene(HELD_OUT_SEED + i)``: a fixed, separate seed range
that every stage and the benchmark share (the oracle's own tests use seeds 10000–10399).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from retouch.worlds import captions, shapes

__all__ = [
    "HELD_OUT_SEED",
    "caption_of",
    "held_out_scenes",
    "images_to_tensor",
    "render_batch",
    "sample_scenes",
    "tensor_to_images",
    "vocabulary",
]

HELD_OUT_SEED = 7_000_000
"""Seed of held-out scene 0 (scene ``i`` is ``sample_scene(HELD_OUT_SEED + i)``)."""


def sample_scenes(rng: np.random.Generator, n: int) -> list[shapes.Scene]:
    """``n`` training scenes drawn from ``rng``."""
    return [shapes.sample_scene(rng) for _ in range(n)]


def held_out_scenes(n: int, offset: int = 0) -> list[shapes.Scene]:
    """The first ``n`` held-out scenes (after ``offset``)."""
    return [shapes.sample_scene(HELD_OUT_SEED + offset + i) for i in range(n)]


def caption_of(scene: shapes.Scene, rng: np.random.Generator | None = None) -> str:
    """The scene's caption: varied wording drawn from ``rng``, canonical wording without it."""
    return captions.caption(scene, rng) if rng is not None else captions.caption(scene)


def vocabulary() -> list[str]:
    """Every word a caption can use (from :func:`retouch.worlds.captions.vocabulary`)."""
    return list(captions.vocabulary())


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images → float ``[B, 3, H, W]`` in [-1, 1]."""
    arr = np.stack(images).astype(np.float32)  # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


def tensor_to_images(x: torch.Tensor) -> list[np.ndarray]:
    """float ``[B, 3, H, W]`` in [-1, 1] → uint8 ``[H, W, 3]`` images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(arr.permute(0, 2, 3, 1).cpu().numpy())


def render_batch(scenes: Sequence[shapes.Scene], height: int = 64, width: int = 64) -> torch.Tensor:
    """Render scenes to a float ``[B, 3, H, W]`` tensor in [-1, 1]."""
    return images_to_tensor([shapes.render(s, height, width) for s in scenes])
