"""Model specs: the denoisers typed in from their published configs (random weights at the real sizes), the tiny
versions of the same architectures, the default scope, and size / dtype parsing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retouch.models.tiny import tiny_flux_config, tiny_pixart_config, tiny_sd3_config, tiny_unet_config
from retouch.models.tiny_families import QWENIMAGE_SCHEDULER, SANA_SCHEDULER

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
OVERHEAD_TARGET = 1.10
SOURCE_PROMPT = "a photo of a cat sitting on a wooden table"
TARGET_PROMPT = "a photo of a dog sitting on a wooden table"


@dataclass(frozen=True)
class ModelSpec:
    """A denoiser typed in from its published config, and what the adapter around it needs.

    ``depth_keys``: config keys that ``--blocks`` reduces (one for PixArt / SD3, double:single for Flux; SD's
    UNet is always built whole). ``text``: ``(tokens, width)`` of the conditioning sequence the denoiser
    attends to; ``pooled``: width of the pooled text embedding (SD3 / Flux).
    """

    name: str
    family: str
    reference: str
    denoiser_class: str
    config: Mapping[str, Any]
    scheduler_class: str
    scheduler_config: Mapping[str, Any]
    latent_channels: int
    text: tuple[int, int]
    pooled: int = 0
    t5_length: int = 0  # T5 tokens in the text sequence (tokenizer max length for P2P's alignment)
    depth_keys: tuple[str, ...] = ()
    presets: tuple[str, ...] = ("direct+p2p", "direct+masactrl")
    sizes: tuple[tuple[int, int], ...] = ((512, 512), (1024, 1024))
    default_blocks: Mapping[tuple[int, int], str] = field(default_factory=dict)  # size -> blocks ("full" if absent)
    tiny: bool = False

    def full_blocks(self) -> str:
        return ":".join(str(self.config[k]) for k in self.depth_keys) or "full"

    def parse_blocks(self, blocks: str | None, size: tuple[int, int]) -> dict[str, int]:
        """Config overrides for ``blocks`` (``"full"``, ``"4"``, Flux ``"2:4"``); ``None``: this size's default."""
        blocks = blocks or self.default_blocks.get(size, "full")
        if blocks == "full":
            return {}
        if not self.depth_keys:
            raise ValueError(f"{self.name}: the depth of a UNet is not reduced; use --blocks full")
        parts = [int(p) for p in str(blocks).split(":")]
        if len(parts) != len(self.depth_keys) or any(p < 1 for p in parts):
            want = ":".join("N" for _ in self.depth_keys)
            raise ValueError(f"{self.name}: --blocks takes {want} (>= 1 each) or 'full', got {blocks!r}")
        return dict(zip(self.depth_keys, parts, strict=True))


