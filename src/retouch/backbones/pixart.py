"""PixArt-α / Σ (PixArtTransformer2DModel + T5): learned-sigma split, resolution conditioning."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from retouch.backbones.base import Backbone, LayerInfo, SizePolicy
from retouch.backbones.processors import StandardProcessor
from retouch.types import Conditioning, Prediction

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.(attn\d)$")


class PixArtBackbone(Backbone):
    family = "pixart"
    latent_shift = False  # the diffusers pipeline ignores the VAE shift_factor
    prediction = Prediction.EPSILON
    default_solver = "dpmpp"
    default_guidance = 4.5
    default_steps = 20

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

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
        mult = self.vae_scale_factor * self.patch_size
        native = int(self.pipe.transformer.config.sample_size) * self.vae_scale_factor
        return SizePolicy(multiple=mult, min_side=mult, max_side=max(4 * native, 4096), native=(native, native))

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
        out: dict[str, LayerInfo] = {}
        keys = sorted(
            (k.removesuffix(".processor") for k in self.pipe.transformer.attn_processors),
            key=lambda n: (int(_match(n).group(1)), _match(n).group(2)),
        )
        for name in keys:
            m = _match(name)
            kind = "self" if m.group(2) == "attn1" else "cross"
            out[name] = LayerInfo(name=name, kind=kind, depth=int(m.group(1)), place="dit", downsample=self.patch_size)
        return out

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """``transformer_blocks.*``; each returns the image tokens ``[B, N_img, D]`` (kind ``"dit"``)."""
        return {
            f"transformer_blocks.{i}": LayerInfo(
                name=f"transformer_blocks.{i}", kind="dit", depth=i, place="dit", downsample=self.patch_size
            )
            for i in range(len(self.pipe.transformer.transformer_blocks))
        }

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return StandardProcessor(layer, attend, merge)


def _match(name: str) -> re.Match[str]:
    m = _NAME.match(name)
    if m is None:
        raise RuntimeError(f"unexpected attention module path in the PixArt transformer: {name}")
    return m
