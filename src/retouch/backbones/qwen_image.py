"""Qwen-Image (QwenImageTransformer2DModel + Qwen2.5-VL): a 60-block MMDiT with joint [text; image] attention.

What the adapter has to know (diffusers 0.42.1 ``QwenImagePipeline``):

* **Text**: the prompt is wrapped in a chat template, run through Qwen2.5-VL's language model, and the first
  34 hidden states (the template's system prefix) are dropped; the 5 tokens of the template's suffix
  (``<|im_end|>\\n<|im_start|>assistant\\n``) stay after the prompt. The pipeline pads a batch only to its
  longest prompt; here every prompt is padded with zeros to ``max_sequence_length`` (256) tokens with an
  attention mask, so that source, target and empty prompts batch together. Padded keys are masked out, so
  this changes no valid token's output (the parity test checks it against the unpadded pipeline).
* **Guidance**: true classifier-free guidance with Qwen-Image's norm rescale: ``comb = u + w (c - u)``, then
  each packed token of ``comb`` is rescaled to the norm of the conditional prediction's token
  (:meth:`QwenImageBackbone.combine_guidance`). The transformer's ``guidance_embeds`` flag exists in the
  config but no released model sets it (its time embedder takes no guidance); such a model is refused.
* **Latents**: the Qwen-Image VAE is a causal 3D (video) VAE run on one frame: ``[B, 3, 1, H, W]``; its
  latents are normalised per channel, ``(z - latents_mean) / latents_std`` (no scaling / shift factor).
  The transformer takes 2x2-packed tokens (as Flux) and ``img_shapes`` for its RoPE.
* **Positions**: 3-axis RoPE, image positions centred on 0 (``scale_rope``), text positions after the image's
  largest index; both applied inside the attention processor.
* **Grid**: FlowMatchEuler with dynamic *exponential* shifting (``mu`` linear in the image tokens, as Flux,
  with Qwen's ``max_shift`` 0.9 over 256–8192 tokens) and ``shift_terminal`` 0.02; timestep ``σ``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo, SizePolicy, TextSegment
from retouch.backbones.common import (
    TransformerBackbone,
    flow_timestep,
    numbered_blocks,
    pack,
    pad_tokens,
    parse_layer_names,
    square_size_policy,
    unpack,
)
from retouch.backbones.processors import RoutingProcessor, norm_qk, project_out
from retouch.types import Conditioning, Prediction

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.attn$")


class QwenImageProcessor(RoutingProcessor):
    """For Qwen-Image's joint attention; mirrors diffusers 0.42.1 ``QwenDoubleStreamAttnProcessor2_0``.
    Sequence = [text; image]; the text padding mask becomes a key mask over the joint sequence. Token merging
    acts on the image stream, and the image RoPE follows the kept tokens."""

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_hidden_states_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image joint attention needs the text stream (encoder_hidden_states)")
        hidden_states, plan = self.merge(hidden_states, self.layer)  # image tokens [B, N', C]
        if plan is not None and image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            image_rotary_emb = (img_freqs[plan.kept_index[0].to(img_freqs.device)], txt_freqs)
        n_txt = encoder_hidden_states.shape[1]
        mask = None
        if encoder_hidden_states_mask is not None:
            img_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask.bool(), img_mask], dim=1)[:, None, None, :]

        head_dim = attn.inner_dim // attn.heads
        q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))  # [B, N, h, d]
        k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        tq = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))  # [B, T, h, d]
        tk = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        tv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        q, k = norm_qk(q, k, attn.norm_q, attn.norm_k)
        tq, tk = norm_qk(tq, tk, attn.norm_added_q, attn.norm_added_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            q = apply_rotary_emb_qwen(q, img_freqs, use_real=False)
            k = apply_rotary_emb_qwen(k, img_freqs, use_real=False)
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((tq, q), (tk, k), (tv, v)))  # [B, T + N, h, d]

        out = self.attend_tokens(query, key, value, attn_mask=mask, num_text=n_txt).flatten(2, 3).to(query.dtype)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img_out = project_out(attn, img_out.contiguous())
        if plan is not None:
            img_out = plan.unmerge(img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out


class QwenImageBackbone(TransformerBackbone):
    family = "qwenimage"
    prediction = Prediction.FLOW
    default_solver = "flow_euler"
    default_guidance = 4.0  # the pipeline's true_cfg_scale
    default_steps = 50
    max_sequence_length = 256

    def __init__(self, pipe: Any, *, name: str | None = None) -> None:
        super().__init__(pipe, name=name)
        if pipe.transformer.config.guidance_embeds:
            raise ValueError(
                "this Qwen-Image transformer sets guidance_embeds, which diffusers' Qwen-Image time embedding "
                "does not implement; retouch supports the released (true-CFG) Qwen-Image models"
            )

    @property
    def _suffix_tokens(self) -> int:
        suffix = self.pipe.prompt_template_encode.split("{}", 1)[1]
        return len(self.tokenizer(suffix)["input_ids"])

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length - self._suffix_tokens

    def text_segments(self) -> list[TextSegment]:
        # the prompt's tokens lead the text sequence, the template's suffix follows them (the tail)
        return [TextSegment(self.tokenizer, 0, self.max_sequence_length)]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def size_policy(self) -> SizePolicy:
        mult = self.vae_scale_factor * 2
        native = int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor
        return square_size_policy(mult, native, 4096)

    # --- latents --------------------------------------------------------------------------------------
    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    def encode_image(self, pixels: Tensor) -> Tensor:
        """``[B,3,H,W]`` -> ``[B,16,h,w]``: the posterior mean of the one-frame video, normalised per channel."""
        vae = self.vae
        lat = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist.mean[:, :, 0]
        mean, std = self._latent_stats(lat)
        return ((lat - mean) / std).to(self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        z = latents.to(vae.dtype)
        mean, std = self._latent_stats(z)
        return vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0]

    # --- conditioning ---------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> Conditioning:
        emb, mask = self.pipe._get_qwen_prompt_embeds(list(prompts), device=self.device, dtype=self.dtype)
        n = emb.shape[1]
        if n > self.max_sequence_length:
            raise ValueError(
                f"prompt is too long: {n} tokens with the template's suffix, Qwen-Image takes "
                f"{self.max_sequence_length} here"
            )
        emb, mask = pad_tokens(emb, self.max_sequence_length), pad_tokens(mask, self.max_sequence_length)
        return Conditioning({"encoder_hidden_states": emb, "encoder_hidden_states_mask": mask})

    def combine_guidance(self, uncond: Tensor, cond: Tensor, guidance: float) -> Tensor:
        """Qwen-Image's true CFG: ``u + w (c - u)``, each packed 2x2 token rescaled to the norm of ``c``'s."""
        comb = uncond + guidance * (cond - uncond)
        b, c, h, w = comb.shape

        def token_norm(x: Tensor) -> Tensor:  # [B, C, h, w] -> per 2x2 token, broadcast back
            n = x.view(b, c, h // 2, 2, w // 2, 2).square().sum(dim=(1, 3, 5), keepdim=True).sqrt()
            return n.expand(b, c, h // 2, 2, w // 2, 2).reshape(b, c, h, w)

        return comb * (token_norm(cond) / token_norm(comb))

    # --- denoising ------------------------------------------------------------------------------------
    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // 2) * (latent_hw[1] // 2)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        b, _, h, w = x.shape
        t = flow_timestep(timestep, b, x.device, self.dtype)
        out = self.pipe.transformer(
            hidden_states=pack(x.to(self.dtype)),
            timestep=t,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_hidden_states_mask=cond.tensors["encoder_hidden_states_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    # --- attention ------------------------------------------------------------------------------------
    def attention_layers(self) -> dict[str, LayerInfo]:
        parsed = parse_layer_names(self.pipe.transformer.attn_processors, _NAME, "Qwen-Image transformer")
        entries = [(int(m.group(1)), name) for m, name in parsed]
        return {
            name: LayerInfo(name=name, kind="joint", depth=depth, place="joint", downsample=2, text_first=True)
            for depth, name in sorted(entries)
        }

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """``transformer_blocks.*`` (kind ``"joint"``); each returns ``(encoder_hidden_states, hidden_states)``:
        the packed image stream ``[B, N_img, D]`` is element 1."""
        n = len(self.pipe.transformer.transformer_blocks)
        return numbered_blocks("transformer_blocks", n, kind="joint", place="joint", downsample=2)

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return QwenImageProcessor(layer, attend, merge)