_SD_SCHEDULER = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDM)
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
_PIXART_SCHEDULER = {  # PixArt-alpha/PixArt-XL-2-1024-MS scheduler (DPM-Solver++)
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "timestep_spacing": "linspace",
    "prediction_type": "epsilon",
}
_FLUX_SCHEDULER = {  # black-forest-labs/FLUX.1-dev scheduler
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="sd15", family="sd", reference="runwayml/stable-diffusion-v1-5 (unet/config.json)",
            denoiser_class="UNet2DConditionModel",
            config={
                "sample_size": 64, "in_channels": 4, "out_channels": 4,
                "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
                "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
                "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
            },
            scheduler_class="PNDMScheduler", scheduler_config=_SD_SCHEDULER,
            latent_channels=4, text=(77, 768), sizes=((512, 512),),
        ),
        ModelSpec(
            name="pixart", family="pixart", reference="PixArt-alpha/PixArt-XL-2-1024-MS (transformer/config.json)",
            denoiser_class="PixArtTransformer2DModel",
            config={
                "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                "num_layers": 28, "cross_attention_dim": 1152, "caption_channels": 4096, "sample_size": 128,
                "patch_size": 2, "attention_bias": True, "activation_fn": "gelu-approximate",
                "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
                "num_embeds_ada_norm": 1000, "use_additional_conditions": True,
            },
            scheduler_class="DPMSolverMultistepScheduler", scheduler_config=_PIXART_SCHEDULER,
            latent_channels=4, text=(120, 4096), t5_length=120, depth_keys=("num_layers",),
            presets=("direct+p2p", "direct+masactrl", "dit4edit", "kv_edit"),
            sizes=((512, 512), (1024, 1024)),
            default_blocks={(512, 512): "4", (1024, 1024): "2", (1024, 2048): "1"},
        ),
        ModelSpec(
            name="sd3", family="sd3",
            reference="stabilityai/stable-diffusion-3-medium-diffusers (transformer/config.json)",
            denoiser_class="SD3Transformer2DModel",
            config={
                "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
            },
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler_config={"num_train_timesteps": 1000, "shift": 3.0},
            latent_channels=16, text=(77 + 256, 4096), pooled=2048, t5_length=256, depth_keys=("num_layers",),
            presets=("direct+p2p", "direct+masactrl", "rf_solver", "kv_edit", "kv_edit_inf"),
            default_blocks={(512, 512): "2", (1024, 1024): "1"},
        ),
        ModelSpec(
            name="flux", family="flux", reference="black-forest-labs/FLUX.1-dev (transformer/config.json)",
            denoiser_class="FluxTransformer2DModel",
            config={
                "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
            },
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_FLUX_SCHEDULER,
            latent_channels=16, text=(512, 4096), pooled=768, t5_length=512,
            depth_keys=("num_layers", "num_single_layers"),
            presets=("direct+p2p", "direct+masactrl", "rf_solver", "kv_edit", "kv_edit_inf"),
            default_blocks={(512, 512): "1:2", (1024, 1024): "1:1"},
        ),
        # tiny versions of the same four architectures: the smoke test, and a quick look at the machinery
        ModelSpec(
            name="tiny-sd", family="sd", reference="tiny UNet2DConditionModel (tests)",
            denoiser_class="UNet2DConditionModel",
            config=tiny_unet_config(),
            scheduler_class="PNDMScheduler", scheduler_config=_SD_SCHEDULER,
            latent_channels=4, text=(77, 32), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-pixart", family="pixart", reference="tiny PixArtTransformer2DModel (tests)",
            denoiser_class="PixArtTransformer2DModel",
            config=tiny_pixart_config(),
            scheduler_class="DPMSolverMultistepScheduler", scheduler_config=_PIXART_SCHEDULER,
            latent_channels=4, text=(120, 32), t5_length=120, depth_keys=("num_layers",),
            presets=("direct+p2p", "direct+masactrl", "dit4edit"), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-sd3", family="sd3", reference="tiny SD3Transformer2DModel (tests)",
            denoiser_class="SD3Transformer2DModel",
            config=tiny_sd3_config(),
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler_config={"num_train_timesteps": 1000, "shift": 3.0},
            latent_channels=16, text=(77 + 32, 64), pooled=64, t5_length=32, depth_keys=("num_layers",),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-flux", family="flux", reference="tiny FluxTransformer2DModel (tests)",
            denoiser_class="FluxTransformer2DModel",
            config=tiny_flux_config(),
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_FLUX_SCHEDULER,
            latent_channels=16, text=(32, 32), pooled=32, t5_length=32,
            depth_keys=("num_layers", "num_single_layers"),
            presets=("direct+p2p", "direct+masactrl", "rf_solver", "kv_edit", "kv_edit_inf"), sizes=((64, 64),),
            tiny=True,
        ),
    )
}  # fmt: skip

