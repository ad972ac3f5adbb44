"""Flux (FluxTransformer2DModel): packed 2x2 latents, image ids, guidance embedding, no CFG batch.

The 2x2 packing (:func:`pack` / :func:`unpack`) is shared with Qwen-Image and written in ``common.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo, SizePolicy
from retouch.backbones.common import (
    TransformerBackbone,
    flow_timestep,
    grid_position_ids,
    guidance_tensor,
    pack,
    square_size_policy,
    stream_attention_layers,
    stream_feature_blocks,
    unpack,
)
from retouch.backbones.processors import FluxProcessor, routing_kwargs
from retouch.types import Conditioning, Prediction


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids ``(0, row, col)`` of the packed ``(h/2) x (w/2)`` token grid, ``[N, 3]``."""
    return grid_position_ids(h // 2, w // 2, 3, torch.float32).to(device=device, dtype=dtype)


class FluxBackbone(TransformerBackbone):
    family = "flux"
    prediction = Prediction.FLOW
    uses_cfg = False
    default_solver = "flow_euler"
    default_guidance = 3.5
    default_steps = 28

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer_2  # T5: its tokens are the text part of the joint sequence

    @property
    def max_sequence_length(self) -> int:
        return min(512, int(self.pipe.tokenizer_2.model_max_length))

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length

    @property
    def size_policy(self) -> SizePolicy:
        mult = self.vae_scale_factor * 2
        # the transformer's config has no sample size; the VAE's config holds the training resolution (1024 for
        # FLUX.1, 64 for the embedded shapes-flux); the pipeline's hard-coded 128 latents otherwise
        native = getattr(self.vae.config, "sample_size", None)
        if not isinstance(native, int) or native <= 0:
            native = int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor
        return square_size_policy(mult, native, 4096)

    def encode_prompt(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> Conditioning:
        emb, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        tensors = {"encoder_hidden_states": emb, "pooled_projections": pooled}
        if self.pipe.transformer.config.guidance_embeds:
            tensors["guidance"] = guidance_tensor(guidance, self.default_guidance, emb.shape[0], emb.device)
        return Conditioning(tensors, static={"txt_ids": text_ids})

    def randn_latent(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Noise drawn in the packed token layout ``[B, (h/2)(w/2), 4C]``, then unpacked: the order in which the
        Flux editing references (FlowEdit, the diffusers RF-Inversion pipeline) draw ``randn_like`` of packed
        latents, so the same seed gives the same noise."""
        b, c, h, w = shape
        tokens = torch.randn((b, (h // 2) * (w // 2), 4 * c), generator=generator, dtype=torch.float32)
        return unpack(tokens, h, w)

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // 2) * (latent_hw[1] // 2)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        b, _, h, w = x.shape
        emb = cond.tensors["encoder_hidden_states"]
        t = flow_timestep(timestep, b, x.device, self.dtype)
        out = self.pipe.transformer(
            hidden_states=pack(x.to(self.dtype)),
            timestep=t,
            guidance=cond.tensors.get("guidance"),
            pooled_projections=cond.tensors["pooled_projections"],
            encoder_hidden_states=emb,
            txt_ids=cond.static["txt_ids"],
            img_ids=image_ids(h, w, x.device, self.dtype),
            joint_attention_kwargs=routing_kwargs(self.pipe.transformer, FluxProcessor, emb.shape[1]),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def attention_layers(self) -> dict[str, LayerInfo]:
        return stream_attention_layers(self.pipe.transformer.attn_processors, "Flux transformer", downsample=2)

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """Double-stream ``transformer_blocks.*`` (kind ``"joint"``) then single-stream
        ``single_transformer_blocks.*`` (kind ``"single"``); both return ``(encoder_hidden_states,
        hidden_states)`` in diffusers >= 0.35: the packed image stream ``[B, N_img, D]`` is element 1."""
        return stream_feature_blocks(self.pipe.transformer, single_kind="single", downsample=2, text_first=False)

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return FluxProcessor(layer, attend, merge)
