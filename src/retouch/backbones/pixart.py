"""PixArt-α / Σ (PixArtTransformer2DModel + T5): learned-sigma split, resolution conditioning."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo, SizePolicy
from retouch.backbones.common import TransformerBackbone, numbered_blocks, parse_layer_names, sample_size_policy
from retouch.backbones.processors import StandardProcessor
from retouch.types import Conditioning, Prediction

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.(attn\d)$")


class PixArtBackbone(TransformerBackbone):
    family = "pixart"
    latent_shift = False  # the diffusers pipeline ignores the VAE shift_factor
    prediction = Prediction.EPSILON
    default_solver = "dpmpp"
    default_guidance = 4.5
    default_steps = 20

    @property
    def max_prompt_tokens(self) -> int:
        return min(int(self.tokenizer.model_max_length), self.max_sequence_length)

    @property
    def max_sequence_length(self) -> int:
        # PixArt-α was trained with 120 T5 tokens, Σ with 300
        return 300 if type(self.pipe).__name__ == "PixArtSigmaPipeline" else 120

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    @property
    def size_policy(self) -> SizePolicy:
        return sample_size_policy(self)

    def encode_prompt(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> Conditioning:
        emb, mask, _, _ = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.device,
            clean_caption=False,
            max_sequence_length=self.max_sequence_length,
        )
        tensors = {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
        if self.pipe.transformer.use_additional_conditions:
            h, w = image_size or self.size_policy.native
            n = emb.shape[0]
            tensors["resolution"] = torch.tensor([[h, w]], dtype=emb.dtype, device=emb.device).repeat(n, 1)
            tensors["aspect_ratio"] = torch.tensor([[h / w]], dtype=emb.dtype, device=emb.device).repeat(n, 1)
        return Conditioning(tensors)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        tr = self.pipe.transformer
        t = timestep.to(x.device).reshape(1).expand(x.shape[0])
        added = {
            "resolution": cond.tensors.get("resolution"),
            "aspect_ratio": cond.tensors.get("aspect_ratio"),
        }
        out = tr(
            x.to(self.dtype),
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_attention_mask=cond.tensors["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if tr.config.out_channels // 2 == x.shape[1]:  # learned sigma: keep the eps half
            out = out.chunk(2, dim=1)[0]
        return out

    def attention_layers(self) -> dict[str, LayerInfo]:
        parsed = parse_layer_names(self.pipe.transformer.attn_processors, _NAME, "PixArt transformer")
        out: dict[str, LayerInfo] = {}
        for depth, which, name in sorted((int(m.group(1)), m.group(2), name) for m, name in parsed):
            kind = "self" if which == "attn1" else "cross"
            out[name] = LayerInfo(name=name, kind=kind, depth=depth, place="dit", downsample=self.patch_size)
        return out

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """``transformer_blocks.*``; each returns the image tokens ``[B, N_img, D]`` (kind ``"dit"``)."""
        n = len(self.pipe.transformer.transformer_blocks)
        return numbered_blocks("transformer_blocks", n, kind="dit", place="dit", downsample=self.patch_size)

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return StandardProcessor(layer, attend, merge)
