"""Tiny randomly initialised diffusers pipelines of every supported family, built fully offline.

The factories build each component from a config (no hub access, no weights on disk), wire in the offline
tokenizers of :mod:`retouch.models.tokenizers`, and return the *stock* diffusers pipeline. They are meant for
integration tests: every architectural feature that editors and adapters touch is present (self- and
cross-attention at two resolutions in the UNet, learned-sigma output in PixArt, joint attention in SD3,
double- and single-stream blocks with RoPE in Flux, the real schedulers' configs) while a denoising step
takes milliseconds on a CPU.

Determinism: every factory is a pure function of its arguments. Weights are drawn inside
:func:`torch.random.fork_rng` after ``torch.manual_seed(seed)``, so the same seed gives bit-identical
weights and the caller's global RNG state is left untouched.

``sample_size`` follows the diffusers convention: it is the denoiser's ``config.sample_size``, in *latent*
pixels. All VAEs downsample 8x like the real ones (``vae_scale_factor == 8``), so the pipelines' default
output side is ``8 * sample_size`` (except Flux, whose pipeline hard-codes 1024 px). Pass ``height`` /
``width`` explicitly; any multiple of 16 pixels works for every family, square or not (the UNet halves
the latent once; the DiTs patchify 2x2; Flux packs 2x2).

Family-specific notes (see also the gotchas in ``reference/feasibility.md``):

* SD / SDXL: no safety checker; SDXL has no watermarker and uses the same CLIP tokenizer twice.
* PixArt: call with ``use_resolution_binning=False`` or the output size is snapped to the aspect-ratio
  bins. The ``conditioned=True`` variant (``use_additional_conditions``, like PixArt-XL-2-1024-MS) must have
  ``sample_size == 128``, because the pipeline only feeds resolution/aspect-ratio to a 128-sample-size
  transformer; its default output would therefore be 1024 px.
* SD3 / Flux: keep ``max_sequence_length`` small in tests; T5 length does not change the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from retouch.models.seeding import seeded as _seeded
from retouch.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "FAMILIES",
    "save_tiny_pipeline",
    "tiny_flux_config",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_pixart_config",
    "tiny_pixart_pipeline",
    "tiny_sd3_config",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_unet_config",
]

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("sd", "sdxl", "pixart", "sd3", "flux", "sd35", "qwenimage", "sana")

# Text-encoder widths. CLIP: 32 wide with a 32-d projection. T5: 32 wide, except SD3 whose joint attention
# width must hold the two CLIP hidden states concatenated (2 x 32), as T5-XXL (4096) holds CLIP-L + CLIP-G.
_CLIP_WIDTH = 32
_T5_WIDTH = 32
_SD3_T5_WIDTH = 64


# --- the tiny denoisers' configs (also the tiny rows of benchmarks/scale.py) ----------------------------------
def tiny_unet_config(sample_size: int = 8) -> dict[str, Any]:
    """The tiny SD UNet: 2 cross-attention down / up blocks (32, 64 channels), 4 heads, cross-attention to 32-wide
    CLIP states."""
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
        "attention_head_dim": 4,  # diffusers' legacy name: this is the number of heads
        "cross_attention_dim": _CLIP_WIDTH,
    }  # fmt: skip


def tiny_pixart_config(sample_size: int = 8) -> dict[str, Any]:
    """The tiny PixArt transformer: 2 blocks, 2 heads x 24, patch 2, learned sigma, 32-wide T5 captions."""
    return {
        "num_attention_heads": 2, "attention_head_dim": 24, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "cross_attention_dim": 48, "caption_channels": _T5_WIDTH, "sample_size": sample_size, "patch_size": 2,
    }  # fmt: skip


def tiny_sd3_config(sample_size: int = 8, pos_embed_max_size: int = 32) -> dict[str, Any]:
    """The tiny SD3 transformer: 2 joint blocks, 4 heads x 8, patch 2, 64-wide joint text, 64-wide pooled."""
    return {
        "sample_size": sample_size, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": _SD3_T5_WIDTH,
        "caption_projection_dim": 32, "pooled_projection_dim": 2 * _CLIP_WIDTH,
        "pos_embed_max_size": pos_embed_max_size,
    }  # fmt: skip


def tiny_flux_config() -> dict[str, Any]:
    """The tiny Flux transformer: 1 double- and 2 single-stream blocks, 2 heads x 16, 32-wide T5 and CLIP."""
    return {
        "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": _T5_WIDTH, "pooled_projection_dim": _CLIP_WIDTH,
        "guidance_embeds": True, "axes_dims_rope": (4, 6, 6),
    }  # fmt: skip


def _clip_text_config(vocab_size: int, max_length: int) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text config matching :func:`build_clip_tokenizer` (bos 0, eos = pad 1).

    Two layers because SDXL / SD3 read the penultimate hidden state.
    """
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_CLIP_WIDTH,
        intermediate_size=2 * _CLIP_WIDTH,
        projection_dim=_CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style (gated-gelu) encoder matching :func:`build_t5_tokenizer`."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, **config: Any) -> AutoencoderKL:
    """An 8x-downsampling AutoencoderKL (4 blocks, 3 downsamples) with 8–16 channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        force_upcast=False,
        **config,
    ).eval()


def _sd_scheduler(prediction_type: str) -> DDIMScheduler:
    """DDIM with the Stable Diffusion 1.x / XL training schedule."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


