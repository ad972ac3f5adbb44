"""Flux.2 (Flux2Transformer2DModel) behind ``Flux2Pipeline`` (dev) and ``Flux2KleinPipeline`` (klein).

What differs from Flux.1 (``backbones/flux.py``), read from diffusers 0.42.1:

* **Latents.** ``AutoencoderKLFlux2`` latents are 2x2-patchified *in the VAE's space* and normalised by the
  VAE's batch-norm running statistics; the transformer sees those tokens one per position (``patch_size=1``).
  retouch's latent is therefore ``[B, 4C, H/16, W/16]`` (``vae_scale_factor`` 16), and packing is a plain
  reshape.
* **Positional ids.** Four axes ``(t, h, w, l)``: image tokens ``(0, row, col, 0)``, text tokens ``(0, 0, 0, i)``.
* **Conditioning.** A decoder LM behind a chat template (Mistral Small 3 with a system message for dev, Qwen3
  for klein); three hidden states are stacked into ``joint_attention_dim``. Text is padded to
  ``max_sequence_length`` (512), so the text part of every sequence has the same length.
* **Guidance.** dev: distilled guidance embedding (``transformer.config.guidance_embeds``), no CFG batch.
  klein: no guidance embedding; true CFG against the empty prompt unless the pipeline config says
  ``is_distilled`` (the 4-step klein), which runs without guidance.
* **Grid.** ``sigmas = linspace(1, 1/N, N)`` and the *empirical* ``mu`` of :func:`empirical_mu`, which depends on
  the number of steps as well as on the image sequence length.
* **Attention.** Double-stream ``transformer_blocks.*.attn`` (``Flux2Attention``: joint, [text; image]) and
  single-stream ``single_transformer_blocks.*.attn`` (``Flux2ParallelSelfAttention``: QKV fused with the MLP
  input, attention output fused with the MLP output).
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
    square_size_policy,
    stream_attention_layers,
    stream_feature_blocks,
)
from retouch.backbones.flowgrid import ChatTemplateText, explicit_sigma_flow_grid
from retouch.backbones.processors import (
    Attend,
    Merge,
    RoutingProcessor,
    routing_kwargs,
    text_first_heads,
    unmerge_after_text,
)
from retouch.types import Conditioning, NoiseGrid, Prediction


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Flux.2's time shift ``mu`` (``compute_empirical_mu`` of diffusers' Flux.2 pipelines, 0.42.1): linear
    in the sequence length, interpolated between its 10-step and 200-step fits, and step-independent above
    4300 tokens."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m200 = a2 * image_seq_len + b2
    m10 = a1 * image_seq_len + b1
    a = (m200 - m10) / 190.0
    return float(a * num_steps + (m200 - 200.0 * a))


def patchify(latents: Tensor) -> Tensor:
    """VAE latent ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (channel-major 2x2 patches, as the pipeline)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: Tensor) -> Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def image_ids(h: int, w: int, device: torch.device) -> Tensor:
    """``(t, h, w, l) = (0, row, col, 0)`` for an ``h x w`` token grid, ``[h*w, 4]``."""
    return grid_position_ids(h, w, 4, torch.long).to(device)