# Qwen-Image, Sana and SD3.5 (issue 17): published transformer configs, random weights
# the published scheduler configs, as the tiny models of the tests use them (retouch.models.tiny_families)
_QWENIMAGE_SCHEDULER = QWENIMAGE_SCHEDULER  # Qwen/Qwen-Image scheduler/scheduler_config.json
_SANA_SCHEDULER = SANA_SCHEDULER  # Efficient-Large-Model/Sana_1600M_1024px_diffusers (DPM-Solver++ on flow sigmas)
_SD3_TEXT = {"latent_channels": 16, "text": (77 + 256, 4096), "pooled": 2048, "t5_length": 256}
MODELS.update(
    {
        s.name: s
        for s in (
            ModelSpec(
                name="qwenimage", family="qwenimage", reference="Qwen/Qwen-Image (transformer/config.json)",
                denoiser_class="QwenImageTransformer2DModel",
                config={
                    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
                    "axes_dims_rope": (16, 56, 56),
                },
                scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_QWENIMAGE_SCHEDULER,
                latent_channels=16, text=(256, 3584), depth_keys=("num_layers",),
                presets=("direct+p2p", "direct+masactrl", "rf_solver"),
                default_blocks={(512, 512): "1", (1024, 1024): "1"},
            ),
            ModelSpec(
                name="sana", family="sana",
                reference="Efficient-Large-Model/Sana_1600M_1024px_diffusers (transformer/config.json)",
                denoiser_class="SanaTransformer2DModel",
                config={
                    "in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32,
                    "num_layers": 20, "num_cross_attention_heads": 20, "cross_attention_head_dim": 112,
                    "cross_attention_dim": 2240, "caption_channels": 2304, "mlp_ratio": 2.5, "attention_bias": False,
                    "sample_size": 32, "patch_size": 1, "norm_elementwise_affine": False, "norm_eps": 1e-6,
                },
                scheduler_class="DPMSolverMultistepScheduler", scheduler_config=_SANA_SCHEDULER,
                latent_channels=32, text=(300, 2304), depth_keys=("num_layers",),
                presets=("direct+p2p", "direct+masactrl", "direct+pnp"),
                default_blocks={(512, 512): "4", (1024, 1024): "2"},
            ),
            ModelSpec(
                name="sd35-medium", family="sd3",
                reference="stabilityai/stable-diffusion-3.5-medium (transformer/config.json)",
                denoiser_class="SD3Transformer2DModel",
                config={
                    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                    "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13)),
                },
                scheduler_class="FlowMatchEulerDiscreteScheduler",
                scheduler_config={"num_train_timesteps": 1000, "shift": 3.0},
                depth_keys=("num_layers",), presets=("direct+p2p", "direct+masactrl", "rf_solver"),
                default_blocks={(512, 512): "2", (1024, 1024): "1"}, **_SD3_TEXT,
            ),
            ModelSpec(
                name="sd35-large", family="sd3",
                reference="stabilityai/stable-diffusion-3.5-large (transformer/config.json)",
                denoiser_class="SD3Transformer2DModel",
                config={
                    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
                    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                    "qk_norm": "rms_norm",
                },
                scheduler_class="FlowMatchEulerDiscreteScheduler",
                scheduler_config={"num_train_timesteps": 1000, "shift": 3.0},
                depth_keys=("num_layers",), presets=("direct+p2p", "direct+masactrl", "rf_solver"),
                default_blocks={(512, 512): "1", (1024, 1024): "1"}, **_SD3_TEXT,
            ),
            ModelSpec(
                name="tiny-qwenimage", family="qwenimage", reference="tiny QwenImageTransformer2DModel (tests)",
                denoiser_class="QwenImageTransformer2DModel",
                config={
                    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                    "axes_dims_rope": (4, 6, 6),
                },
                scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_QWENIMAGE_SCHEDULER,
                latent_channels=16, text=(256, 32), depth_keys=("num_layers",),
                presets=("direct+p2p", "direct+masactrl", "rf_solver"), sizes=((64, 64),), tiny=True,
            ),
            ModelSpec(
                name="tiny-sana", family="sana", reference="tiny SanaTransformer2DModel (tests)",
                denoiser_class="SanaTransformer2DModel",
                config={
                    "in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 16,
                    "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 16,
                    "cross_attention_dim": 32, "caption_channels": 32, "sample_size": 8, "patch_size": 1,
                },
                scheduler_class="DPMSolverMultistepScheduler", scheduler_config=_SANA_SCHEDULER,
                latent_channels=8, text=(300, 32), depth_keys=("num_layers",),
                presets=("direct+p2p", "direct+masactrl", "direct+pnp"), sizes=((64, 64),), tiny=True,
            ),
        )
    }
)  # fmt: skip

