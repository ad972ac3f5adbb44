"""Backbone protocol: the one calling convention every model family is adapted to.

Only modules under ``retouch.backbones`` know diffusers model internals. Algorithms see a
:class:`Backbone`: prompts -> :class:`~retouch.types.Conditioning`, pixels <-> latents, a raw prediction for
``(x, timestep, cond)``, grids for each solver, and a table of attention layers described by
:class:`LayerInfo` so that editors select layers by predicate, never by counting calls.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from retouch import schedules
from retouch.types import Conditioning, NoiseGrid, Prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser.

    Attributes:
        name: module path inside the denoiser (the key of ``attn_processors`` without ``.processor``).
        kind: ``"self"`` (image tokens only), ``"cross"`` (image queries, text keys), ``"joint"``
            (concatenated image + text tokens with separate projections: SD3 / Flux double-stream) or
            ``"single"`` (Flux single-stream: one projection over an already concatenated text + image
            sequence).
        depth: position of the layer's transformer block in execution order (0 = first block run).
        place: ``"down" | "mid" | "up"`` (UNet), ``"dit"`` (PixArt), ``"joint"`` (SD3), ``"double" | "single"``
            (Flux).
        downsample: image-token grid stride relative to the latent (1 for DiTs of patch 1, 2 for patch 2 ...).
        text_first: in joint / single layers, whether text tokens precede image tokens in the sequence.
        linear: the layer computes kernelised *linear* attention (Sana's ReLU self-attention), not softmax
            attention: editors may edit its queries, keys and values but it has no probability map.
    """

    name: str
    kind: str
    depth: int
    place: str
    downsample: int
    text_first: bool = False
    linear: bool = False

    def resolution(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Image-token grid ``(h, w)`` at this layer for a latent of spatial size ``latent_hw``."""
        h, w = latent_hw
        d = self.downsample
        return (h + d - 1) // d, (w + d - 1) // d


@dataclass(frozen=True)
class TextSegment:
    """A run of text tokens inside the key sequence that image queries attend to.

    ``offset`` is the position of the segment's first token within the text part of the sequence and
    ``length`` its padded length; ``tokenizer`` produced its tokens (used for word alignment).
    """

    tokenizer: Any
    offset: int
    length: int


@dataclass(frozen=True)
class SizePolicy:
    """Which image sizes a backbone takes: both sides a multiple of ``multiple`` pixels, within bounds."""

    multiple: int
    min_side: int
    max_side: int
    native: tuple[int, int]

    def check(self, height: int, width: int) -> None:
        bad = [s for s in (height, width) if s % self.multiple or not self.min_side <= s <= self.max_side]
        if bad:
            raise ValueError(
                f"image size {width}x{height} is not supported: both sides must be multiples of {self.multiple} "
                f"between {self.min_side} and {self.max_side} pixels (native {self.native[1]}x{self.native[0]})"
            )

    def fit_native(self, height: int, width: int) -> tuple[int, int]:
        """The size of the model's native pixel area with the image's aspect ratio: both sides scaled by
        ``sqrt(native area / image area)``, rounded to the size multiple and clamped to the bounds."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size {width}x{height} has no pixels")
        scale = math.sqrt(self.native[0] * self.native[1] / (height * width))
        return self.fit(max(1, round(height * scale)), max(1, round(width * scale)))

    def fit(self, height: int, width: int) -> tuple[int, int]:
        """The size an image is resized to: each side rounded to the nearest multiple, clamped to bounds."""

        def r(s: int) -> int:
            s = max(self.min_side, min(self.max_side, s))
            return max(self.multiple, int(round(s / self.multiple)) * self.multiple)

        return r(height), r(width)


