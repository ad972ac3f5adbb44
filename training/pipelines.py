"""Denoiser configs, schedulers and pipeline assembly for the three embedded families.

One place knows how a trained denoiser plus the shared components (VAE, shapes-clip text tower, T5 encoder,
tokenizers) become a stock diffusers pipeline: :func:`build_pipeline` is used both while training (to encode
prompts exactly as the pipeline will, and to sample for the learning curve) and to write the embedded folders.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "FLUX_T5_LENGTH",
    "PIXART_T5_LENGTH",
    "Components",
    "build_denoiser",
    "build_pipeline",
    "denoiser_config",
    "load_components",
    "make_scheduler",
]

FAMILIES = ("sd", "pixart", "flux")
PIXART_T5_LENGTH = 120
"""PixArt-α's T5 prompt length."""
FLUX_T5_LENGTH = 64
"""shapes-flux's T5 prompt length (``max_sequence_length`` to pass to FluxPipeline; captions use < 40)."""

# widths of the three size presets per family
_SD_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (8, 16, 16, 16), "norm_num_groups": 8, "attention_head_dim": 2},
    "small": {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 16, "attention_head_dim": 4},
    "base": {"block_out_channels": (64, 96, 128, 128), "norm_num_groups": 32, "attention_head_dim": 4},
}
_DIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"heads": 2, "head_dim": 8, "layers": 2, "single": 2},
    "small": {"heads": 4, "head_dim": 32, "layers": 6, "single": 4},
    "base": {"heads": 6, "head_dim": 32, "layers": 8, "single": 6},
}


def denoiser_config(
    family: str, size: str, *, text_width: int, t5_width: int, latent_channels: int = 4
) -> dict[str, Any]:
    """The denoiser's diffusers config for ``family`` at a size preset (``tiny`` is for tests), for a VAE of
    ``latent_channels`` channels."""
    c = latent_channels
    if family == "sd":
        s = _SD_SIZES[size]
        return {
            "sample_size": 16,
            "in_channels": c,
            "out_channels": c,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": list(s["block_out_channels"]),
            "layers_per_block": 2,
            "cross_attention_dim": text_width,
            "attention_head_dim": s["attention_head_dim"],
            "norm_num_groups": s["norm_num_groups"],
        }
    s = _DIT_SIZES[size]
    if family == "pixart":
        return {
            "num_attention_heads": s["heads"],
            "attention_head_dim": s["head_dim"],
            "in_channels": c,
            "out_channels": 2 * c,
            "num_layers": s["layers"],
            "cross_attention_dim": s["heads"] * s["head_dim"],
            "caption_channels": t5_width,
            "sample_size": 16,
            "patch_size": 2,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "use_additional_conditions": False,
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "num_embeds_ada_norm": 1000,
        }
    if family == "flux":
        d = s["head_dim"]
        a = d // 4 // 2 * 2
        b = (d - a) // 2 // 2 * 2
        rope = (a, b, d - a - b)  # even parts summing to the head dim (Flux: 16, 56, 56 of 128)
        return {
            "patch_size": 1,
            "in_channels": 4 * c,
            "num_layers": s["layers"] // 2,
            "num_single_layers": s["single"],
            "attention_head_dim": d,
            "num_attention_heads": s["heads"],
            "joint_attention_dim": t5_width,
            "pooled_projection_dim": text_width,
            "guidance_embeds": True,
            "axes_dims_rope": list(rope),
        }
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_denoiser(family: str, config: dict[str, Any]) -> nn.Module:
    """A freshly initialised denoiser of ``family`` from its config."""
    cls = {"sd": UNet2DConditionModel, "pixart": PixArtTransformer2DModel, "flux": FluxTransformer2DModel}[family]
    return cls(**config)


def make_scheduler(family: str) -> Any:
    """The family's scheduler with its reference configuration (SD 1.x DDIM, PixArt-α DPM-Solver, Flux)."""
    if family == "sd":
        return DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="leading",
        )
    if family == "pixart":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            timestep_spacing="linspace",
            steps_offset=0,
            thresholding=False,
        )
    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    raise ValueError(f"unknown family {family!r}")


class Components:
    """The shared trained parts, loaded frozen from the run directories of earlier stages."""

    def __init__(self, runs: str | Path, device: torch.device | None = None) -> None:
        runs = Path(runs)
        device = device or torch.device("cpu")
        # float32 also when a stage folder holds float16 weights (e.g. taken from an embedded model folder)
        self.vae = AutoencoderKL.from_pretrained(str(runs / "vae" / "final")).float().to(device)
        self.text_encoder = CLIPTextModel.from_pretrained(str(runs / "clip" / "final")).float().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(runs / "clip" / "final"))
        self.t5 = T5EncoderModel.from_pretrained(str(runs / "t5" / "final")).float().to(device)
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(str(runs / "t5" / "final"))
        for m in (self.vae, self.text_encoder, self.t5):
            m.eval().requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def t5_width(self) -> int:
        return int(self.t5.config.d_model)


def load_components(runs: str | Path, device: torch.device | None = None) -> Components:
    """Load the VAE, the shapes-clip text tower, the T5 encoder and their tokenizers from ``runs``."""
    return Components(runs, device)


def build_pipeline(family: str, denoiser: nn.Module, comps: Components) -> DiffusionPipeline:
    """The stock diffusers pipeline of ``family`` around ``denoiser`` and the shared components."""
    scheduler = make_scheduler(family)
    if family == "sd":
        return StableDiffusionPipeline(
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "pixart":
        return PixArtAlphaPipeline(
            tokenizer=comps.t5_tokenizer,
            text_encoder=comps.t5,
            vae=comps.vae,
            transformer=denoiser,
            scheduler=scheduler,
        )
    if family == "flux":
        tok2 = copy.deepcopy(comps.t5_tokenizer)
        tok2.model_max_length = FLUX_T5_LENGTH
        return FluxPipeline(
            scheduler=scheduler,
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            text_encoder_2=comps.t5,
            tokenizer_2=tok2,
            transformer=denoiser,
        )
    raise ValueError(f"unknown family {family!r}")
