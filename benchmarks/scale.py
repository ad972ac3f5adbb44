#!/usr/bin/env python
"""Per-NFE latency, peak memory, attention-control overhead and merging speed-up at the real models' sizes.

The denoisers are built from their published configs (typed in :data:`MODELS`) with **random weights**: no
download, and a random network of the right shape costs the same time and memory as the trained one. Text
encoders and VAEs are not built: the real backbone adapters (``SDBackbone``, ``PixArtBackbone``,
``SD3Backbone``, ``FluxBackbone``) wrap a minimal pipeline-like object holding the denoiser, the real
scheduler class, offline tokenizers from :mod:`retouch.models.tokenizers` (P2P's word alignment needs them)
and a VAE stand-in that only carries a config; prompts and images become random tensors of the shapes the
real encoders produce (:class:`RandomIO`).

What is timed is one NFE exactly as :func:`retouch.editing.edit` runs it while sampling: a
:class:`~retouch.editing.GuidedModel` call on the 2-branch batch (source + target, times 2 with CFG) inside
:func:`~retouch.control.attention_editing`, at the sampling step where the editor touches the most layers
(the *worst step*, found by asking the editor's own ``applies`` / ``needs_probs`` for every step). Variants
per model and size, run interleaved round-robin so that background load hits all of them alike:

* ``plain``: diffusers' own attention processors, no control (the baseline);
* ``routed``: retouch's processors with no editor (the cost of routing alone; also what a step outside the
  editor's schedule costs);
* ``<preset>``: each editing preset's editor (``direct+p2p``, ``direct+masactrl``, ``dit4edit`` on PixArt,
  ``rf_solver``'s value injection on SD3 / Flux, ``kv_edit`` on the DiTs and ``kv_edit_inf`` on SD3 / Flux with
  :func:`bench_mask`, KV-Edit's cache filled for the timed point by one untimed inversion-phase call), worst step;
* ``<preset>+merge<r>``: the same with token merging (``MergeConfig(ratio=r)`` through ``make_merger``);
* ``merge<r>``: merging with no editor, at the largest ratio.

Derived: **overhead** = edit NFE time / plain NFE time (issue 4's target: ≤ 1.10 for P2P and MasaCtrl-style
presets), an upper bound of the overhead averaged over the preset's whole sampling schedule (worst-step time
on every step the editor is active, ``routed`` time elsewhere; ``--phases`` times every distinct phase for the
exact average), and the **merging speed-up** = preset NFE time / preset+merge NFE time.

**Edit runs** call :func:`retouch.editing.edit` itself (inversion + sampling + editor + merger) on the random
backbone: peak memory vs number of steps (2, 4, 8 by default, the engine must keep attention maps only per
step, so the peak must be flat) and a 1024×2048 PixArt-config edit.

Every measurement runs in a fresh subprocess (one per model × size, one per edit run; the process's maximum
resident set is recorded too). Peak memory of a call is what it allocates above what was allocated before it
(weights and inputs excluded, outputs included): on CPU the bytes glibc's ``malloc`` has handed out, sampled
every 2 ms by a thread (:class:`PeakMeter`), on CUDA ``torch.cuda.max_memory_allocated``.

Results: ``benchmarks/results/scale_<model>.json`` (written atomically; new entries replace those of the same
size / depth / device / dtype, others are kept, ``--fresh`` starts over) and ``benchmarks/results/README.md``,
regenerated from every JSON file in that folder.

    python benchmarks/scale.py                                   # the default scope (see DEFAULT_JOBS)
    python benchmarks/scale.py --models sd3 flux --sizes 512     # SD3 / Flux at reduced depth
    python benchmarks/scale.py --models pixart --sizes 1024 --blocks full --nfe 3 --device cuda
    python benchmarks/scale.py --readme-only                     # regenerate the markdown from the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from retouch.bench.provenance import cpu_model, git_commit, load_average

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
OVERHEAD_TARGET = 1.10
SOURCE_PROMPT = "a photo of a cat sitting on a wooden table"
TARGET_PROMPT = "a photo of a dog sitting on a wooden table"

log = logging.getLogger("scale")


# ============================================================================================ model specs


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
            config={
                "sample_size": 8, "in_channels": 4, "out_channels": 4,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                "attention_head_dim": 4, "norm_num_groups": 8,
            },
            scheduler_class="PNDMScheduler", scheduler_config=_SD_SCHEDULER,
            latent_channels=4, text=(77, 32), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-pixart", family="pixart", reference="tiny PixArtTransformer2DModel (tests)",
            denoiser_class="PixArtTransformer2DModel",
            config={
                "num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4, "out_channels": 8,
                "num_layers": 2, "cross_attention_dim": 48, "caption_channels": 32, "sample_size": 8,
                "patch_size": 2,
            },
            scheduler_class="DPMSolverMultistepScheduler", scheduler_config=_PIXART_SCHEDULER,
            latent_channels=4, text=(120, 32), t5_length=120, depth_keys=("num_layers",),
            presets=("direct+p2p", "direct+masactrl", "dit4edit"), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-sd3", family="sd3", reference="tiny SD3Transformer2DModel (tests)",
            denoiser_class="SD3Transformer2DModel",
            config={
                "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 64,
                "caption_projection_dim": 32, "pooled_projection_dim": 64, "pos_embed_max_size": 32,
            },
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            scheduler_config={"num_train_timesteps": 1000, "shift": 3.0},
            latent_channels=16, text=(77 + 32, 64), pooled=64, t5_length=32, depth_keys=("num_layers",),
            presets=("direct+p2p", "direct+masactrl", "rf_solver"), sizes=((64, 64),), tiny=True,
        ),
        ModelSpec(
            name="tiny-flux", family="flux", reference="tiny FluxTransformer2DModel (tests)",
            denoiser_class="FluxTransformer2DModel",
            config={
                "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2,
                "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
            },
            scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler_config=_FLUX_SCHEDULER,
            latent_channels=16, text=(32, 32), pooled=32, t5_length=32,
            depth_keys=("num_layers", "num_single_layers"),
            presets=("direct+p2p", "direct+masactrl", "rf_solver", "kv_edit", "kv_edit_inf"), sizes=((64, 64),),
            tiny=True,
        ),
    )
}  # fmt: skip

# Qwen-Image, Sana and SD3.5 (issue 17): published transformer configs, random weights
_QWENIMAGE_SCHEDULER = {  # Qwen/Qwen-Image scheduler/scheduler_config.json
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}  # fmt: skip
_SANA_SCHEDULER = {  # Efficient-Large-Model/Sana_1600M_1024px_diffusers scheduler (DPM-Solver++ on flow sigmas)
    "algorithm_type": "dpmsolver++", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction", "solver_order": 2, "solver_type": "midpoint", "use_flow_sigmas": True,
}  # fmt: skip
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


def bench_mask(size_hw: tuple[int, int]) -> Any:
    """The mask KV-Edit is timed with: a centred rectangle of half the height and width (a quarter of the
    image may change)."""
    import numpy as np

    h, w = size_hw
    m = np.zeros((h, w), np.float32)
    m[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 1.0
    return m


def _mask_editor(editor: Any) -> bool:
    """Editors built on a mask (KV-Edit) take it through ``set_mask``."""
    return bool(getattr(editor, "needs_mask", False))


# ============================================================================================ random backbone


class VAEStandIn:
    """Carries only the VAE config the adapters read (``vae_scale_factor``, ``latent_channels``, scaling)."""

    def __init__(self, latent_channels: int) -> None:
        self.config = SimpleNamespace(
            block_out_channels=(128, 256, 512, 512),  # 8x downsampling, as every family here
            latent_channels=latent_channels,
            scaling_factor=1.0,
            shift_factor=0.0,
        )


class NotLoaded:
    """Marks a text encoder that an adapter checks for but that the benchmark replaces by random tensors."""

    def __repr__(self) -> str:
        return "NotLoaded()"


class BenchPipeline:
    """The attributes of a diffusers pipeline that the backbone adapters read, and nothing else."""

    def __init__(self, spec: ModelSpec, denoiser: nn.Module, scheduler: Any) -> None:
        from retouch.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

        self.config = SimpleNamespace(_name_or_path=f"random-{spec.name}")
        self.scheduler = scheduler
        self.vae = VAEStandIn(spec.latent_channels)
        if spec.family == "qwenimage":  # a 3D VAE: 8x from its temporal-downsample list, z_dim channels
            from retouch.models.tokenizers_bpe import build_qwen2_tokenizer

            self.vae.temperal_downsample = [False, True, True]
            self.vae.config.z_dim = spec.latent_channels
            self.tokenizer = build_qwen2_tokenizer()
            self.prompt_template_encode = PROMPT_TEMPLATE_QWEN
            self.default_sample_size = 128
        elif spec.family == "sana":  # DC-AE: 32x from its encoder blocks
            from retouch.models.tokenizers_bpe import build_gemma_tokenizer

            self.vae.config.encoder_block_out_channels = (128, 256, 512, 512, 1024, 1024)
            self.tokenizer = build_gemma_tokenizer(max_length=spec.text[0])
        if spec.family == "sd":
            self.unet = denoiser
            self.tokenizer = build_clip_tokenizer()
            self.text_encoder_2 = None
        else:
            self.transformer = denoiser
        if spec.family == "pixart":
            self.tokenizer = build_t5_tokenizer(max_length=spec.t5_length)
        elif spec.family == "sd3":
            self.tokenizer = build_clip_tokenizer()
            self.tokenizer_3 = build_t5_tokenizer(max_length=spec.t5_length)
            self.text_encoder_3 = NotLoaded()  # SD3Backbone.text_segments() adds the T5 segment when present
        elif spec.family == "flux":
            self.tokenizer = build_clip_tokenizer()
            self.tokenizer_2 = build_t5_tokenizer(max_length=spec.t5_length)
            self.default_sample_size = 128
        elif spec.family in ("flux2", "zimage"):
            from retouch.models.tokenizers_chat import build_mistral_tokenizer, build_qwen_tokenizer

            dev = spec.family == "flux2" and spec.config.get("guidance_embeds", False)
            self.tokenizer = build_mistral_tokenizer() if dev else build_qwen_tokenizer()
            self.tokenizer_max_length = spec.text[0]
            self.default_sample_size = 128
            if dev:
                from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

                self.system_message = SYSTEM_MESSAGE
            elif spec.family == "flux2":  # klein: the step-distilled 4B
                self.config.is_distilled = True


# QwenImagePipeline.prompt_template_encode (diffusers 0.42.1): the adapter reads the suffix's token count from it
PROMPT_TEMPLATE_QWEN = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def _prompt_generator(prompt: str, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(prompt.encode()) + salt)


class RandomIO:
    """Mixin over a backbone adapter: prompts and images become random tensors of the encoders' shapes.

    Each prompt's embedding is seeded by the prompt, so equal prompts give equal rows (CFG's empty prompt).
    Everything else (``predict``, attention layers, processors, grids) is the real adapter's.
    """

    spec: ModelSpec

    def encode_prompt(
        self, prompts: Sequence[str], *, image_size: tuple[int, int] | None = None, guidance: float | None = None
    ) -> Any:
        from retouch.types import Conditioning

        spec, dev, dt = self.spec, self.device, self.dtype
        n_txt, width = spec.text

        def rows(width: int, length: int | None, salt: int = 0) -> Tensor:
            shape = (length, width) if length else (width,)
            out = [torch.randn(*shape, generator=_prompt_generator(p, salt)) for p in prompts]
            return torch.stack(out).to(device=dev, dtype=dt)

        tensors: dict[str, Tensor] = {"encoder_hidden_states": rows(width, n_txt)}
        static: dict[str, Any] = {}
        if spec.family == "qwenimage":  # valid: the prompt's tokens and the template's suffix
            valid = [len(self.pipe.tokenizer(p)["input_ids"]) + self._suffix_tokens for p in prompts]
            mask = [[1] * v + [0] * (n_txt - v) for v in valid]
            tensors["encoder_hidden_states_mask"] = torch.tensor(mask, device=dev, dtype=torch.long)
        if spec.family in ("pixart", "sana"):
            tok = self.pipe.tokenizer
            mask = [tok(p, padding="max_length", max_length=n_txt, truncation=True)["attention_mask"] for p in prompts]
            tensors["encoder_attention_mask"] = torch.tensor(mask, device=dev, dtype=dt)
            if spec.family == "pixart" and self.pipe.transformer.use_additional_conditions:
                h, w = image_size or self.size_policy.native
                n = len(prompts)
                tensors["resolution"] = torch.tensor([[h, w]], device=dev, dtype=dt).repeat(n, 1)
                tensors["aspect_ratio"] = torch.tensor([[h / w]], device=dev, dtype=dt).repeat(n, 1)
        if spec.pooled:
            tensors["pooled_projections"] = rows(spec.pooled, None, salt=1)
        if spec.family == "flux":
            g = self.default_guidance if guidance is None else guidance
            tensors["guidance"] = torch.full((len(prompts),), float(g), device=dev, dtype=torch.float32)
            static["txt_ids"] = torch.zeros(n_txt, 3, device=dev, dtype=dt)
        if spec.family == "flux2":
            ids = torch.zeros(n_txt, 4, dtype=torch.long, device=dev)
            ids[:, 3] = torch.arange(n_txt)
            static["txt_ids"] = ids
            if self.guidance_embedded:
                g = self.default_guidance if guidance is None else guidance
                tensors["guidance"] = torch.full((len(prompts),), float(g), device=dev, dtype=torch.float32)
        if spec.family == "zimage":  # captions keep their valid (chat-templated) tokens only
            lengths = [min(n_txt, len(self._template_ids(p))) for p in prompts]
            tensors = {"cap_feats": tensors["encoder_hidden_states"],
                       "cap_lengths": torch.tensor(lengths, device=dev)}  # fmt: skip
        return Conditioning(tensors, static)

    def encode_image(self, pixels: Tensor) -> Tensor:
        b, _, h, w = pixels.shape
        f = self.vae_scale_factor
        g = torch.Generator().manual_seed(1234)
        lat = torch.randn(b, self.latent_channels, h // f, w // f, generator=g)
        return lat.to(device=self.device, dtype=self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        b, _, h, w = latents.shape
        f = self.vae_scale_factor
        return torch.zeros(b, 3, h * f, w * f, device=latents.device)


def build_backbone(
    spec: ModelSpec, overrides: Mapping[str, int], *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Any:
    """The real adapter of ``spec.family`` over a random denoiser (published config + ``overrides``)."""
    import diffusers

    from retouch.backbones import backbone_class

    config = {**spec.config, **overrides}
    # built where it runs, in the dtype it runs in: a 20B-parameter config would need 80 GB of host memory as
    # float32, and random initialisation is far faster on a GPU
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            denoiser = getattr(diffusers, spec.denoiser_class)(**config)
        finally:
            torch.set_default_dtype(default_dtype)
    denoiser = denoiser.to(device=device, dtype=dtype).eval().requires_grad_(False)
    scheduler = getattr(diffusers, spec.scheduler_class)(**spec.scheduler_config)
    base = backbone_class(spec.family)
    cls = type(f"Random{base.__name__}", (RandomIO, base), {"spec": spec})
    return cls(BenchPipeline(spec, denoiser, scheduler), name=f"random-{spec.name}")


# ============================================================================================ machine, memory


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU / GPU, cores, threads, library versions, load average, commit."""
    import diffusers
    import transformers

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(ROOT),
    }


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _malloc_live() -> Callable[[], int] | None:
    """Bytes currently allocated through glibc's malloc (heap in use + mmapped chunks), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2

    def live() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return live


class PeakMeter:
    """Peak memory of a region above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's CPU tensors come from glibc's ``malloc``, so a
    thread samples ``mallinfo2()`` (bytes in use, whatever glibc keeps cached) every ``interval`` seconds
    while the region runs. This costs nothing measurable, unlike the profiler's allocation events or forcing
    every allocation through ``mmap`` (which slowed an NFE by 15-20 % here); a spike shorter than the interval
    could be missed, but activations live for at least one operator. Without glibc: the resident-set
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), which glibc's caching can hide.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.live = _malloc_live() if device.type == "cpu" else None
        self.hwm = device.type == "cpu" and self.live is None and self._reset_hwm()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the allocation at the region's start"
        elif self.live is not None:
            self.method = f"glibc mallinfo2() bytes in use, sampled every {interval * 1e3:g} ms, above the start"
        elif self.hwm:
            self.method = "resident-set high-water mark (VmHWM, reset per region) above VmRSS at the start"
        else:
            self.method = "unavailable"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, int | None]]:
        """Yields a dict filled on exit: ``peak_bytes``, ``retained_bytes`` (still allocated after the region)."""
        out: dict[str, int | None] = {"peak_bytes": None, "retained_bytes": None}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield out
            torch.cuda.synchronize(self.device)
            out["peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - base
            gc.collect()
            out["retained_bytes"] = torch.cuda.memory_allocated(self.device) - base
        elif self.live is not None:
            live = self.live
            base = live()
            peak = [base]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(self.interval):
                    peak[0] = max(peak[0], live())

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield out
            finally:
                stop.set()
                thread.join()
            peak[0] = max(peak[0], live())
            out["peak_bytes"] = peak[0] - base
            gc.collect()
            out["retained_bytes"] = live() - base
        elif self.hwm:
            self._reset_hwm()
            base = _status_kib("VmRSS") or 0
            yield out
            out["peak_bytes"] = ((_status_kib("VmHWM") or 0) - base) * 1024
            gc.collect()
            out["retained_bytes"] = ((_status_kib("VmRSS") or 0) - base) * 1024
        else:
            yield out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================================ NFE timing


@dataclass
class Variant:
    """One timed configuration of an NFE."""

    name: str
    preset: str | None  # None: no editor
    install: bool  # False: diffusers' own processors (plain)
    merge_ratio: float = 0.0
    step: int = 0
    phase: str = "worst"  # "worst" | "phase<i>" (--phases) | "-"
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def step_signatures(editor: Any, backbone: Any, num_steps: int, latent_hw: tuple[int, int], layout: Any) -> list:
    """For each sampling step, the set of ``(layer, needs_probs)`` the editor acts on (its own policy)."""
    from retouch.control.context import AttnContext

    infos = backbone.attention_layers()
    out = []
    for step in range(num_steps):
        active = set()
        for name, info in infos.items():
            ctx = AttnContext(
                layer=info, step=step, num_steps=num_steps, phase="sample", layout=layout, latent_hw=latent_hw
            )
            if editor.applies(ctx):
                active.add((name, bool(editor.needs_probs(ctx))))
        out.append(frozenset(active))
    return out


@dataclass
class PresetPlan:
    """A preset resolved for one backbone: its editor, grid, guidance and sampling schedule."""

    name: str
    resolved: Any
    editor: Any
    grid: Any
    signatures: list
    worst: int

    @property
    def active_steps(self) -> int:
        return sum(1 for s in self.signatures if s)

    def phases(self) -> list[tuple[int, int]]:
        """Distinct non-empty schedule phases as ``(first step, number of steps)``."""
        seen: dict[frozenset, list[int]] = {}
        for i, s in enumerate(self.signatures):
            if s:
                seen.setdefault(s, []).append(i)
        return [(steps[0], len(steps)) for steps in seen.values()]


def plan_preset(backbone: Any, preset: str, latent_hw: tuple[int, int]) -> PresetPlan:
    from retouch.config import EditConfig
    from retouch.control import BatchLayout
    from retouch.control.editors import get_editor
    from retouch.editing import resolve

    res = resolve(backbone, EditConfig(SOURCE_PROMPT, TARGET_PROMPT, method=preset))
    editor = get_editor(res.editor, backbone.family).build(backbone, res.config, dict(res.config.options))
    if _mask_editor(editor):
        from retouch.masks import to_latent

        f = backbone.vae_scale_factor
        editor.set_mask(to_latent(bench_mask((latent_hw[0] * f, latent_hw[1] * f)), latent_hw, backbone.device))
    grid = backbone.grid(res.solver.grid, res.num_steps, latent_hw)
    cfg = backbone.uses_cfg and res.guidance != 1.0
    sigs = step_signatures(editor, backbone, res.num_steps, latent_hw, BatchLayout(branches=2, cfg=cfg))
    worst = max(range(len(sigs)), key=lambda i: (sum(p for _, p in sigs[i]), len(sigs[i]), -i))
    return PresetPlan(preset, res, editor, grid, sigs, worst)


def time_nfes(
    spec: ModelSpec,
    size: tuple[int, int],
    *,
    blocks: str | None = None,
    presets: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.5, 0.75),
    nfe: int = 1,
    warmup: int = 1,
    phases: bool = False,
    statistic: str = "min",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Time NFEs of every variant (module docstring) for one model at one size; returns one results entry.

    ``statistic``: how the timed NFEs of a variant are summarised, ``"min"`` (default: background load only
    ever adds time, so the fastest call is the best estimate of the cost) or ``"median"``.
    """
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    summarise = min if statistic == "min" else statistics.median
    from retouch.config import EditConfig, MergeConfig
    from retouch.control import attention_editing
    from retouch.editing import GuidedModel, make_merger

    device = torch.device(device)
    t_start = time.perf_counter()
    load_start = load_average()
    overrides = spec.parse_blocks(blocks, size)
    t0 = time.perf_counter()
    bb = build_backbone(spec, overrides, device=device, dtype=dtype, seed=seed)
    build_s = time.perf_counter() - t0
    bb.size_policy.check(*size)
    meter = PeakMeter(device)
    h, w = size
    f = bb.vae_scale_factor
    latent_hw = (h // f, w // f)
    presets = list(spec.presets if presets is None else presets)
    plans = {p: plan_preset(bb, p, latent_hw) for p in presets}

    with torch.no_grad():
        cond = bb.encode_prompt([SOURCE_PROMPT, TARGET_PROMPT], image_size=size)
        uncond = bb.encode_prompt(["", ""], image_size=size) if bb.uses_cfg else None
    x = torch.randn(2, bb.latent_channels, *latent_hw, generator=torch.Generator().manual_seed(seed)).to(device)
    ref = plans[presets[0]] if presets else None
    ref_grid = ref.grid if ref else bb.grid("flow" if bb.prediction.value == "flow" else "ddim", 20, latent_hw)
    ref_guidance = ref.resolved.guidance if ref else bb.default_guidance

    variants = [Variant("plain", None, install=False), Variant("routed", None, install=True, phase="-")]
    for p, plan in plans.items():
        variants.append(Variant(p, p, install=True, step=plan.worst))
        if phases:
            for i, (first, _count) in enumerate(plan.phases()):
                if first != plan.worst:
                    variants.append(Variant(f"{p}@step{first}", p, install=True, step=first, phase=f"phase{i}"))
    for r in ratios:
        for p, plan in plans.items():
            if _mask_editor(plan.editor):  # KV-Edit caches per image token: token merging does not apply
                continue
            variants.append(Variant(f"{p}+merge{r:g}", p, install=True, merge_ratio=r, step=plan.worst))
    if ratios:
        variants.append(Variant(f"merge{max(ratios):g}", None, install=True, merge_ratio=max(ratios), phase="-"))

    def run(v: Variant, record: bool) -> None:
        plan = plans.get(v.preset) if v.preset else None
        grid = plan.grid if plan else ref_grid
        guidance = plan.resolved.guidance if plan else ref_guidance
        num_steps = grid.num_steps
        merger = None
        if v.merge_ratio > 0:
            cfg = EditConfig(SOURCE_PROMPT, TARGET_PROMPT, merge=MergeConfig(ratio=v.merge_ratio), seed=seed)
            merger = make_merger(bb, cfg)
        with ExitStack() as stack, torch.no_grad():
            state = None
            if v.install:
                editor = plan.editor if plan else None
                state = stack.enter_context(attention_editing(bb, editor, merger=merger))
                state.num_steps, state.phase, state.step = num_steps, "sample", v.step
                if editor is not None and hasattr(editor, "install"):
                    stack.enter_context(editor.install(bb, state))
                if _mask_editor(editor) and not getattr(editor, "inversion_free", True):  # fill KV-Edit's cache
                    state.phase = "invert"
                    inv_guidance = plan.resolved.config.inversion.guidance
                    inv_uncond = uncond.select([0]) if uncond is not None else None
                    GuidedModel(bb, grid, cond.select([0]), inv_uncond, inv_guidance, state)(x[:1], v.step)
                    state.phase, state.calls = "sample", 0
            model = GuidedModel(bb, grid, cond, uncond, guidance, state)
            with meter.measure() as mem:
                _sync(device)
                t = time.perf_counter()
                pred = model(x, v.step)
                _sync(device)
                elapsed = time.perf_counter() - t
            if not record:
                return
            v.times.append(elapsed)
            if mem["peak_bytes"] is not None:
                v.peaks.append(int(mem["peak_bytes"]))
            v.extra = {
                "batch_rows": int(x.shape[0] * (2 if model.cfg else 1)),
                "cfg": model.cfg,
                "finite": bool(torch.isfinite(pred.x0).all()),
                "attention_calls": state.calls if state else None,
                "materialised_calls": state.prob_calls if state else None,
                "block_calls": state.block_calls if state else None,
                "merge": merger.report() if merger is not None else None,
            }
        log.info("  %-28s %8.2fs  (load %s)", v.name, elapsed, load_average())

    for i in range(warmup):  # the first calls pay one-off costs (allocator growth, kernel selection)
        run(variants[0] if i == 0 else variants[i % len(variants)], record=False)
    for rep in range(nfe):  # round-robin, alternating direction (ABBA): a drifting background load cancels out
        for v in variants if rep % 2 == 0 else variants[::-1]:
            run(v, record=True)

    by_name = {v.name: v for v in variants}

    def secs(name: str) -> float:
        return summarise(by_name[name].times)

    def peak(name: str) -> int | None:
        return max(by_name[name].peaks) if by_name[name].peaks else None

    t_plain, t_routed = secs("plain"), secs("routed")
    rows = []
    for v in variants:
        plan = plans.get(v.preset) if v.preset else None
        rows.append(
            {
                "name": v.name,
                "preset": v.preset,
                "editor": plan.resolved.editor if plan else None,
                "merge_ratio": v.merge_ratio,
                "step": v.step if plan else None,
                "phase": v.phase,
                "seconds_per_nfe": secs(v.name),
                "seconds_per_nfe_median": statistics.median(v.times),
                "times_s": [round(t, 4) for t in v.times],
                "peak_memory_bytes": peak(v.name),
                "vs_plain": secs(v.name) / t_plain,
                **v.extra,
            }
        )
    overheads = []
    for p, plan in plans.items():
        t_edit = secs(p)
        n, active = len(plan.signatures), plan.active_steps
        bound = (active * t_edit + (n - active) * t_routed) / (n * t_plain)
        exact = None
        if phases:
            total = (n - active) * t_routed
            for first, count in plan.phases():
                name = p if first == plan.worst else f"{p}@step{first}"
                total += count * secs(name)
            exact = total / (n * t_plain)
        sig = plan.signatures[plan.worst]
        p_plain, p_edit = peak("plain"), peak(p)
        overheads.append(
            {
                "preset": p,
                "editor": plan.resolved.editor,
                "worst_step": plan.worst,
                "num_steps": n,
                "active_steps": active,
                "layers_touched": len(sig),
                "layers_materialised": sum(1 for _, pr in sig if pr),
                "attention_layers": len(bb.attention_layers()),
                "overhead": t_edit / t_plain,
                "routing_overhead": t_routed / t_plain,
                "run_overhead_bound": bound,
                "run_overhead": exact,
                "memory_ratio": (p_edit / p_plain) if p_plain and p_edit is not None else None,
                "target": OVERHEAD_TARGET,
                "met": t_edit / t_plain <= OVERHEAD_TARGET,
            }
        )
    merging = []
    for r in ratios:
        for p in [*plans, None]:
            name = f"{p}+merge{r:g}" if p else f"merge{r:g}"
            if name not in by_name:
                continue
            base = p or "plain"
            m = by_name[name].extra.get("merge") or {}
            p_base, p_m = peak(base), peak(name)
            merging.append(
                {
                    "preset": p,
                    "requested_ratio": r,
                    "applied_ratio": m.get("applied_ratio"),
                    "merged_calls": m.get("merged_calls"),
                    "speedup": secs(base) / secs(name),
                    "memory_ratio": (p_m / p_base) if p_base and p_m is not None else None,
                }
            )
    full = spec.full_blocks()
    used = ":".join(str(overrides.get(k, spec.config[k])) for k in spec.depth_keys) or "full"
    tokens_hw = (latent_hw[0] // _patch(spec), latent_hw[1] // _patch(spec))
    return {
        "model": spec.name,
        "family": spec.family,
        "reference": spec.reference,
        "size_hw": list(size),
        "latent_hw": list(latent_hw),
        "image_tokens": tokens_hw[0] * tokens_hw[1],
        "text_tokens": spec.text[0],
        "blocks": {"used": used, "full": full, "reduced": used != full},
        "parameters": sum(p.numel() for p in bb.denoiser.parameters()),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "nfe_timed": nfe,
        "warmup": warmup,
        "timing": f"{statistic} wall time of the timed NFEs; variants interleaved round-robin (alternating "
        "direction) after the warm-up",
        "statistic": statistic,
        "peak_memory": meter.method,
        "build_s": round(build_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "variants": rows,
        "overheads": overheads,
        "merging": merging,
    }


def _patch(spec: ModelSpec) -> int:
    return {"sd": 1, "pixart": 2, "sd3": 2, "flux": 2, "qwenimage": 2, "sana": 1, "flux2": 1, "zimage": 2}[spec.family]


# ============================================================================================ edit runs


@dataclass(frozen=True)
class EditRun:
    """``MODEL@HxW[/bBLOCKS][/METHOD][/sSTEPS,...][/mRATIO][/iITERS]``: whole edits via ``retouch.editing.edit``.

    ``iITERS`` caps the fixed-point iterations of DPM-Solver++ inversion (DiT4Edit's; 6 by default).
    """

    model: str
    size: tuple[int, int]
    blocks: str | None = None
    method: str = "ddim+p2p"
    steps: tuple[int, ...] = (2, 4, 8)
    merge: float = 0.0
    inversion_iterations: int | None = None

    @staticmethod
    def parse(text: str) -> EditRun:
        head, *parts = text.split("/")
        if "@" not in head:
            raise ValueError(f"edit run {text!r}: expected MODEL@HxW[/bBLOCKS][/METHOD][/sSTEPS,...][/mRATIO][/iN]")
        model, size = head.split("@", 1)
        kw: dict[str, Any] = {"model": model, "size": parse_size(size)}
        for part in parts:
            if re.fullmatch(r"b(full|\d+(:\d+)?)", part):
                kw["blocks"] = part[1:]
            elif re.fullmatch(r"s\d+(,\d+)*", part):
                kw["steps"] = tuple(int(s) for s in part[1:].split(","))
            elif re.fullmatch(r"m[0-9.]+", part):
                kw["merge"] = float(part[1:])
            elif re.fullmatch(r"i\d+", part):
                kw["inversion_iterations"] = int(part[1:])
            else:
                kw["method"] = part
        return EditRun(**kw)


def edit_once(
    spec: ModelSpec,
    size: tuple[int, int],
    *,
    blocks: str | None,
    method: str,
    num_steps: int,
    merge: float = 0.0,
    inversion_iterations: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """One whole edit (inversion + sampling + editor + merger) on the random backbone, with its peak memory."""
    from PIL import Image

    from retouch.config import EditConfig, InversionConfig, MergeConfig
    from retouch.editing import edit

    device = torch.device(device)
    overrides = spec.parse_blocks(blocks, size)
    bb = build_backbone(spec, overrides, device=device, dtype=dtype, seed=seed)
    meter = PeakMeter(device)
    h, w = size
    image = Image.new("RGB", (w, h), (128, 128, 128))
    options = {"blend_words": "cat dog"} if method.endswith("p2p") else {}  # P2P's local blend keeps word maps
    from retouch.presets import get_preset

    preset = get_preset(method)
    mask = None
    if preset is not None and preset.editor == "kv_edit":  # KV-Edit needs a mask; skip its 4 of 28 steps
        mask, options = bench_mask(size), {"skip": 4 / 28}
    inversion = InversionConfig() if inversion_iterations is None else InversionConfig(iterations=inversion_iterations)
    cfg = EditConfig(
        SOURCE_PROMPT, TARGET_PROMPT, method=method, num_steps=num_steps, seed=seed, options=options,
        merge=MergeConfig(ratio=merge), size_policy="strict", inversion=inversion,
    )  # fmt: skip
    load_start = load_average()
    with meter.measure() as mem:
        t = time.perf_counter()
        report = edit(bb, image, cfg, mask=mask).report  # the result (images, maps) is dropped before "retained"
        wall = time.perf_counter() - t
    used = ":".join(str(overrides.get(k, spec.config[k])) for k in spec.depth_keys) or "full"
    return {
        "model": spec.name,
        "size_hw": list(size),
        "blocks": {"used": used, "full": spec.full_blocks(), "reduced": used != spec.full_blocks()},
        "method": method,
        "options": options,
        "merge_ratio": merge,
        "inversion_iterations": inversion_iterations,
        "num_steps": report["num_steps"],
        "nfe": report["nfe"],
        "attention_calls": report["attention_calls"],
        "merge": report["merge"],
        "timings_s": report["timings"],
        "wall_s": round(wall, 2),
        "peak_memory_bytes": mem["peak_bytes"],
        "retained_bytes": mem["retained_bytes"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory": meter.method,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def summarise_steps(runs: Sequence[Mapping[str, Any]], tolerance: float = 0.05) -> dict[str, Any]:
    """Peak memory vs number of steps.

    ``flat``: the peak of the longest run is within ``tolerance`` (relative) or 64 MiB of the peak of the
    second longest. The shortest runs are not the reference on purpose: an editor's schedule is in fractions
    of the steps, so a short run may skip a whole phase (P2P replaces self-attention maps during 40 % of the
    steps: none of 2), and its lower peak says nothing about accumulation. ``growth`` is longest / shortest.
    """
    ok = sorted((r for r in runs if r.get("peak_memory_bytes") is not None), key=lambda r: r["num_steps"])
    if len(ok) < 2:
        return {"growth": None, "flat": None}
    first, prev, last = ok[0]["peak_memory_bytes"], ok[-2]["peak_memory_bytes"], ok[-1]["peak_memory_bytes"]
    flat = last <= prev * (1 + tolerance) or last - prev <= 64 * 2**20
    return {
        "steps": [r["num_steps"] for r in ok],
        "peaks_bytes": [r["peak_memory_bytes"] for r in ok],
        "materialised_calls": [r.get("attention_calls", {}).get("materialised") for r in ok],
        "growth": last / first if first else None,
        "growth_last": last / prev if prev else None,
        "flat": bool(flat),
        "tolerance": f"{tolerance:.0%} or 64 MiB between the two longest runs",
    }


# ============================================================================================ driver


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


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job description (an NFE timing or an edit) in this process."""
    device = torch.device(job["device"])
    dtype = _dtype(job.get("dtype"), device)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.set_flush_denormal(True)  # random weights must not fall into slow denormal arithmetic
    spec = MODELS[job["model"]]
    size = tuple(job["size"])
    if job["kind"] == "nfe":
        return time_nfes(
            spec, size, blocks=job.get("blocks"), presets=job.get("presets"), ratios=job.get("ratios", (0.5, 0.75)),
            nfe=job.get("nfe", 1), warmup=job.get("warmup", 1), phases=job.get("phases", False),
            statistic=job.get("statistic", "min"), device=device, dtype=dtype,
        )  # fmt: skip
    return edit_once(
        spec, size, blocks=job.get("blocks"), method=job["method"], num_steps=job["num_steps"],
        merge=job.get("merge", 0.0), inversion_iterations=job.get("inversion_iterations"), device=device,
        dtype=dtype,
    )  # fmt: skip


def run_isolated(job: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process (honest peaks); failures come back as ``{"error": ...}``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job), "--worker-out", str(out)]
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s"}
        if proc.returncode != 0 or not out.exists():
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
            return {"error": why}
        return json.loads(out.read_text())


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry_key(e: Mapping[str, Any]) -> tuple:
    return (tuple(e.get("size_hw", ())), e.get("blocks", {}).get("used"), e.get("device"), e.get("dtype"))


def _run_key(r: Mapping[str, Any]) -> tuple:
    return (
        tuple(r.get("size_hw", ())), r.get("blocks", {}).get("used"), r.get("method"), r.get("merge_ratio"),
        r.get("device"),
    )  # fmt: skip


def merge_results(
    path: Path, model: str, machine: Mapping[str, Any], entries: Sequence[Mapping], edit_runs: Sequence[Mapping]
) -> dict[str, Any]:
    """Fold new entries / edit runs into ``scale_<model>.json`` (same key replaces), write it atomically."""
    old: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            old = json.loads(path.read_text())
    kept_entries = [e for e in old.get("entries", []) if _entry_key(e) not in {_entry_key(n) for n in entries}]
    kept_runs = [r for r in old.get("edit_runs", []) if _run_key(r) not in {_run_key(n) for n in edit_runs}]
    payload = {
        "benchmark": "scale",
        "model": model,
        "description": (
            "per-NFE latency / peak memory of plain sampling vs editing presets vs presets + token merging, "
            "attention-control overhead, merging speed-up, peak memory vs steps; real configs, random weights"
        ),
        "machine": dict(machine),
        **({"notes": old["notes"]} if old.get("notes") else {}),  # provenance written by hand: kept
        "entries": [*kept_entries, *entries],
        "edit_runs": [*kept_runs, *edit_runs],
    }
    write_json(path, payload)
    return payload


# ============================================================================================ markdown


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _scale_section(data: Mapping[str, Any]) -> list[str]:
    m = data.get("machine", {})
    lines = [
        f"### `{data.get('model')}` (scale_{data.get('model')}.json)",
        "",
        f"Machine: {m.get('device_name')} · {m.get('cpu_count')} cores · torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads) · diffusers {m.get('diffusers')} · device `{m.get('device')}` · "
        f"commit `{m.get('commit')}`",
        "",
        *[line for note in data.get("notes", []) for line in (f"Note: {note}", "")],
    ]
    for e in data.get("entries", []):
        if "error" in e:
            lines += [f"* {_size_str(e.get('size_hw', [0, 0]))}: **failed** ({e['error']})", ""]
            continue
        b = e["blocks"]
        depth = f"{b['used']} of {b['full']} blocks" if b["reduced"] else "full depth"
        rows = e["variants"][0].get("batch_rows")
        lines += [
            f"**{_size_str(e['size_hw'])}** ({e['image_tokens']} image tokens, {e['text_tokens']} text tokens, "
            f"{depth}, {e['parameters'] / 1e6:,.0f}M params, {e['dtype']}, batch {rows} rows, "
            f"{e['nfe_timed']} timed NFE(s) after {e['warmup']} warm-up) · load average "
            f"{e['load_average_start']} → {e['load_average_end']} · {e['wall_s']:.0f} s",
            "",
            "| variant | step | s / NFE | × plain | peak MiB | full maps (+blocks) / attn calls | merge applied |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in e["variants"]:
            mat = "—"
            if v.get("attention_calls") is not None:
                blocks = f" (+{v['block_calls']})" if v.get("block_calls") else ""
                mat = f"{v['materialised_calls']}{blocks} / {v['attention_calls']}"
            mg = v.get("merge") or {}
            applied = f"{mg['applied_ratio']:.3f}" if mg else "—"
            lines.append(
                f"| {v['name']} | {'—' if v['step'] is None else v['step']} | {v['seconds_per_nfe']:.2f} "
                f"| {v['vs_plain']:.3f} | {_mib(v['peak_memory_bytes'])} | {mat} | {applied} |"
            )
        lines += [
            "",
            "| preset | overhead (worst step) | run-average bound | run average | active steps "
            "| layers touched / reading probabilities | memory × plain | ≤ 1.10 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for o in e["overheads"]:
            lines.append(
                f"| {o['preset']} | {o['overhead']:.3f} | {o['run_overhead_bound']:.3f} "
                f"| {_f(o['run_overhead'], '.3f')} "
                f"| {o['active_steps']} / {o['num_steps']} | {o['layers_touched']} / {o['layers_materialised']} "
                f"of {o['attention_layers']} | {_f(o['memory_ratio'])} | {'yes' if o['met'] else '**no**'} |"
            )
        if e["merging"]:
            lines += ["", "| merging | ratio req → applied | NFE speed-up | memory × unmerged |", "|---|---|---|---|"]
            for g in e["merging"]:
                lines.append(
                    f"| {g['preset'] or '(no editor)'} | {g['requested_ratio']:g} → {_f(g['applied_ratio'], '.3f')} "
                    f"| {g['speedup']:.2f}× | {_f(g['memory_ratio'])} |"
                )
        lines.append("")
    runs = data.get("edit_runs", [])
    if runs:
        lines += [
            "Whole edits (`retouch.editing.edit` on the random backbone):",
            "",
            "| size | blocks | method | merge | steps | NFE inv + sample | materialised / attention calls | wall s "
            "| peak MiB | retained MiB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            for x in r.get("runs", []):
                if "error" in x:
                    lines.append(f"| {_size_str(r['size_hw'])} | | {r['method']} | | {x.get('num_steps')} "
                                 f"| **failed: {x['error']}** | | | | | |")  # fmt: skip
                    continue
                lines.append(
                    f"| {_size_str(r['size_hw'])} | {x['blocks']['used']} / {x['blocks']['full']} | {r['method']} "
                    f"| {r['merge_ratio']:g} | {x['num_steps']} | {x['nfe']['inversion']} + {x['nfe']['sampling']} "
                    f"| {x['attention_calls']['materialised']} / {x['attention_calls']['total']} | {x['wall_s']:.0f} "
                    f"| {_mib(x['peak_memory_bytes'])} | {_mib(x['retained_bytes'])} "
                    f"| {x['load_average_start']} |"
                )
            s = r.get("summary") or {}
            if s.get("growth_last") is not None:
                verdict = "flat" if s["flat"] else "**grows**"
                lines.append(
                    f"| | | | | {s['steps'][-2]} → {s['steps'][-1]} steps: peak × {s['growth_last']:.3f} "
                    f"({verdict}; {s['steps'][0]} → {s['steps'][-1]}: × {_f(s['growth'], '.3f')}) | | | | | | |"
                )
        lines.append("")
    return lines


def _quality_section(name: str, data: Mapping[str, Any]) -> list[str]:
    """``embedded_quality.json``: oracle accuracy and reconstruction PSNR per embedded model."""
    attrs = ("count", "position", "shape", "colour", "size", "fill", "background_colour", "background_pattern", "style")
    lines = [f"### {name} (`benchmarks/embedded_quality.py`)", "",
             "| model | captions | world | " + " | ".join(attrs) + " | reconstruction dB (inversion) | VAE dB |",
             "|---" * (len(attrs) + 5) + "|"]  # fmt: skip
    for model, r in sorted((data.get("models") or {}).items()):
        acc = r.get("oracle_accuracy") or {}
        world = (r.get("world") or {}).get("max_objects", "?")
        lines.append(
            f"| {model} | {r.get('n_captions')} | {'one object' if world == 1 else f'up to {world} objects'} | "
            + " | ".join(f"{100 * acc[a]:.0f}%" if a in acc else "–" for a in attrs)
            + f" | {_f(r.get('reconstruction_psnr'), '.1f')} ({r.get('inversion')}) | {_f(r.get('vae_psnr'), '.1f')} |"
        )
    return [*lines, ""]


def _other_section(name: str, data: Mapping[str, Any]) -> list[str]:
    if "models" in data and name.startswith("embedded_quality"):
        return _quality_section(name, data)
    m = data.get("machine", {})
    target = data.get("target")
    lines = [f"### {name}", "", f"{data.get('description', data.get('benchmark', ''))}", ""]
    if m:
        lines += [f"Machine: {m.get('device_name', m.get('device'))} · {m.get('cpu_count')} cores · load average "
                  f"{m.get('load_average_start')} → {m.get('load_average_end')}", ""]  # fmt: skip
    if isinstance(target, Mapping):
        lines += [f"Target: `{json.dumps({k: v for k, v in target.items() if k != 'measured'})}`", ""]
    return lines


def write_readme(results_dir: Path = RESULTS_DIR) -> Path:
    """Regenerate ``README.md`` in ``results_dir`` from every JSON file there (atomically)."""
    files = sorted(results_dir.glob("*.json"))
    lines = [
        "# Benchmark results",
        "",
        "<!-- generated by benchmarks/scale.py from the JSON files in this folder; do not edit by hand -->",
        "",
        "Random weights at the published configs' sizes (no download); CPU timings are wall-clock on a shared "
        "machine, so every table carries the load average it ran under; a variant's time is the fastest of its "
        "timed NFEs (background load only adds time; the JSON has every time and the median). "
        "`× plain` is the NFE time relative to "
        "plain sampling (diffusers' processors, no control) with the same batch; **overhead** is issue 4's "
        "edit NFE / plain NFE at the step where the editor touches the most layers, and the *run-average bound* "
        "spreads it over the preset's schedule (worst-step time on every active step, routed time elsewhere). "
        "Merging speed-up = preset NFE / preset + merging NFE. Peak memory is above what was resident before "
        "the call (weights excluded).",
        "",
    ]
    scale = [f for f in files if f.name.startswith("scale_")]
    if scale:
        lines += ["## Scale (`benchmarks/scale.py`)", ""]
        for f in scale:
            with contextlib.suppress(json.JSONDecodeError, OSError):
                lines += _scale_section(json.loads(f.read_text()))
    others = [f for f in files if not f.name.startswith("scale_")]
    if others:
        lines += ["## Other benchmarks", ""]
        for f in others:
            with contextlib.suppress(json.JSONDecodeError, OSError):
                lines += _other_section(f.name, json.loads(f.read_text()))
    path = results_dir / "README.md"
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".README.md.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# ============================================================================================ main


def run_benchmark(
    jobs: Sequence[tuple[str, tuple[int, int]]],
    edit_runs: Sequence[EditRun] = (),
    *,
    blocks: Mapping[str, str] | None = None,
    presets: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.5, 0.75),
    nfe: int = 1,
    warmup: int = 1,
    phases: bool = False,
    statistic: str = "min",
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = None,
    isolate: bool = True,
    results_dir: Path = RESULTS_DIR,
    fresh: bool = False,
    runner: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the NFE jobs and edit runs, fold them into ``scale_<model>.json`` files, regenerate the README.

    ``isolate``: one fresh process per job (honest peak memory); the smoke test runs in-process.
    Returns the written payloads by model.
    """
    blocks = dict(blocks or {})
    runner = runner or (run_isolated if isolate else run_job)
    if threads:
        torch.set_num_threads(threads)
    machine = machine_info(torch.device(device))
    if threads:
        machine["torch_threads"] = threads
    common = {"device": device, "dtype": dtype, "threads": threads}
    entries: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for model, size in jobs:
        spec = MODELS[model]
        job = {
            "kind": "nfe", "model": model, "size": list(size), "blocks": blocks.get(model) or blocks.get("*"),
            "presets": [p for p in presets if _preset_fits(p, spec)] if presets else None, "ratios": list(ratios),
            "nfe": nfe, "warmup": warmup, "phases": phases, "statistic": statistic, **common,
        }  # fmt: skip
        log.info("%s @ %s (blocks %s)", model, _size_str(size), job["blocks"] or spec.default_blocks.get(size, "full"))
        t0 = time.perf_counter()
        entry = runner(job)
        if "error" in entry:
            entry = {"size_hw": list(size), "blocks": {"used": job["blocks"]}, "device": device, **entry}
        log.info("%s @ %s done in %.0fs", model, _size_str(size), time.perf_counter() - t0)
        entries.setdefault(model, []).append(entry)
    for er in edit_runs:
        spec = MODELS[er.model]
        er_blocks = er.blocks or blocks.get(er.model) or blocks.get("*")
        records = []
        for steps in er.steps:
            job = {
                "kind": "edit", "model": er.model, "size": list(er.size), "blocks": er_blocks, "method": er.method,
                "num_steps": steps, "merge": er.merge, "inversion_iterations": er.inversion_iterations, **common,
            }  # fmt: skip
            log.info("edit %s @ %s %s, %d steps", er.model, _size_str(er.size), er.method, steps)
            rec = runner(job)
            if "error" in rec:
                rec = {"num_steps": steps, **rec}
            records.append(rec)
        ok = next((r for r in records if "error" not in r), {})
        runs.setdefault(er.model, []).append(
            {
                "size_hw": list(er.size),
                "blocks": ok.get("blocks", {"used": er_blocks}),
                "method": er.method,
                "merge_ratio": er.merge,
                "device": device,
                "runs": records,
                "summary": summarise_steps(records) if len(er.steps) > 1 else None,
            }
        )
    written = {}
    for model in {*entries, *runs}:
        path = results_dir / f"scale_{model}.json"
        if fresh and path.exists():
            path.unlink()
        written[model] = merge_results(path, model, machine, entries.get(model, []), runs.get(model, []))
    write_readme(results_dir)
    return written


def _preset_fits(preset: str, spec: ModelSpec) -> bool:
    from retouch.presets import get_preset

    p = get_preset(preset)
    return p is None or spec.family in p.families


def _parse_blocks(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for v in values:
        model, _, val = v.rpartition("=")
        out[model or "*"] = val
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: the DEFAULT_JOBS scope")
    parser.add_argument("--sizes", nargs="+", help="N or HxW (height x width); default: each model's sizes")
    parser.add_argument("--blocks", nargs="+", default=[],
                        help="depth: 'full', 'N' (PixArt/SD3), 'D:S' (Flux double:single), or MODEL=VALUE; "
                             "default: a per-size reduced depth for the DiTs (see MODELS)")  # fmt: skip
    parser.add_argument("--presets", nargs="+", help="editing presets to time (default: each model's)")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75], help="token-merging ratios")
    parser.add_argument("--nfe", type=int, default=None, help="timed NFEs per variant (cpu 1, cuda 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up NFEs (cpu 1, cuda 3)")
    parser.add_argument("--phases", action="store_true", help="time every phase of each preset's schedule")
    parser.add_argument("--statistic", choices=["min", "median"], default="min",
                        help="summary of a variant's timed NFEs (min: load only adds time)")  # fmt: skip
    parser.add_argument("--edit-runs", nargs="*", default=None,
                        help="MODEL@HxW[/bBLOCKS][/METHOD][/sSTEPS,...][/mRATIO]; default: DEFAULT_EDIT_RUNS "
                             "(of the chosen models); give none to skip")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results of the models run")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per job (peaks less honest)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme-only", action="store_true", help="only regenerate README.md from the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.worker:
        logging.getLogger("retouch").setLevel(logging.WARNING)
        result = run_job(json.loads(args.worker))
        write_json(Path(args.worker_out), result)
        return
    if args.readme_only:
        print(f"wrote {write_readme(args.results)}")
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    cuda = args.device.startswith("cuda")
    if args.models or args.sizes:
        models = args.models or sorted({m for m, _ in DEFAULT_JOBS})
        jobs = [
            (m, s) for m in models for s in ([parse_size(x) for x in args.sizes] if args.sizes else MODELS[m].sizes)
        ]
    else:
        models = sorted({m for m, _ in DEFAULT_JOBS})
        jobs = list(DEFAULT_JOBS)
    if args.edit_runs is None:
        edit_runs = [EditRun.parse(t) for t in DEFAULT_EDIT_RUNS if EditRun.parse(t).model in models]
    else:
        edit_runs = [EditRun.parse(t) for t in args.edit_runs]
    t0 = time.perf_counter()
    written = run_benchmark(
        jobs, edit_runs, blocks=_parse_blocks(args.blocks), presets=args.presets, ratios=args.ratios,
        nfe=args.nfe or (3 if cuda else 1), warmup=args.warmup or (3 if cuda else 1), phases=args.phases,
        statistic=args.statistic,
        device=args.device, dtype=args.dtype, threads=args.threads, isolate=not args.in_process,
        results_dir=args.results, fresh=args.fresh,
    )  # fmt: skip
    for model, payload in written.items():
        for e in payload["entries"]:
            for o in e.get("overheads", []):
                print(
                    f"{model} {_size_str(e['size_hw'])} {o['preset']}: overhead {o['overhead']:.3f} "
                    f"(run bound {o['run_overhead_bound']:.3f}) target <= {OVERHEAD_TARGET}: "
                    f"{'met' if o['met'] else 'NOT met'}"
                )
    print(f"wrote {', '.join(f'scale_{m}.json' for m in written)} and README.md in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
