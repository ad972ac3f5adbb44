"""A pipeline-like object around a random denoiser that the real backbone adapters accept: no text encoder, no VAE,
prompts and images as random tensors of the real shapes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from scalebench.specs import ModelSpec


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
