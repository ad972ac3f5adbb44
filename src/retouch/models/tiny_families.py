"""Tiny random Qwen-Image, Sana and SD3.5 pipelines, built offline (companions of :mod:`retouch.models.tiny`).

Same contract as the other tiny factories: the *stock* diffusers pipeline, every component built from a config
with the real checkpoints' structure at toy widths, weights drawn inside a forked RNG after
``torch.manual_seed(seed)`` (bit-identical for a seed, the caller's RNG untouched), the offline tokenizers of
:mod:`retouch.models.tokenizers_bpe` / :mod:`retouch.models.tokenizers`. All VAEs downsample 8x, so a 32x32
image is a 4x4 latent; pass ``height`` / ``width`` (multiples of 16 px) to the pipelines.

* **Qwen-Image**: 2 MMDiT blocks (``QwenImageTransformer2DModel``, 2 heads × 16, RMS QK norm, 3-axis RoPE
  (4, 6, 6) with ``scale_rope``), 2x2 packing (``in_channels`` 64 = 4 × 16), a 2-layer Qwen2.5-VL
  (``Qwen2_5_VLForConditionalGeneration``, 32 wide, M-RoPE, a 1-block vision tower that text prompts never
  run), the Qwen-Image VAE (``AutoencoderKLQwenImage``, causal 3D convolutions, 16 channels normalised by
  the released ``latents_mean`` / ``latents_std``) and Qwen-Image's scheduler config (dynamic exponential
  shift, ``max_shift`` 0.9 over 256–8192 tokens, ``shift_terminal`` 0.02).
* **Sana**: 2 blocks of ``SanaTransformer2DModel`` (linear self-attention, softmax cross-attention, GLU
  convolutional feed-forward; patch 1), a 2-layer Gemma 2 (``Gemma2Model``), a 4-stage ``AutoencoderDC``
  (8x here, 32x in Sana; 8 latent channels, Sana's ``scaling_factor`` 0.41407), and Sana's
  ``DPMSolverMultistepScheduler`` config (flow sigmas, ``flow_shift`` 3, ``flow_prediction``).
* **SD3.5** (:func:`as_sd35`): the tiny SD3 pipeline with SD3.5-medium's transformer features:
  RMS QK norm (``qk_norm="rms_norm"``) and dual attention (MMDiT-X) in the first block
  (``dual_attention_layers=(0,)``: an extra image-only self-attention ``attn2``).
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderDC,
    AutoencoderKLQwenImage,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusion3Pipeline,
)

from retouch.models.seeding import seeded as _seeded
from retouch.models.tokenizers_bpe import build_gemma_tokenizer, build_qwen2_tokenizer

__all__ = ["as_sd35", "tiny_qwenimage_pipeline", "tiny_sana_pipeline"]

_TEXT_WIDTH = 32

# Qwen-Image's released scheduler config (Qwen/Qwen-Image, scheduler/scheduler_config.json)
QWENIMAGE_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Sana's released scheduler config (Efficient-Large-Model/Sana_1600M_1024px_diffusers)
SANA_SCHEDULER: dict[str, Any] = {
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A tiny random Qwen-Image pipeline (see the module docstring)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen2_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": _TEXT_WIDTH,
        "intermediate_size": 2 * _TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},  # sums to head_dim / 2
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                     "out_hidden_size": _TEXT_WIDTH, "fullatt_block_indexes": [0]}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_WIDTH,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWENIMAGE_SCHEDULER)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def tiny_sana_pipeline(seed: int = 0, sample_size: int = 8) -> SanaPipeline:
    """A tiny random Sana pipeline (see the module docstring). ``sample_size`` is in latent pixels."""
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_gemma_tokenizer()
    gemma = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=_TEXT_WIDTH,
            sample_size=sample_size,
            patch_size=1,
        ).eval()
        vae = AutoencoderDC(
            latent_channels=8,
            attention_head_dim=8,
            encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 16, 16, 16),
            decoder_block_out_channels=(8, 16, 16, 16),
            encoder_layers_per_block=(1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (5,), (5,)),
            scaling_factor=0.41407,
        ).eval()
        text_encoder = Gemma2Model(gemma).eval()
    scheduler = DPMSolverMultistepScheduler.from_config(SANA_SCHEDULER)
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def as_sd35(pipe: StableDiffusion3Pipeline, seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline ``pipe`` (``retouch.models.tiny.tiny_pipeline("sd3")``) given SD3.5-medium's
    transformer: QK RMS norm, dual attention in block 0. ``tiny_pipeline("sd35")`` builds it."""
    from diffusers import SD3Transformer2DModel

    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config.update(qk_norm="rms_norm", dual_attention_layers=(0,))
    with _seeded(seed):
        pipe.transformer = SD3Transformer2DModel.from_config(config).eval()
    pipe.register_modules(transformer=pipe.transformer)
    return pipe
