"""Stable Diffusion 3 (SD3Transformer2DModel): joint attention over [image; text], three text encoders."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from retouch.backbones.base import LayerInfo, SizePolicy, TextSegment
from retouch.backbones.common import TransformerBackbone, numbered_blocks, parse_layer_names, sample_size_policy
from retouch.backbones.processors import JointProcessor
from retouch.types import Conditioning, Prediction

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.(attn2?)$")


class SD3Backbone(TransformerBackbone):
    """SD3 and SD3.5. What SD3.5 changes, read from the transformer's config (never from the model's name):

    * ``qk_norm="rms_norm"`` (3.5 large and medium): RMS norm of the image and text queries/keys; the joint
      processor applies ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k`` as diffusers does.
    * ``dual_attention_layers`` (3.5 medium, MMDiT-X): those blocks run a second, image-only self-attention
      ``attn2`` on the same normalised image tokens; it is listed as kind ``"self"`` (no text in its
      sequence), so self-attention editors and token merging reach it and text editors skip it.
    * skip-layer guidance (the pipeline's ``skip_guidance_layers``, recommended for 3.5 medium) is an extra
      guidance pass with some blocks skipped; retouch does not run it (its CFG is plain), and the stock
      pipeline's default is off, so plain sampling still matches the pipeline.
    * defaults: the model cards' steps and CFG (3: 28 steps, 7.0; 3.5 large: 28, 3.5; 3.5 medium: 40, 4.5).
      The distilled 3.5 large *turbo* has the same transformer and scheduler configs as 3.5 large, so it
      cannot be told apart from its config: pass ``--steps 4 --guidance 1`` for it.
    """

    family = "sd3"
    prediction = Prediction.FLOW
    default_solver = "flow_euler"
    max_sequence_length = 256

    @property
    def variant(self) -> str:
        """``"sd3"``, ``"sd3.5-large"`` (QK norm) or ``"sd3.5-medium"`` (QK norm + dual attention), from the config."""
        cfg = self.pipe.transformer.config
        if getattr(cfg, "dual_attention_layers", None):
            return "sd3.5-medium"
        return "sd3.5-large" if getattr(cfg, "qk_norm", None) else "sd3"

    @property
    def default_guidance(self) -> float:  # type: ignore[override]
        return {"sd3": 7.0, "sd3.5-large": 3.5, "sd3.5-medium": 4.5}[self.variant]

    @property
    def default_steps(self) -> int:  # type: ignore[override]
        return {"sd3": 28, "sd3.5-large": 28, "sd3.5-medium": 40}[self.variant]

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    @property
    def size_policy(self) -> SizePolicy:
        cfg = self.pipe.transformer.config  # positions beyond pos_embed_max_size latents do not exist
        return sample_size_policy(self, int(cfg.pos_embed_max_size or cfg.sample_size) * self.vae_scale_factor)

    def t5_length(self) -> int:
        t5 = getattr(self.pipe, "tokenizer_3", None)
        return min(self.max_sequence_length, int(t5.model_max_length)) if t5 is not None else 0

    def text_segments(self) -> list[TextSegment]:
        # the 77 CLIP-L tokens (``tokenizer``) lead SD3's text sequence, T5's follow
        segs = [TextSegment(self.pipe.tokenizer, 0, 77)]
        if getattr(self.pipe, "text_encoder_3", None) is not None:
            segs.append(TextSegment(self.pipe.tokenizer_3, 77, self.t5_length()))
        return segs

    def encode_prompt(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> Conditioning:
        prompts = list(prompts)
        max_len = self.t5_length() or 77
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_len,
        )
        return Conditioning({"encoder_hidden_states": emb, "pooled_projections": pooled})

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        t = timestep.to(x.device).reshape(1).expand(x.shape[0])
        return self.pipe.transformer(
            hidden_states=x.to(self.dtype),
            timestep=t,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            pooled_projections=cond.tensors["pooled_projections"],
            return_dict=False,
        )[0]

    def attention_layers(self) -> dict[str, LayerInfo]:
        parsed = parse_layer_names(self.pipe.transformer.attn_processors, _NAME, "SD3 transformer")
        out: dict[str, LayerInfo] = {}
        for depth, which, name in sorted((int(m.group(1)), m.group(2), name) for m, name in parsed):
            # attn2 (SD3.5 "dual attention" blocks) is image-only self-attention
            kind = "joint" if which == "attn" else "self"
            out[name] = LayerInfo(name=name, kind=kind, depth=depth, place="joint", downsample=self.patch_size)
        return out

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """``transformer_blocks.*`` (kind ``"joint"``); each returns ``(encoder_hidden_states, hidden_states)``:
        the image stream ``[B, N_img, D]`` is element 1 (element 0 is ``None`` after the last block)."""
        n = len(self.pipe.transformer.transformer_blocks)
        return numbered_blocks("transformer_blocks", n, kind="joint", place="joint", downsample=self.patch_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": self.variant}

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return JointProcessor(layer, attend, merge)