def tiny_sd_pipeline(
    seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon", xl: bool = False
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A tiny random Stable Diffusion (1.x-style, or XL when ``xl``) pipeline.

    UNet: two levels (32 and 64 channels), both ``CrossAttn*Block2D`` plus a cross-attention mid block, so
    there are self- (``attn1``) and cross-attention (``attn2``) layers at two resolutions. VAE: 8x, 4 latent
    channels, SD's ``scaling_factor`` 0.18215. Text: a 2-layer CLIPTextModel (SDXL: plus a
    CLIPTextModelWithProjection, ``text_time`` added conditioning, cross-attention width 64 = 32 + 32).
    Scheduler: DDIM with SD's schedule (scaled_linear 0.00085–0.012, 1000 steps, ``steps_offset=1``,
    ``clip_sample=False``, ``set_alpha_to_one=False``).

    Args:
        seed: Weight seed; the global RNG is not touched.
        sample_size: UNet ``sample_size`` in latent pixels (default output ``8 * sample_size`` px).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (scheduler config; the random UNet is the same).
        xl: Build a :class:`StableDiffusionXLPipeline` instead.
    """
    scheduler = _sd_scheduler(prediction_type)
    tokenizer = build_clip_tokenizer()
    text_config = _clip_text_config(len(tokenizer), tokenizer.model_max_length)
    addition_time_embed_dim = 8
    unet_kwargs: dict[str, Any] = {"cross_attention_dim": _CLIP_WIDTH}
    if xl:
        unet_kwargs = {
            "cross_attention_dim": 2 * _CLIP_WIDTH,  # penultimate states of both encoders, concatenated
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": addition_time_embed_dim,
            # pooled text embedding (projection_dim) + 6 size/crop scalars, each Fourier-embedded
            "projection_class_embeddings_input_dim": _CLIP_WIDTH + 6 * addition_time_embed_dim,
        }
    with _seeded(seed):
        unet = UNet2DConditionModel(**{**tiny_unet_config(sample_size), **unet_kwargs}).eval()
        vae = _vae(latent_channels=4, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(text_config).eval()
        text_encoder_2 = CLIPTextModelWithProjection(text_config).eval() if xl else None

    if xl:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=build_clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_pixart_pipeline(
    seed: int = 0, sample_size: int | None = None, conditioned: bool = False
) -> PixArtAlphaPipeline:
    """A tiny random PixArt-α pipeline.

    Transformer: 2 blocks, 2 heads × 24 (width 48, divisible by 3 as the size embedder needs), patch 2,
    ``out_channels = 8 = 2 × 4`` (learned sigma; the pipeline keeps the first half), cross-attention to a
    2-layer 32-wide T5 encoder. VAE: 8x, 4 latent channels. Scheduler: DPMSolverMultistepScheduler with
    PixArt-α's config (linear betas 0.0001–0.02, dpmsolver++, order 2, midpoint, lower_order_final,
    linspace spacing, epsilon).

    Args:
        seed: Weight seed; the global RNG is not touched.
        sample_size: Transformer ``sample_size`` in latent pixels; default 8 (64 px), or 128 when
            ``conditioned``.
        conditioned: Resolution / aspect-ratio micro-conditioning (``use_additional_conditions=True``), as
            in PixArt-XL-2-1024-MS. Requires ``sample_size == 128`` (the pipeline passes the conditions only
            then).

    Raises:
        ValueError: if ``conditioned`` and ``sample_size != 128``.
    """
    if sample_size is None:
        sample_size = 128 if conditioned else 8
    if conditioned and sample_size != 128:
        raise ValueError(
            "PixArtAlphaPipeline feeds resolution/aspect-ratio conditions only to a transformer with "
            f"sample_size == 128; got sample_size={sample_size} with conditioned=True"
        )
    tokenizer = build_t5_tokenizer(max_length=120)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
        prediction_type="epsilon",
    )
    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            **tiny_pixart_config(sample_size), use_additional_conditions=conditioned
        ).eval()
        vae = _vae(latent_channels=4, scaling_factor=0.18215)
        text_encoder = _t5_encoder(tokenizer, _T5_WIDTH)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8, pos_embed_max_size: int = 32) -> StableDiffusion3Pipeline:
    """A tiny random Stable Diffusion 3 pipeline.

    Transformer: 2 joint (MMDiT) blocks (the last is ``context_pre_only`` as in SD3), 4 heads × 8, patch 2.
    Text: two 2-layer CLIPTextModelWithProjection (32 wide, 32-d projection; pooled width 64) and a 2-layer
    64-wide T5 (``joint_attention_dim`` 64, which the concatenated CLIP states are padded to). VAE: 8x,
    16 latent channels, no quant convs, SD3's ``scaling_factor`` 1.5305 / ``shift_factor`` 0.0609.
    Scheduler: FlowMatchEulerDiscreteScheduler with ``shift=3.0``.

    Args:
        seed: Weight seed; the global RNG is not touched.
        sample_size: Transformer ``sample_size`` in latent pixels (default output ``8 * sample_size`` px).
        pos_embed_max_size: Side of the position-embedding grid, in patches; latents up to
            ``2 * pos_embed_max_size`` (images up to ``16 * pos_embed_max_size`` px) per side are accepted.
    """
    tokenizer = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer(max_length=256)
    text_config = _clip_text_config(len(tokenizer), tokenizer.model_max_length)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    with _seeded(seed):
        transformer = SD3Transformer2DModel(**tiny_sd3_config(sample_size, pos_embed_max_size)).eval()
        vae = _vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModelWithProjection(text_config).eval()
        text_encoder_2 = CLIPTextModelWithProjection(text_config).eval()
        text_encoder_3 = _t5_encoder(tokenizer_3, _SD3_T5_WIDTH)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny random Flux (dev-style, guidance-distilled) pipeline.

    Transformer: 1 double-stream and 2 single-stream blocks, 2 heads × 16, RoPE axes (4, 6, 6),
    ``guidance_embeds=True``, ``in_channels = 64 = 4 × 16`` (2×2 latent packing). Text: a 2-layer
    CLIPTextModel (pooled output, 32 wide) and a 2-layer 32-wide T5. VAE: 8x, 16 latent channels, no quant
    convs, Flux's ``scaling_factor`` 0.3611 / ``shift_factor`` 0.1159. Scheduler: FlowMatchEulerDiscrete with
    Flux's dynamic shifting (``base_shift`` 0.5, ``max_shift`` 1.15, image sequence 256–4096).

    Flux has no ``sample_size``: the pipeline's default output is 1024 px, so pass ``height``/``width``.

    Args:
        seed: Weight seed; the global RNG is not touched.
    """
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer(max_length=512)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    with _seeded(seed):
        transformer = FluxTransformer2DModel(**tiny_flux_config()).eval()
        vae = _vae(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer), tokenizer.model_max_length)).eval()
        text_encoder_2 = _t5_encoder(tokenizer_2, _T5_WIDTH)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_pipeline(family: str, **kwargs: Any) -> DiffusionPipeline:
    """Build the tiny pipeline of ``family`` (one of :data:`FAMILIES`), forwarding ``kwargs`` to its factory.

    ``"sdxl"`` is :func:`tiny_sd_pipeline` with ``xl=True``.

    Raises:
        ValueError: for an unknown family.
    """
    factories: dict[str, Callable[..., DiffusionPipeline]] = {
        "sd": tiny_sd_pipeline,
        "sdxl": lambda **kw: tiny_sd_pipeline(xl=True, **kw),
        "pixart": tiny_pixart_pipeline,
        "sd3": tiny_sd3_pipeline,
        "flux": tiny_flux_pipeline,
    }
    from retouch.models import tiny_families  # Qwen-Image, Sana, SD3.5 (it never imports this module)

    def sd35(seed: int = 0, **kw: Any) -> DiffusionPipeline:
        return tiny_families.as_sd35(tiny_sd3_pipeline(seed=seed, **kw), seed=seed)

    factories.update(sd35=sd35, qwenimage=tiny_families.tiny_qwenimage_pipeline,
                     sana=tiny_families.tiny_sana_pipeline)  # fmt: skip
    if family not in factories:
        raise ValueError(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")
    return factories[family](**kwargs)


def save_tiny_pipeline(family: str, path: str | Path, **kwargs: Any) -> Path:
    """Build the tiny pipeline of ``family`` and save it as a folder loadable offline with
    ``DiffusionPipeline.from_pretrained(path)`` (``model_index.json``, one sub-folder per component,
    safetensors weights, ``tokenizer.json`` tokenizers).

    Returns:
        The folder, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    pipeline = tiny_pipeline(family, **kwargs)
    pipeline.save_pretrained(path)
    logger.info("saved tiny %s pipeline to %s", family, path)
    return path
