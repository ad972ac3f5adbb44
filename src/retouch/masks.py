"""User masks: where an edit may change the image (white) and where it must keep the source (black).

A mask is read from any image file (greyscale luminance in [0, 1]; a soft mask is allowed), brought to the
model's image size with the *same* size policy as the image (``resize`` / ``crop`` / ``strict``, see
:func:`retouch.io.fit_size`) and reduced to the latent grid by the maximum over each cell (a cell the mask
touches may change; soft values inside a soft region are kept). ``auto:WORDS`` derives a mask instead from the
image-query → text-key attention of those words (the maps of Prompt-to-Prompt's local blend,
:class:`LocalBlend`), read in a dedicated pass over the noised source latent before the inversion (a few NFE,
reported as ``nfe.mask``).

The generic path, for every editing method: after every sampling step the target branches are blended with the
*source trajectory* (the inversion's latent at the same grid point) outside the mask,
``x_tgt <- z*_{i+1} + m (x_tgt - z*_{i+1})`` (Blended Latent Diffusion's rule, Avrahami et al. 2023, on the
inverted trajectory instead of a noised copy). The last point of every trajectory is the clean input latent,
so where ``m = 0`` the output latent *is* the input latent; and since a VAE decoder mixes the whole frame,
the decoded pixels outside the cells the mask touches are then set to the input latent's decoded round trip
(:func:`composite`, one more decode), so the background is the VAE's round trip there, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from retouch import io
from retouch.control.contract import Editor

log = logging.getLogger(__name__)

AUTO_PREFIX = "auto:"
AUTO_THRESHOLD = 0.3  # P2P local blend's threshold on the max-normalised word map
AUTO_POINTS = (0.5, 0.7, 0.9)  # grid fractions (0 = noisiest) of the noised source latents the maps are read at


@dataclass(frozen=True)
class MaskSpec:
    """What ``--mask`` / ``mask=`` asked for: an image (array in [0, 1], ``[H, W]``) or attention words."""

    array: np.ndarray | None = None
    words: tuple[str, ...] = ()
    source: str = "array"  # a file path, "array", or "auto:WORDS"
    threshold: float = AUTO_THRESHOLD

    def __post_init__(self) -> None:
        if (self.array is None) == (not self.words):
            raise ValueError("a mask is either an image or auto:WORDS, not both / neither")
        if self.array is not None:
            a = self.array
            if a.ndim != 2 or a.size == 0:
                raise ValueError(f"a mask must be a 2-D [H, W] array, got shape {a.shape}")
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise ValueError("mask values must be finite and in [0, 1] (1 = may change)")
        if not 0 < self.threshold < 1:
            raise ValueError(f"auto-mask threshold must be in (0, 1), got {self.threshold}")

    @property
    def is_auto(self) -> bool:
        return bool(self.words)

    def describe(self) -> str:
        return f"{AUTO_PREFIX}{' '.join(self.words)}" if self.is_auto else self.source


def parse_mask(value: Any) -> MaskSpec | None:
    """``mask=`` of the API: None, a :class:`MaskSpec`, ``"auto:WORDS"``, a file path, a PIL image or an array
    (bool or float in [0, 1], or uint8 0..255)."""
    if value is None or isinstance(value, MaskSpec):
        return value
    if isinstance(value, str) and value.startswith(AUTO_PREFIX):
        words = tuple(value[len(AUTO_PREFIX) :].replace(",", " ").split())
        if not words:
            raise ValueError("--mask auto:WORDS needs at least one word, e.g. auto:circle")
        return MaskSpec(words=words, source=value)
    if isinstance(value, (str, Path)):
        return MaskSpec(array=load_mask(value), source=str(value))
    if isinstance(value, Image.Image):
        return MaskSpec(array=_from_pil(value))
    arr = np.asarray(value)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3].mean(-1)
    return MaskSpec(array=np.asarray(arr, dtype=np.float32))


def _from_pil(img: Image.Image) -> np.ndarray:
    grey = io.to_rgb(img).convert("L")  # alpha composited on white (transparent = may change), 16-bit rescaled
    return np.asarray(grey, dtype=np.float32) / 255.0


def load_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as float ``[H, W]`` in [0, 1] (luminance; white = may change).

    Raises:
        ImageError: the file is missing or not an image (the message names it).
    """
    try:
        img = io.load_image(path)
    except io.ImageError as err:
        raise io.ImageError(f"mask: {err}") from None
    return _from_pil(img)