# Flux.2 and Z-Image (issue 17). FLUX.2-dev: the Flux2Transformer2DModel defaults of diffusers 0.42.1, which
# are FLUX.2-dev's published transformer config (8 double + 48 single blocks, 48 heads x 128, text width 3 x
# 5120 = 15360). FLUX.2-klein-4B: 5 double + 20 single blocks, 24 heads x 128, text 3 x 2560 = 7680 (Qwen3-4B),
# no guidance embedding, step-distilled (is_distilled); typed from the published config, check it against the
# hub before quoting numbers. Z-Image-Turbo: the ZImageTransformer2DModel defaults (30 layers + 2 + 2 refiners,
# width 3840, 30 heads, Qwen3-4B caption width 2560) and its scheduler config (no dynamic shifting, shift 3).
_FLUX2_SCHEDULER = {**_FLUX_SCHEDULER}
_ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}
_FLUX2_DEV = {
    "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
    "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "guidance_embeds": True,
}  # fmt: skip
_FLUX2_KLEIN_4B = {**_FLUX2_DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                   "joint_attention_dim": 7680, "guidance_embeds": False}  # fmt: skip
_ZIMAGE_TURBO = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}  # fmt: skip
MODELS.update({
    s.name: s
    for s in (
        ModelSpec(
            name="flux2-dev", family="flux2", reference="black-forest-labs/FLUX.2-dev (transformer/config.json)",
            denoiser_class="Flux2Transformer2DModel", config=_FLUX2_DEV,
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_FLUX2_SCHEDULER,
            latent_channels=32, text=(512, 15360), t5_length=512, depth_keys=("num_layers", "num_single_layers"),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"),
            default_blocks={(512, 512): "1:2", (1024, 1024): "1:1"},
        ),
        ModelSpec(
            name="flux2-klein", family="flux2", reference="black-forest-labs/FLUX.2-klein-4B (transformer/config.json)",
            denoiser_class="Flux2Transformer2DModel", config=_FLUX2_KLEIN_4B,
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_FLUX2_SCHEDULER,
            latent_channels=32, text=(512, 7680), t5_length=512, depth_keys=("num_layers", "num_single_layers"),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"),
            default_blocks={(512, 512): "1:2", (1024, 1024): "1:1"},
        ),
        ModelSpec(
            name="zimage", family="zimage", reference="Tongyi-MAI/Z-Image-Turbo (transformer/config.json)",
            denoiser_class="ZImageTransformer2DModel", config=_ZIMAGE_TURBO,
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_ZIMAGE_SCHEDULER,
            latent_channels=16, text=(512, 2560), t5_length=512, depth_keys=("n_layers",),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"),
            default_blocks={(512, 512): "2", (1024, 1024): "1"},
        ),
        ModelSpec(
            name="tiny-flux2", family="flux2", reference="tiny Flux2Transformer2DModel (tests)",
            denoiser_class="Flux2Transformer2DModel",
            config={**_FLUX2_DEV, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
                    "timestep_guidance_channels": 32, "axes_dims_rope": (4, 4, 4, 4)},  # fmt: skip
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_FLUX2_SCHEDULER,
            latent_channels=4, text=(128, 48), t5_length=128, depth_keys=("num_layers", "num_single_layers"),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-zimage", family="zimage", reference="tiny ZImageTransformer2DModel (tests)",
            denoiser_class="ZImageTransformer2DModel",
            config={**_ZIMAGE_TURBO, "dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2,
                    "n_kv_heads": 2, "cap_feat_dim": 32, "axes_dims": [4, 6, 6], "axes_lens": [1024, 128, 128]},
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_ZIMAGE_SCHEDULER,
            latent_channels=16, text=(64, 32), t5_length=64, depth_keys=("n_layers",),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"), sizes=((64, 128),), tiny=True,
        ),
    )
})  # fmt: skip

# The default scope: fits a loaded 2-core CPU in well under an hour (see the README for measured wall times).
DEFAULT_JOBS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("sd15", (512, 512)),
    ("pixart", (512, 512)),
    ("pixart", (1024, 1024)),
)
DEFAULT_EDIT_RUNS: tuple[str, ...] = (
    "pixart@512x512/b2/ddim+p2p/s2,4,8,16",  # peak memory vs number of steps (P2P materialises probabilities)
    "pixart@1024x2048/b1/dit4edit/s3/i1",  # a 1024x2048 PixArt-config DiT4Edit edit runs (1 block, 3 steps)
    "flux@512x512/b1:1/kv_edit/s7,14,28",  # KV-Edit's background cache grows with the steps
    "flux@512x512/b1:1/kv_edit_inf/s7,14,28",  # the inversion-free variant's memory must stay flat
)


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"1024x2048"`` -> height 1024, width 2048."""
    m = re.fullmatch(r"(\d+)(?:[x×](\d+))?", text.strip())
    if not m:
        raise ValueError(f"size {text!r}: expected N or HxW (height x width)")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def _size_str(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
