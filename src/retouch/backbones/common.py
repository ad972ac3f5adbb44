"""Pieces several adapters share: the transformer adapters' components, layer tables read from module paths,
Flux-style timesteps, guidance and position ids, and text padding. Each is the same code in every adapter that
uses it; what differs between families is a parameter."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from retouch.backbones.base import Backbone, LayerInfo, SizePolicy

# Flux-style transformers (Flux.1, Flux.2): double-stream blocks, then single-stream blocks
STREAM_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn$")


class TransformerBackbone(Backbone):
    """An adapter whose denoiser is the pipeline's ``transformer`` and whose prompts go through its ``tokenizer``
    (adapters whose attention text comes from another tokenizer override :attr:`tokenizer`)."""

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer


def square_size_policy(multiple: int, native: int, max_side: int) -> SizePolicy:
    """Sides multiples of ``multiple`` from one multiple to ``max_side``; a square native size."""
    return SizePolicy(multiple=multiple, min_side=multiple, max_side=max_side, native=(native, native))


def sample_size_policy(backbone: Any, max_side: int | None = None) -> SizePolicy:
    """The size policy of a DiT that patchifies VAE latents itself (PixArt, SD3, Sana): sides multiples of the VAE
    factor times ``backbone.patch_size``, native side the transformer's ``sample_size`` latents, at most
    ``max_side`` (default: four times native, at least 4096)."""
    vae = backbone.vae_scale_factor
    native = int(backbone.pipe.transformer.config.sample_size) * vae
    return square_size_policy(
        vae * backbone.patch_size, native, max(4 * native, 4096) if max_side is None else max_side
    )


def parse_layer_names(keys: Iterable[str], pattern: re.Pattern[str], model: str) -> list[tuple[re.Match[str], str]]:
    """``(match, module path)`` for each ``"<module path>.processor"`` key; a path that ``pattern`` does not match
    is an error naming ``model`` (e.g. ``"Flux transformer"``)."""
    out = []
    for key in keys:
        name = key.removesuffix(".processor")
        m = pattern.match(name)
        if m is None:
            raise RuntimeError(f"unexpected attention module path in the {model}: {name}")
        out.append((m, name))
    return out


def numbered_blocks(
    prefix: str,
    count: int,
    *,
    kind: str,
    place: str,
    downsample: int,
    first_depth: int = 0,
    text_first: bool = False,
) -> dict[str, LayerInfo]:
    """``{prefix}.0 .. {prefix}.{count-1}`` as feature blocks of one kind, at depths from ``first_depth`` on."""
    out: dict[str, LayerInfo] = {}
    for i in range(count):
        name = f"{prefix}.{i}"
        out[name] = LayerInfo(name, kind, first_depth + i, place, downsample, text_first=text_first)
    return out


def stream_attention_layers(keys: Iterable[str], model: str, downsample: int) -> dict[str, LayerInfo]:
    """The attention layers of a Flux-style transformer in execution order: double-stream
    ``transformer_blocks.*.attn`` (kind ``"joint"``, place ``"double"``) then single-stream
    ``single_transformer_blocks.*.attn`` (kind and place ``"single"``); text tokens first in both."""
    entries = sorted(
        (0 if m.group(1) == "transformer_blocks" else 1, int(m.group(2)), name)
        for m, name in parse_layer_names(keys, STREAM_NAME, model)
    )
    out: dict[str, LayerInfo] = {}
    for depth, (stream, _, name) in enumerate(entries):
        kind, place = ("joint", "double") if stream == 0 else ("single", "single")
        out[name] = LayerInfo(name=name, kind=kind, depth=depth, place=place, downsample=downsample, text_first=True)
    return out


def stream_feature_blocks(
    transformer: Any, *, single_kind: str, downsample: int, text_first: bool
) -> dict[str, LayerInfo]:
    """A Flux-style transformer's double-stream ``transformer_blocks.*`` (kind ``"joint"``) then single-stream
    ``single_transformer_blocks.*`` (kind ``single_kind``), depths counted across both."""
    n_double = len(transformer.transformer_blocks)
    common = {"downsample": downsample, "text_first": text_first}
    return {
        **numbered_blocks("transformer_blocks", n_double, kind="joint", place="double", **common),
        **numbered_blocks("single_transformer_blocks", len(transformer.single_transformer_blocks),
                          kind=single_kind, place="single", first_depth=n_double, **common),
    }  # fmt: skip


def pack(latents: Tensor) -> Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]`` (the 2x2 patch packing of Flux and Qwen-Image)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack` for a latent of spatial size ``(h, w)``."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def flow_timestep(timestep: Tensor, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A grid timestep ``1000 σ`` as the ``σ`` Flux-style transformers take, one per row: ``[batch]``."""
    return (timestep.to(device, torch.float32) / 1000).reshape(1).expand(batch).to(dtype)


def guidance_tensor(guidance: float | None, default: float, rows: int, device: torch.device) -> Tensor:
    """The distilled-guidance input of a guidance-embedding transformer: ``guidance`` (else ``default``) per row,
    float32 ``[rows]``."""
    g = default if guidance is None else guidance
    return torch.full((rows,), float(g), device=device, dtype=torch.float32)


def grid_position_ids(rows: int, cols: int, axes: int, dtype: torch.dtype) -> Tensor:
    """Position ids of a ``rows x cols`` token grid in row-major order, ``[rows * cols, axes]``: axis 1 is the row,
    axis 2 the column, every other axis 0."""
    ids = torch.zeros(rows, cols, axes, dtype=dtype)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(-1, axes)


def pad_tokens(x: Tensor, length: int) -> Tensor:
    """``x`` (``[B, T, ...]``) zero-padded on the right along the token axis to ``[B, length, ...]``."""
    if x.shape[1] > length:
        raise ValueError(f"{x.shape[1]} tokens do not fit in a sequence of {length}")
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)
