"""Backbone adapters: the only place that knows diffusers model internals.

``load_backbone`` takes an embedded model name, a local diffusers folder or a hub id.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from retouch.backbones.base import Backbone, LayerInfo, SizePolicy

log = logging.getLogger(__name__)

# pipeline class name -> family
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sd",
    "StableDiffusionXLImg2ImgPipeline": "sd",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2",
    "ZImagePipeline": "zimage",
    "QwenImagePipeline": "qwenimage",
    "QwenImageImg2ImgPipeline": "qwenimage",
    "SanaPipeline": "sana",
}

FAMILIES: dict[str, dict[str, Any]] = {
    "sd": {
        "description": "Stable Diffusion 1.x/2.x/XL: UNet2DConditionModel, CLIP text, eps or v prediction",
        "denoiser": "UNet2DConditionModel",
        "pipelines": ["StableDiffusionPipeline", "StableDiffusionXLPipeline"],
        "prediction": ["epsilon", "v_prediction"],
    },
    "pixart": {
        "description": "PixArt-α/Σ: PixArtTransformer2DModel (DiT), T5 text, learned sigma",
        "denoiser": "PixArtTransformer2DModel",
        "pipelines": ["PixArtAlphaPipeline", "PixArtSigmaPipeline"],
        "prediction": ["epsilon"],
    },
    "sd3": {
        "description": "Stable Diffusion 3: SD3Transformer2DModel (MMDiT joint attention), CLIP-L/G + T5, flow",
        "denoiser": "SD3Transformer2DModel",
        "pipelines": ["StableDiffusion3Pipeline"],
        "prediction": ["flow"],
    },
    "flux": {
        "description": "Flux: FluxTransformer2DModel (double+single stream), CLIP + T5, guidance-distilled flow",
        "denoiser": "FluxTransformer2DModel",
        "pipelines": ["FluxPipeline"],
        "prediction": ["flow"],
    },
    "flux2": {
        "description": "Flux.2 dev / klein: Flux2Transformer2DModel (double+single stream, 4-axis RoPE), Mistral 3 "
        "(dev) or Qwen3 (klein) text, 2x2-patchified batch-normed latents; guidance embedded (dev), true CFG "
        "(klein base) or none (klein distilled, 4 steps)",
        "denoiser": "Flux2Transformer2DModel",
        "pipelines": ["Flux2Pipeline", "Flux2KleinPipeline"],
        "prediction": ["flow"],
    },
    "zimage": {
        "description": "Z-Image / Z-Image-Turbo: ZImageTransformer2DModel (refiners + single-stream [image; "
        "caption]), Qwen3 text, true CFG (Turbo: none, 8 steps)",
        "denoiser": "ZImageTransformer2DModel",
        "pipelines": ["ZImagePipeline"],
        "prediction": ["flow"],
    },
    "qwenimage": {
        "description": "Qwen-Image: QwenImageTransformer2DModel (MMDiT, joint [text; image] attention, 3-axis "
        "RoPE), Qwen2.5-VL text, 3D VAE, true CFG with norm rescale, flow",
        "denoiser": "QwenImageTransformer2DModel",
        "pipelines": ["QwenImagePipeline"],
        "prediction": ["flow"],
    },
    "sana": {
        "description": "Sana: SanaTransformer2DModel (linear self-attention + softmax cross-attention), Gemma 2 "
        "text, DC-AE 32x latents, flow (DPM-Solver++ on flow sigmas)",
        "denoiser": "SanaTransformer2DModel",
        "pipelines": ["SanaPipeline"],
        "prediction": ["flow"],
    },
}


def backbone_class(family: str) -> type[Backbone]:
    from retouch.backbones.flux import FluxBackbone
    from retouch.backbones.flux2 import Flux2Backbone
    from retouch.backbones.pixart import PixArtBackbone
    from retouch.backbones.qwen_image import QwenImageBackbone
    from retouch.backbones.sana import SanaBackbone
    from retouch.backbones.sd import SDBackbone
    from retouch.backbones.sd3 import SD3Backbone
    from retouch.backbones.zimage import ZImageBackbone

    classes = {"sd": SDBackbone, "pixart": PixArtBackbone, "sd3": SD3Backbone, "flux": FluxBackbone}
    classes.update(flux2=Flux2Backbone, zimage=ZImageBackbone)
    classes.update(qwenimage=QwenImageBackbone, sana=SanaBackbone)
    try:
        return classes[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(classes)}") from None


def from_pipeline(pipe: Any, *, name: str | None = None) -> Backbone:
    """Wrap an already loaded diffusers pipeline."""
    cls_name = type(pipe).__name__
    family = PIPELINE_FAMILIES.get(cls_name)
    if family is None:
        raise ValueError(f"unsupported pipeline {cls_name}; supported: {sorted(PIPELINE_FAMILIES)}")
    return backbone_class(family)(pipe, name=name)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def load_backbone(
    source: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload: bool = False,
) -> Backbone:
    """Load a model by embedded name, local diffusers folder or hub id.

    Args:
        device: where to run (default: CPU; pass "cuda" etc. explicitly).
        dtype: "fp32" | "fp16" | "bf16" or a torch dtype.
        offload: diffusers' model CPU offload (needs an accelerator device).
    """
    from diffusers import DiffusionPipeline

    from retouch.models import registry

    torch_dtype = parse_dtype(dtype)
    if offload and (device is None or str(device) == "cpu"):
        raise ValueError("--offload moves weights to the accelerator on demand; give --device (e.g. cuda)")
    name = source
    path = registry.resolve(source)
    try:
        config = DiffusionPipeline.load_config(str(path))
    except Exception as exc:  # noqa: BLE001 - diffusers raises several types here
        local = Path(str(path)).exists()
        hint = (
            "is not a diffusers pipeline folder (no model_index.json)"
            if local
            else (
                "is neither an embedded model, a local folder nor a reachable hub id "
                f"(embedded: {', '.join(registry.embedded_names()) or 'none installed'})"
            )
        )
        raise ValueError(f"model {source!r} {hint}: {exc}") from None
    cls_name = config.get("_class_name", "")
    family = PIPELINE_FAMILIES.get(cls_name)
    if family is None:
        raise ValueError(
            f"model {source!r} is a {cls_name or 'unknown'} pipeline; retouch supports {sorted(set(PIPELINE_FAMILIES))}"
        )
    import diffusers

    pipe_cls = getattr(diffusers, cls_name)
    local = isinstance(path, Path) or Path(str(path)).is_dir()
    if local:
        from retouch.backbones.checks import check_model_folder

        check_model_folder(Path(path))
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "use_safetensors": True}
    if family == "sd" and "XL" not in cls_name:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = pipe_cls.from_pretrained(str(path), **kwargs)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers / transformers / safetensors raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model {source!r} could not be loaded ({type(exc).__name__}): {first}") from None
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    elif device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return backbone_class(family)(pipe, name=name)


__all__ = [
    "DTYPES",
    "FAMILIES",
    "PIPELINE_FAMILIES",
    "Backbone",
    "LayerInfo",
    "SizePolicy",
    "backbone_class",
    "from_pipeline",
    "load_backbone",
    "parse_dtype",
]