class Flux2Processor(RoutingProcessor):
    """For Flux.2 double-stream (``Flux2Attention``) and single-stream (``Flux2ParallelSelfAttention``)
    attention; mirrors diffusers 0.42.1's ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor`` and
    routes the attention product through ``attend``. Sequence = [text; image].

    Token merging acts on the image tokens before the projections (in single blocks that also merges the
    tokens the fused MLP sees) and unmerges the block output; rotary embeddings follow the kept tokens. The
    text length of single blocks arrives as the ``num_text`` argument (the transformer's
    ``joint_attention_kwargs``, :func:`~retouch.backbones.processors.routing_kwargs`); without it (a forward
    from the stock pipeline) it counts as 0.
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Any = None,
        num_text: int | None = None,
    ) -> Any:
        double = hasattr(attn, "to_q")
        if not double:  # Flux2ParallelSelfAttention(attn, hidden_states, attention_mask, image_rotary_emb)
            encoder_hidden_states, attention_mask, image_rotary_emb = None, encoder_hidden_states, attention_mask
        # num_text None: a forward from outside the backbone's predict (the stock pipeline); the text length is
        # then unknown and the whole sequence counts as image tokens (editors that slice text see none)
        n_txt = encoder_hidden_states.shape[1] if double else int(num_text or 0)
        n_txt_in_hidden = 0 if double else n_txt
        hidden_states, plan, image_rotary_emb = self.merge_after_text(
            hidden_states, n_txt_in_hidden, image_rotary_emb, n_txt
        )

        if double:
            from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

            query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        else:
            proj = attn.to_qkv_mlp_proj(hidden_states)
            qkv_dim = 3 * attn.inner_dim
            mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
            local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
            qkv, mlp_hidden = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
            query, key, value = qkv.chunk(3, dim=-1)
        text = (eq, ek, ev) if double and attn.added_kv_proj_dim is not None else None
        query, key, value = text_first_heads(attn, (query, key, value), text, image_rotary_emb)  # [B, N, h, d]

        out = self.attend_tokens(query, key, value, attn_mask=attention_mask, num_text=n_txt)  # [B, N, h, d]
        hidden = out.flatten(2, 3).to(query.dtype)

        if double:
            txt, img = hidden.split_with_sizes([n_txt, hidden.shape[1] - n_txt], dim=1)
            txt = attn.to_add_out(txt)
            img = attn.to_out[1](attn.to_out[0](img))
            if plan is not None:
                img = plan.unmerge(img)
            return img, txt
        hidden = attn.to_out(torch.cat([hidden, attn.mlp_act_fn(mlp_hidden)], dim=-1))
        return unmerge_after_text(hidden, plan, n_txt)


class Flux2Backbone(ChatTemplateText, TransformerBackbone):
    family = "flux2"
    chat_model = "Flux.2"
    prediction = Prediction.FLOW
    default_solver = "flow_euler"
    text_encoder_out_layers: tuple[int, ...] | None = None  # None: the pipeline's default

    def __init__(self, pipe: Any, *, name: str | None = None) -> None:
        super().__init__(pipe, name=name)
        self.max_sequence_length = int(getattr(pipe, "tokenizer_max_length", 512))
        config = getattr(pipe, "config", None)
        self.klein = type(pipe).__name__.startswith("Flux2Klein") or hasattr(config, "is_distilled")
        self.guidance_embedded = bool(pipe.transformer.config.guidance_embeds)
        self.step_distilled = bool(getattr(config, "is_distilled", False)) if config is not None else False
        self.uses_cfg = self.klein and not self.step_distilled and not self.guidance_embedded
        # the pipelines' defaults: 50 steps, guidance 4 (embedded for dev, CFG for klein base); 4 steps and no
        # guidance for the step-distilled klein
        self.default_steps = 4 if self.step_distilled else 50
        self.default_guidance = 1.0 if self.step_distilled else 4.0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * 2

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels) * 4

    @property
    def size_policy(self) -> SizePolicy:
        mult = self.vae_scale_factor
        native = int(getattr(self.pipe, "default_sample_size", 128)) * (mult // 2)
        return square_size_policy(mult, native, 4096)

    @property
    def tokenizer(self) -> Any:
        tok = self.pipe.tokenizer
        return getattr(tok, "tokenizer", tok)  # Flux.2 dev: a Pixtral processor around the tokenizer

    def _template_ids(self, prompt: str) -> list[int]:
        tok = self.pipe.tokenizer
        if self.klein:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                enable_thinking=False,
            )  # fmt: skip
            return list(self.tokenizer(text)["input_ids"])
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input([prompt], system_message=self.pipe.system_message)
        out = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
        ids = out["input_ids"]
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def encode_prompt(
        self, prompts: Sequence[str], *, image_size: tuple[int, int] | None = None, guidance: float | None = None
    ) -> Conditioning:
        kwargs: dict[str, Any] = {}
        if self.text_encoder_out_layers is not None:
            kwargs["text_encoder_out_layers"] = self.text_encoder_out_layers
        emb, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length, **kwargs
        )
        tensors = {"encoder_hidden_states": emb.to(self.dtype)}
        if self.guidance_embedded:
            tensors["guidance"] = guidance_tensor(guidance, self.default_guidance, emb.shape[0], emb.device)
        return Conditioning(tensors, static={"txt_ids": text_ids[0]})

    def encode_image(self, pixels: Tensor) -> Tensor:
        vae = self.vae
        lat = patchify(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode())
        mean, std = self._latent_stats(lat)
        return ((lat - mean) / std).to(self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        lat = latents.to(vae.dtype)
        mean, std = self._latent_stats(lat)
        return vae.decode(unpatchify(lat * std + mean)).sample

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE batch norm's running mean and standard deviation ``[1, 4C, 1, 1]``, as ``like``."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like)
        return mean, std

    def grid(self, kind: str, num_steps: int, latent_hw: tuple[int, int]) -> NoiseGrid:
        from retouch import schedules

        schedules.check_steps(num_steps)
        mu = empirical_mu(self.image_seq_len(latent_hw), num_steps)
        return explicit_sigma_flow_grid(self.scheduler_config, num_steps, mu)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        b, c, h, w = x.shape
        emb = cond.tensors["encoder_hidden_states"]
        t = flow_timestep(timestep, b, x.device, self.dtype)
        tokens = x.to(self.dtype).reshape(b, c, h * w).permute(0, 2, 1)  # [B, hw, 4C_vae]
        out = self.pipe.transformer(
            hidden_states=tokens,
            timestep=t,
            guidance=cond.tensors.get("guidance"),
            encoder_hidden_states=emb,
            txt_ids=cond.static["txt_ids"],
            img_ids=image_ids(h, w, x.device),
            joint_attention_kwargs=routing_kwargs(self.pipe.transformer, Flux2Processor, emb.shape[1]),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    def attention_layers(self) -> dict[str, LayerInfo]:
        return stream_attention_layers(self.pipe.transformer.attn_processors, "Flux.2 transformer", downsample=1)

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """Double-stream ``transformer_blocks.*`` return ``(encoder_hidden_states, hidden_states)`` (kind
        ``"joint"``: image stream is element 1); single-stream ``single_transformer_blocks.*`` return the
        concatenated ``[text; image]`` sequence ``[B, T + N, D]`` (kind ``"sequence"``, ``text_first``)."""
        return stream_feature_blocks(self.pipe.transformer, single_kind="sequence", downsample=1, text_first=True)

    def make_processor(self, layer: LayerInfo, attend: Attend, merge: Merge | None = None) -> Any:
        return Flux2Processor(layer, attend, merge)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(guidance_embedded=self.guidance_embedded, step_distilled=self.step_distilled)
        return out