def fit_mask(mask: np.ndarray, size_hw: tuple[int, int], policy: str) -> np.ndarray:
    """Bring ``mask`` to the model's image size ``size_hw`` with the image's size policy (float in [0, 1])."""
    h, w = size_hw
    if mask.shape == (h, w):
        return mask.astype(np.float32)
    if policy == "strict":
        raise io.ImageError(
            f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is processed at {w}x{h}; "
            "give a mask of that size or use --size-policy resize or crop"
        )
    img = Image.fromarray(mask.astype(np.float32), mode="F")
    if policy == "resize":
        return np.clip(np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), np.float32), 0, 1)
    mh, mw = mask.shape
    scale = max(w / mw, h / mh)
    nw, nh = max(w, round(mw * scale)), max(h, round(mh * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return np.clip(np.asarray(img.crop((left, top, left + w, top + h)), np.float32), 0, 1)


def to_latent(mask: np.ndarray, latent_hw: tuple[int, int], device: Any = None) -> Tensor:
    """Image-size mask -> ``[1, 1, h, w]`` float: each latent cell is as editable as its most editable pixel
    (max over the cell). A latent cell cannot be half-edited sensibly: averaging a hard edge down to 0.5 mixed the
    old and new content at every edge (a colour edit kept a rim of the old colour), so a cell the mask touches is
    editable; inside a soft region the softness is kept."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_max_pool2d(t, latent_hw).clamp(0, 1).to(device)


def blend(x: Tensor, reference: Tensor, mask: Tensor, rows: Sequence[int]) -> Tensor:
    """``x[r] <- reference + mask * (x[r] - reference)`` for the target rows ``rows``; other rows unchanged.

    Where ``mask`` is 0 the result is ``reference`` exactly, where it is 1 it is ``x`` exactly."""
    out = x.clone()
    ref = reference[0] if reference.ndim == x.ndim else reference
    m = mask[0].to(x.dtype)  # [1, h, w] broadcasts over channels
    for r in rows:
        out[r] = torch.where(m == 0, ref, torch.where(m == 1, x[r], ref + m * (x[r] - ref)))
    return out


def composite(decoded: Tensor, round_trip: Tensor, mask: Tensor, first_target: int = 1) -> Tensor:
    """Decoded target rows outside the mask's latent cells become the input latent's decoded round trip.

    The output latent already equals the input latent there, but a VAE decoder mixes the whole frame (its
    mid-block attends globally), so an edit inside the mask still moves every decoded pixel a little (on
    shapes-sd: 32 dB to the round trip instead of its exact value). Outside the cells the mask touches the pixels
    are now the round trip exactly; inside, ``round_trip + m (decoded - round_trip)`` with the cell's value.
    Rows from ``first_target`` on are targets (0 when the method runs no source branch)."""
    m = F.interpolate(mask.float(), size=decoded.shape[-2:], mode="nearest").to(decoded.device)[0]  # [1, H, W]
    out = decoded.clone()
    rt = round_trip[0]
    for r in range(first_target, decoded.shape[0]):
        out[r] = torch.where(m == 0, rt, torch.where(m == 1, decoded[r], rt + m * (decoded[r] - rt)))
    return out


def mask_image(mask: Tensor, size_hw: tuple[int, int]) -> Image.Image:
    """A latent mask ``[1, 1, h, w]`` as an 8-bit greyscale image of the model's size (nearest: one block per
    latent cell, so the file shows exactly what was used)."""
    up = F.interpolate(mask.float().cpu(), size=size_hw, mode="nearest")[0, 0]
    return Image.fromarray((up.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")


def save_mask(mask: Tensor, path: str | Path, size_hw: tuple[int, int]) -> Path:
    """Write the mask that was used (atomically), at the model's image size."""
    return io.save_image(mask_image(mask, size_hw), path)


def coverage(mask: Tensor) -> float:
    return float(mask.float().mean())


# --------------------------------------------------------------------------------------------------------------
# Auto masks from word attention
# --------------------------------------------------------------------------------------------------------------


class WordMapRecorder(Editor):
    """An attention editor that only records: image-query → text-key maps of the given words of the source
    (branch 0) and target (branch 1) prompts into a :class:`~retouch.control.p2p.LocalBlend`, in the ``"mask"``
    phase. It changes nothing."""

    def __init__(self, blend: Any) -> None:
        self.blend = blend
        self.text_len = 0

    def applies(self, ctx: Any) -> bool:
        return ctx.phase == "mask" and ctx.layer.kind != "self" and ctx.layout.branches >= 2

    def needs_probs(self, ctx: Any) -> bool:
        return self.applies(ctx)

    def probs_block(self, ctx: Any, seq_len: int) -> tuple[slice, slice] | None:
        return ctx.image_text_block(seq_len) if ctx.layer.kind in ("joint", "single") else None

    def block_batch_rows(self, ctx: Any) -> list[int]:
        return ctx.layout.cond_rows

    def edit_block(self, block: Tensor, ctx: Any) -> dict[int, Tensor]:
        self.blend.record(block[ctx.layout.row(0, True)], block[ctx.layout.row(1, True)], ctx)
        return {}

    def edit_probs(self, probs: Tensor, ctx: Any) -> Tensor:
        rows, cols = ctx.image_text_block(probs.shape[-1])
        self.edit_block(probs[:, :, rows, cols], ctx)
        return probs


def word_blend(backbone: Any, source: str, target: str, words: Sequence[str], threshold: float) -> Any:
    """A LocalBlend over the positions of ``words`` in the source and in the target prompt (each word must
    occur in at least one of them)."""
    from retouch.control import tokens
    from retouch.control.p2p import LocalBlend

    segments = backbone.text_segments()
    src_pos: list[int] = []
    tgt_pos: list[int] = []
    for word in words:
        found = False
        for prompt, out in ((source, src_pos), (target, tgt_pos)):
            for s in segments:
                try:
                    idx = tokens.word_token_indices(s.tokenizer, prompt, word, max_length=s.length)
                except ValueError:
                    continue
                out.extend(s.offset + i for i in idx)
                found = found or bool(idx)
        if not found:
            raise ValueError(f"auto mask: the word {word!r} is in neither prompt ({source!r} / {target!r})")
    return LocalBlend(sorted(set(src_pos)), sorted(set(tgt_pos)), threshold=threshold, start=0.0)


def word_mask(blend: Any, latent_hw: tuple[int, int], *, range_normalise: bool = True) -> Tensor | None:
    """The 0/1 mask ``[1, h, w]`` of a LocalBlend's recorded word maps: each side's map (source words, target
    words; a side without words is left out) is max-pooled 3x3, brought to the latent (nearest), normalised and
    thresholded at ``blend.threshold``; the union is returned. ``range_normalise`` maps ``[min, max]`` to
    ``[0, 1]`` (P2P divides by the max only, which keeps a whole frame when a word's attention is nearly flat,
    as on small models)."""
    if blend.maps is None:
        return None
    sides = [i for i, pos in enumerate(blend.positions) if pos]
    m = F.max_pool2d(blend.maps[sides, None], 3, stride=1, padding=1)
    m = F.interpolate(m, size=latent_hw, mode="nearest")
    flat = m.flatten(1)
    lo = flat.amin(1) if range_normalise else torch.zeros_like(flat[:, 0])
    m = (m - lo[:, None, None, None]) / (flat.amax(1) - lo).clamp_min(1e-12)[:, None, None, None]
    return (m > blend.threshold).any(0).float()


def auto_mask(
    backbone: Any,
    z0: Tensor,
    cond: Any,
    grid: Any,
    blend: Any,
    generator: torch.Generator,
    *,
    points: Sequence[float] = AUTO_POINTS,
) -> tuple[Tensor, int]:
    """The union mask of the words' attention (``[1, 1, h, w]``, 0/1) and the NFE it cost.

    The source latent is noised to a few grid points (``x = alpha z0 + sigma eps``, ``eps`` from ``generator``)
    and the model is evaluated there on the [source, target] prompts (conditional only), with a recorder
    installed; the maps are summed, max-pooled, normalised and thresholded (:func:`word_mask`)."""
    from retouch.control import attention_editing
    from retouch.control.context import BatchLayout

    recorder = WordMapRecorder(blend)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    n = grid.num_steps
    ks = sorted({min(n - 1, max(0, round(p * n))) for p in points})
    latent_hw = (z0.shape[-2], z0.shape[-1])
    with attention_editing(backbone, recorder) as state:
        state.phase = "mask"
        state.layout = BatchLayout(branches=cond.batch_size, cfg=False)
        state.latent_hw = latent_hw
        for k in ks:
            x = grid.alphas[k] * z0 + grid.sigmas[k] * eps
            backbone.predict(x.repeat(cond.batch_size, 1, 1, 1), grid.timesteps[k], cond)
    mask = word_mask(blend, latent_hw, range_normalise=True)
    if mask is None:
        raise ValueError("auto mask: no text-attention layer was reached (the model has no cross attention?)")
    if float(mask.sum()) == 0:
        log.warning("auto mask: the words' attention selected no latent cell")
    return mask[None].to(z0.device), len(ks)
