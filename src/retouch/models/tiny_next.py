"""Tiny random Flux.2 (dev, klein, klein distilled) and Z-Image pipelines, built fully offline.

Same contract as :mod:`retouch.models.tiny`: each factory builds every component from a config with weights
drawn under ``torch.manual_seed(seed)`` inside a forked RNG, wires in offline tokenizers
(:mod:`retouch.models.tokenizers_chat`) and returns the *stock* diffusers pipeline. The structure follows
the published configs, scaled down:

* **Flux.2 dev** (``Flux2Pipeline``): ``Flux2Transformer2DModel`` with double- and single-stream blocks
  (parallel attention + MLP in the single blocks), 4-axis RoPE, embedded guidance (``guidance_embeds``);
  ``AutoencoderKLFlux2`` (2x2 patchified latents normalised by the VAE's batch-norm statistics, which are
  randomised here so that the normalisation is exercised); a ``Mistral3ForConditionalGeneration`` text
  encoder (tiny Pixtral vision tower, 31-layer 16-wide Mistral so that the pipeline's hidden-state layers
  10, 20, 30 exist) behind a chat template with a system message.
* **Flux.2 klein** (``Flux2KleinPipeline``): no guidance embedding, a 28-layer ``Qwen3ForCausalLM``
  (hidden-state layers 9, 18, 27); ``is_distilled`` in the pipeline config decides true CFG (base) or none
  (the 4-step distilled model).
* **Z-Image** (``ZImagePipeline``): ``ZImageTransformer2DModel`` (noise refiner on image tokens, context
  refiner on caption tokens, single-stream layers over ``[image; caption]``), the Flux.1-style 16-channel
  ``AutoencoderKL``, a 2-layer ``Qwen3Model`` text encoder, and Z-Image-Turbo's scheduler config
  (``use_dynamic_shifting=False``, ``shift=3.0``).

Image sizes: Flux.2 takes multiples of 16 px; Z-Image too, but its transformer pads the image tokens of every
sample to a multiple of 32, so tests use sizes whose token count ``(H/16)·(W/16)`` is a multiple of 32
(e.g. 64×128) when they compare editors, and any multiple of 16 for plain sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from retouch.models.tiny import _vae
from retouch.models.tokenizers_chat import build_mistral_tokenizer, build_qwen_tokenizer

__all__ = ["FLUX2_VARIANTS", "tiny_flux2_pipeline", "tiny_zimage_pipeline"]

FLUX2_VARIANTS = ("dev", "klein", "klein-distilled")
_LM_WIDTH = 16  # text encoder width; Flux.2 stacks three hidden states -> joint_attention_dim 48


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's scheduler config: dynamic shifting (the pipeline passes its empirical ``mu``)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux2_vae(latent_channels: int) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    n = vae.bn.running_mean.shape[0]  # 4 * latent_channels (2x2 patchified)
    vae.bn.running_mean.copy_(0.1 * torch.randn(n))
    vae.bn.running_var.copy_(0.5 + torch.rand(n))
    return vae


def tiny_flux2_pipeline(seed: int = 0, variant: str = "dev") -> Flux2Pipeline | Flux2KleinPipeline:
    """A tiny random Flux.2 pipeline: ``variant`` is ``"dev"`` (Flux2Pipeline, embedded guidance),
    ``"klein"`` (Flux2KleinPipeline base, true CFG) or ``"klein-distilled"`` (``is_distilled=True``, no CFG).

    Transformer: 1 double- and 2 single-stream blocks, 2 heads × 16 (RoPE axes 4, 4, 4, 4), 4 latent channels
    patchified to 16. Pass ``height``/``width`` (multiples of 16) when calling the pipeline.
    """
    if variant not in FLUX2_VARIANTS:
        raise ValueError(f"unknown Flux.2 variant {variant!r}; choose one of {FLUX2_VARIANTS}")
    latent_channels = 4
    dev = variant == "dev"
    tokenizer = build_mistral_tokenizer() if dev else build_qwen_tokenizer()
    with _seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * _LM_WIDTH,
            timestep_guidance_channels=32,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=dev,
        ).eval()
        vae = _flux2_vae(latent_channels)
        if dev:
            text_config = MistralConfig(
                vocab_size=len(tokenizer), hidden_size=_LM_WIDTH, intermediate_size=32, num_hidden_layers=31,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            vision_config = PixtralVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                image_size=32, patch_size=16,
            )  # fmt: skip
            config = Mistral3Config(
                vision_config=vision_config, text_config=text_config, image_token_index=len(tokenizer) - 1,
                spatial_merge_size=1,
            )  # fmt: skip
            text_encoder = Mistral3ForConditionalGeneration(config).eval()
        else:
            text_encoder = Qwen3ForCausalLM(
                Qwen3Config(
                    vocab_size=len(tokenizer),
                    hidden_size=_LM_WIDTH,
                    intermediate_size=32,
                    num_hidden_layers=28,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    head_dim=8,
                    max_position_embeddings=1024,
                    pad_token_id=tokenizer.pad_token_id,
                    tie_word_embeddings=True,
                )  # fmt: skip
            ).eval()
    if dev:
        return Flux2Pipeline(
            scheduler=_flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            transformer=transformer,
        )  # fmt: skip
    return Flux2KleinPipeline(
        scheduler=_flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=variant == "klein-distilled",
    )  # fmt: skip


def tiny_zimage_pipeline(seed: int = 0, turbo: bool = True) -> ZImagePipeline:
    """A tiny random Z-Image pipeline: with ``turbo`` Z-Image-Turbo's scheduler config (static shift 3, no
    dynamic shifting), else a dynamically shifted one (Flux's resolution rule), as an undistilled model's.

    Transformer: width 32, 2 heads (head dim 16 = RoPE axes 4 + 6 + 6), 1 noise-refiner and 1 context-refiner
    block, 2 single-stream layers, patch 2, 16 latent channels. Text: a 2-layer 32-wide ``Qwen3Model``.
    """
    tokenizer = build_qwen_tokenizer()
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=32,
            axes_dims=[4, 6, 6],
            axes_lens=[1024, 128, 128],
        ).eval()
        # the pad tokens are zeros at init; make them distinct so that padding is exercised
        transformer.x_pad_token.data.normal_()
        transformer.cap_pad_token.data.normal_()
        vae = _vae(
            latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False,
        )  # fmt: skip
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        ).eval()
    if turbo:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )  # fmt: skip
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