class Backbone(abc.ABC):
    """A text-to-image model adapted to retouch's calling convention.

    Subclasses set ``family``, ``prediction``, ``uses_cfg`` and implement the abstract methods.
    """

    family: str
    prediction: Prediction
    uses_cfg: bool = True
    default_solver: str = "ddim"
    default_guidance: float = 7.5
    default_steps: int = 50
    step_distilled: bool = False  # few-step distilled (read from the model's config): presets keep its steps
    # Whether latents are ``(mean - shift_factor) * scaling_factor``: the family's diffusers pipeline decides.
    # SD3 / Flux pipelines use the VAE's shift; StableDiffusion(XL) and PixArt pipelines ignore it (real SD
    # VAEs have none), so a folder whose VAE config carries one was trained without it.
    latent_shift: bool = True
    # Attention layers at several resolutions (a UNet): token merging then keeps to the finer levels.
    multiscale: bool = False
    # MasaCtrl's default first block, as a fraction of the depth (the deeper half of a DiT carries layout).
    masactrl_start_layer: float = 0.5

    def __init__(self, pipe: Any, *, name: str | None = None) -> None:
        self.pipe = pipe
        self.name = name or getattr(getattr(pipe, "config", None), "_name_or_path", None) or self.family

    # --- components -----------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def denoiser(self) -> nn.Module:
        """The UNet / transformer whose attention processors editors replace."""

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    @abc.abstractmethod
    def size_policy(self) -> SizePolicy: ...

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The tokenizer whose tokens the editors' word alignment refers to (the one feeding cross-attention)."""

    @property
    def max_prompt_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    def text_segments(self) -> list[TextSegment]:
        """Where each tokenizer's tokens sit in the text sequence the attention layers see."""
        return [TextSegment(self.tokenizer, 0, self.max_prompt_tokens)]

    # --- conditioning ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode_prompt(self, prompts: Sequence[str], *, guidance: float | None = None) -> Conditioning:
        """Encode prompts (one row each). ``guidance`` is used by guidance-distilled models (Flux)."""

    def check_prompts(self, prompts: Sequence[str], *, allow_empty: bool = False) -> None:
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            if not allow_empty and not p.strip():
                raise ValueError("prompt is empty: describe the image (source) and the wanted edit (target)")
            ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt is too long: {len(ids)} tokens, the {self.family} text encoder takes "
                    f"{self.max_prompt_tokens}: {p[:60]!r}..."
                )

    # --- latents --------------------------------------------------------------------------------------
    def encode_image(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B,3,H,W]`` in [-1, 1] -> model latent ``[B,C,h,w]``: ``(mean - shift) * scale``.

        The posterior *mean* (deterministic), as PnP-Inversion and FlowEdit do; with ``generator`` a posterior
        *sample* drawn from it (``mean + std * randn``, as diffusers' ``latent_dist.sample()``: what the
        RF-Inversion pipeline, RF-Solver-Edit and FireFlow do). ``shift`` is the VAE's ``shift_factor`` on
        families whose pipeline uses it (``latent_shift``: SD3 / Flux), else 0.
        """
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        if generator is None:
            lat = dist.mean
        else:
            draw = torch.randn(tuple(dist.mean.shape), generator=generator, dtype=torch.float32)
            lat = dist.mean + dist.std * draw.to(dist.mean.device, dist.mean.dtype)
        return ((lat - self.shift_factor) * vae.config.scaling_factor).to(self.dtype)

    @property
    def shift_factor(self) -> float:
        """The shift subtracted from VAE latents before scaling (0 where the family's pipeline ignores it)."""
        if not self.latent_shift:
            return 0.0
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def randn_latent(self, shape: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Standard-normal latents ``[B,C,h,w]`` (float32, CPU) drawn from ``generator``.

        The draw order is the family's: a method's noise is only reproducible across implementations when
        both draw the same numbers into the same places (Flux overrides this to draw in its packed layout).
        """
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)

    def decode(self, latents: Tensor) -> Tensor:
        """Model latent -> ``[B,3,H,W]`` in [-1, 1]."""
        vae = self.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + self.shift_factor).sample

    # --- denoising ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """Raw model output for latents ``x`` (``[B,C,h,w]``) at scheduler timestep ``timestep`` (scalar)."""

    def combine_guidance(self, uncond: Tensor, cond: Tensor, guidance: float) -> Tensor:
        """Classifier-free guidance of the raw predictions ``[B, C, h, w]``: ``u + w (c - u)``. Families whose
        pipelines combine differently (Qwen-Image's norm rescale) override this."""
        return uncond + guidance * (cond - uncond)

    @property
    def scheduler_config(self) -> Mapping[str, Any]:
        return dict(self.pipe.scheduler.config)

    def grid(self, kind: str, num_steps: int, latent_hw: tuple[int, int]) -> NoiseGrid:
        """The grid of ``kind`` (``"ddim" | "dpm" | "flow"``) for ``num_steps`` at this latent size."""
        schedules.check_steps(num_steps)
        cfg = self.scheduler_config
        if self.prediction is Prediction.FLOW:
            return schedules.flow_grid(cfg, num_steps, image_seq_len=self.image_seq_len(latent_hw))
        if kind == "ddim":
            return schedules.ddim_grid(cfg, num_steps)
        if kind == "dpm":
            return schedules.dpm_grid(cfg, num_steps)
        raise ValueError(f"{self.family} is not a flow model: solver grid {kind!r} does not apply")

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        return latent_hw[0] * latent_hw[1]

    # --- attention ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def attention_layers(self) -> dict[str, LayerInfo]:
        """All attention layers, keyed by module path, in execution order."""

    def attn_processors(self) -> dict[str, Any]:
        """The denoiser's attention processors keyed ``"<module path>.processor"`` (diffusers' convention)."""
        return dict(self.denoiser.attn_processors)

    def set_attn_processors(self, processors: Mapping[str, Any]) -> None:
        """Set every attention processor (the keys of :meth:`attn_processors`)."""
        self.denoiser.set_attn_processor(dict(processors))

    @abc.abstractmethod
    def make_processor(self, layer: LayerInfo, attend: Callable[..., Tensor], merge: Callable | None = None) -> Any:
        """A diffusers attention processor for ``layer`` that routes attention through ``attend`` (and merges
        image tokens through ``merge`` where the layer's kind allows it)."""

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """Blocks whose outputs are spatial image features, keyed by module path, in execution order.

        Feature editors (Plug-and-Play's feature injection) put removable forward hooks on these modules.
        ``LayerInfo.kind`` says what the module returns:

        * ``"resnet"``: a tensor ``[B, C, h, w]`` (UNet residual blocks, ``down/mid/up_blocks.*.resnets.*``);
        * ``"dit"``: a tensor ``[B, N_img, D]`` of image tokens (PixArt ``transformer_blocks.*``);
        * ``"joint"`` / ``"single"``: a tuple ``(encoder_hidden_states, hidden_states)`` (SD3
          ``transformer_blocks.*``; Flux double ``transformer_blocks.*`` and single
          ``single_transformer_blocks.*``). The **image stream is element 1**, ``[B, N_img, D]``; element 0
          is the text stream (``None`` after SD3's last, context-pre-only block).

        ``depth`` is the position among the feature blocks in execution order, ``downsample`` the stride of
        the output grid relative to the latent.
        """
        raise NotImplementedError(f"the {self.family} adapter does not describe its feature blocks")

    # --- the layers editors default to (the family knowledge editors must not carry) -----------------------
    def pnp_feature_layers(self) -> list[str]:
        """Plug-and-Play's default feature-injection block(s): the middle feature block by depth (a DiT's
        middle block; UNet adapters name the decoder block of the paper)."""
        ordered = sorted(self.feature_blocks().values(), key=lambda i: i.depth)
        return [ordered[(len(ordered) - 1) // 2].name]

    def pnp_attention_layers(self) -> list[str]:
        """Plug-and-Play's default Q/K-injection layers: self / joint / single attention of the deeper half."""
        layers = [i for i in self.attention_layers().values() if i.kind in ("self", "joint", "single")]
        first = int(round(0.5 * (max(i.depth for i in layers) + 1)))
        return [i.name for i in layers if i.depth >= first]

    def residual_branch(self, block: str) -> str | None:
        """Module path of the last layer of ``block``'s residual branch (its output is what the block adds to
        its skip connection), or ``None`` when the block has no such branch. Plug-and-Play's released code
        injects there, not the block's output."""
        return None

    def describe(self) -> dict[str, Any]:
        layers = self.attention_layers()
        kinds: dict[str, int] = {}
        for info in layers.values():
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
        return {
            "family": self.family,
            "name": self.name,
            "prediction": self.prediction.value,
            "uses_cfg": self.uses_cfg,
            "attention_layers": kinds,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }
