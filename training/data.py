"""Training and held-out data from ShapesWorld: scenes, renders as tensors, captions.

Training scenes of step ``k`` come from :func:`~training.common.step_rng` ``(seed, k)``, so they are the
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


def _scene(rng: np.random.Generator | int, max_objects: int) -> shapes.Scene:
    """A scene with 1..``max_objects`` objects (the world's own 1..3 draw when ``max_objects`` is the maximum)."""
    if not 1 <= max_objects <= shapes.MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{shapes.MAX_OBJECTS}, got {max_objects}")
    if max_objects == shapes.MAX_OBJECTS:
        return shapes.sample_scene(rng)
    rng = shapes.as_rng(rng)
    return shapes.sample_scene(rng, n_objects=int(rng.integers(1, max_objects + 1)))


def sample_scenes(rng: np.random.Generator, n: int, max_objects: int = shapes.MAX_OBJECTS) -> list[shapes.Scene]:
    """``n`` training scenes drawn from ``rng`` (1..``max_objects`` objects each)."""
    return [_scene(rng, max_objects) for _ in range(n)]


def held_out_scenes(n: int, offset: int = 0, max_objects: int = shapes.MAX_OBJECTS) -> list[shapes.Scene]:
    """The first ``n`` held-out scenes (after ``offset``); scene ``i`` depends only on its seed and
    ``max_objects``."""
    return [_scene(HELD_OUT_SEED + offset + i, max_objects) for i in range(n)]


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
