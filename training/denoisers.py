"""Stages ``sd``, ``pixart`` and ``flux``: text-conditional denoisers on the frozen VAE's 16×16×4 latents.

* **sd**: UNet2DConditionModel, ε-prediction, SD 1.x scaled-linear β (0.00085–0.012, 1000 steps).
* **pixart**: PixArtTransformer2DModel, ε-prediction on the first 4 of its 8 output channels (the learned-σ
  half is kept for PixArt-α's layout but not trained; the pipeline discards it), PixArt-α's linear β.
* **flux**: FluxTransformer2DModel, rectified flow ``x_t = (1 - t) x0 + t ε``, target ``v = ε - x0``, ``t``
  logit-normal then shifted by the same ``mu`` FluxPipeline's dynamic shifting uses at 64 tokens. The guidance
  embedding receives a scalar ``g ~ U[1, 5]`` during training but the target does not depend on it (no
  guidance distillation): sampling without CFG gives the conditional model at any ``guidance_scale``; use
  ``true_cfg_scale > 1`` with ``negative_prompt=""`` for classifier-free guidance (10% caption dropout).

Prompts are encoded with the pipeline's own ``encode_prompt``, so training sees exactly the conditioning the
stock pipeline produces. The text encoders are frozen, except that PixArt's and Flux's T5 can be fine-tuned
jointly with the denoiser (``train_text_encoder``): the denoiser has to bind each attribute word to its object,
and a T5 trained only contrastively does not contextualise the tokens enough for that. The shapes-clip text
tower (SD's encoder, Flux's pooled vector) stays frozen: it is also ShapesBench's CLIP score.

Latents come from a pool of renders encoded once by the frozen VAE (``pool.pt`` in the run directory), captions
are re-drawn with varied wording every step. The learning curve (oracle attribute accuracy of generated images on
held-out canonical captions) goes to ``evals.jsonl``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retouch.worlds import captions, oracle
from training import binding, data
from training.common import (
    RunDir,
    TrainConfig,
    atomic_torch_save,
    atomic_write_json,
    count_params,
    device_name,
    step_generator,
    step_rng,
    train_loop,
)
from training.pipelines import (
    FLUX_T5_LENGTH,
    PIXART_T5_LENGTH,
    Components,
    build_denoiser,
    build_pipeline,
    denoiser_config,
    load_components,
)

logger = logging.getLogger(__name__)

__all__ = [
    "encode_latents",
    "generate",
    "load_pipeline",
    "oracle_eval",
    "starting_t5",
    "train_denoiser",
    "flux_mu",
    "SAMPLING",
]

SAMPLING: dict[str, dict[str, Any]] = {
    "sd": {"num_inference_steps": 25, "guidance_scale": 4.0},
    "pixart": {"num_inference_steps": 20, "guidance_scale": 4.0},
    # not guidance-distilled: guidance_scale is inert, true CFG with the empty prompt (benchmarks/sampler_sweep.py)
    "flux": {"num_inference_steps": 25, "guidance_scale": 3.5, "true_cfg_scale": 4.0, "negative_prompt": ""},
}
"""Default text-to-image settings for evaluation, chosen by ``benchmarks/sampler_sweep.py`` on validation
captions (Flux: true classifier-free guidance, see the module docstring)."""


def flux_mu(image_seq_len: int = 64) -> float:
    """FluxPipeline's dynamic-shift ``mu`` (``calculate_shift`` with the scheduler's defaults)."""
    m = (1.15 - 0.5) / (4096 - 256)
    return image_seq_len * m + (0.5 - m * 256)


def latent_of(vae: Any, x: torch.Tensor, family: str) -> torch.Tensor:
    """Scaled latent the family's pipeline works in (Flux also subtracts ``shift_factor``)."""
    z = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    if family == "flux":
        z = z - shift
    return z * vae.config.scaling_factor


@torch.no_grad()
def encode_latents(vae: Any, scenes: list, family: str, batch: int = 128) -> torch.Tensor:
    """Scaled latents of ``scenes`` (64×64 renders), float16 ``[N, C, 16, 16]``."""
    device = next(vae.parameters()).device
    out = [
        latent_of(vae, data.render_batch(scenes[i : i + batch]).to(device), family).half().cpu()
        for i in range(0, len(scenes), batch)
    ]
    return torch.cat(out)


def _pool(
    run: RunDir, comps: Components, family: str, size: int, seed: int, max_objects: int
) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Training scenes, their latents and latent-resolution object masks; cached in ``pool.pt`` (recomputed if
    the size, family or world changed)."""
    scenes = data.sample_scenes(np.random.default_rng([seed, 424242]), size, max_objects)
    path = run.path / "pool.pt"
    key = {"size": size, "family": family, "seed": seed, "max_objects": max_objects}
    if path.exists():
        cached = torch.load(path, map_location="cpu")
        if all(cached.get(k, 3 if k == "max_objects" else None) == v for k, v in key.items()):
            if "masks" not in cached:  # pools written before the object-weighted loss existed
                cached["masks"] = latent_object_masks(scenes)
                atomic_torch_save(cached, path)
            return scenes, cached["latents"], cached["masks"]
    logger.info("encoding a pool of %d training scenes", size)
    latents = encode_latents(comps.vae, scenes, family)
    masks = latent_object_masks(scenes)
    atomic_torch_save({**key, "latents": latents, "masks": masks}, path)
    return scenes, latents, masks


def _conditioning(
    pipe: Any, family: str, prompts: list[str], device: torch.device, grad: bool = False
) -> dict[str, torch.Tensor]:
    """Encode prompts with the pipeline's own ``encode_prompt`` (no CFG), as keyword inputs of the denoiser;
    ``grad`` keeps the graph (a trained text encoder)."""
    with torch.set_grad_enabled(grad):
        if family == "sd":
            emb, _ = pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": emb}
        if family == "pixart":
            emb, mask, _, _ = pipe.encode_prompt(
                prompts, False, device=device, max_sequence_length=PIXART_T5_LENGTH, clean_caption=False
            )
            return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}
        emb, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=FLUX_T5_LENGTH)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": text_ids}


def _alphas_cumprod(pipe: Any) -> torch.Tensor:
    return pipe.scheduler.alphas_cumprod.float()


def diffusion_loss(
    family: str,
    model: nn.Module,
    pipe: Any,
    z0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    g: torch.Generator,
    offset_noise: float = 0.0,
    weight: torch.Tensor | None = None,
    timestep_weighting: str = "eps",
) -> torch.Tensor:
    """One training loss for a batch of clean latents ``z0`` ``[B, C, 16, 16]`` under conditioning ``cond``.

    ``offset_noise`` (ε-prediction families): add ``offset_noise · N(0, 1)`` per sample and channel, constant over
    the image, to the noise. SD 1.x's scaled-linear schedule ends at ᾱ = 0.0047, so at t = 999 a 16×16 latent's
    mean still shows through the noise (√ᾱ ≈ 0.07 of signal against a noise channel mean of std 1/16); the model then
    reads the background colour from the noise instead of the prompt, and sampling from pure noise gets it
    wrong. Offset noise hides that leak without changing the schedule.

    ``timestep_weighting`` (ε-prediction families; see :func:`timestep_weights`): ``"eps"`` is the plain ε MSE
    at uniform t; ``"v"`` is the v-prediction loss of the same ε-parameterised model, i.e. the ε error weighed by
    1/ᾱ_t, drawn as importance sampling: t ∝ 1/ᾱ_t and the plain ε MSE. Same expected gradient (up to a
    constant) as weighing uniform draws, but a batch's samples are spent where the weight is: under uniform
    draws 70% of them (t < 700) would carry 10% of the weight.
    """
    b = z0.shape[0]
    device = z0.device
    noise = torch.randn(z0.shape, generator=g, device=device)
    if offset_noise > 0 and family in ("sd", "pixart"):
        noise = noise + offset_noise * torch.randn((b, z0.shape[1], 1, 1), generator=g, device=device)
    if family in ("sd", "pixart"):
        if timestep_weighting == "eps":
            t = torch.randint(0, 1000, (b,), generator=g, device=device)
        else:
            density = timestep_weights(_alphas_cumprod(pipe), timestep_weighting).to(device)
            t = torch.multinomial(density, b, replacement=True, generator=g)
        a = _alphas_cumprod(pipe).to(device)[t].view(b, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        if family == "sd":
            pred = model(xt, t, **cond).sample
        else:
            pred = model(xt, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **cond).sample[
                :, : z0.shape[1]
            ]
        return _weighted_mse(pred, noise, weight)
    # flux: rectified flow with logit-normal, shifted t
    s = torch.sigmoid(torch.randn((b,), generator=g, device=device))
    shift = math.exp(flux_mu(z0.shape[-2] * z0.shape[-1] // 4))
    t = shift * s / (1 + (shift - 1) * s)
    tt = t.view(b, 1, 1, 1)
    xt = (1 - tt) * z0 + tt * noise
    target = noise - z0
    h, w = z0.shape[-2:]
    packed = pipe._pack_latents(xt, b, z0.shape[1], h, w)  # [B, h/2*w/2, 16]
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, z0.dtype)
    guidance = 1 + 4 * torch.rand((b,), generator=g, device=device)
    pred = model(hidden_states=packed, timestep=t, guidance=guidance, img_ids=img_ids, return_dict=False, **cond)[0]
    pred = pipe._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
    return _weighted_mse(pred, target, weight)


TIMESTEP_WEIGHTINGS = ("eps", "v")


def timestep_weights(alphas_cumprod: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-timestep weights of the ε MSE, ``[T]``, mean 1 over the schedule (training draws t in proportion).

    ``"eps"``: all 1. ``"v"``: ∝ 1/ᾱ_t. An ε error δ at step t is an x₀ error δ·√(1-ᾱ_t)/√ᾱ_t and a v error
    δ/√ᾱ_t, so the plain ε loss gives the high-noise steps, where the layout of a sample is decided, almost no
    weight: on SD 1.x's scaled-linear schedule an ε error δ at t = 961 is an x₀ error of 11.7 δ (at t = 0, of
    0.03 δ), yet the two count the same. Weighing by 1/ᾱ_t trains the v loss instead (what SD 2.x trains) while
    the model stays ε-parameterised, so the pipeline and every inversion are unchanged.
    """
    if kind == "eps":
        return torch.ones_like(alphas_cumprod)
    if kind == "v":
        w = 1.0 / alphas_cumprod
        return w / w.mean()
    raise ValueError(f"timestep weighting {kind!r}: expected one of {', '.join(TIMESTEP_WEIGHTINGS)}")


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error, weighted per latent pixel (``weight`` ``[B, 1, h, w]``, normalised to mean 1)."""
    if weight is None:
        return F.mse_loss(pred, target)
    return ((pred - target).square() * weight).mean() / weight.mean()


def latent_object_masks(scenes: list, factor: int = 4, batch: int = 4096) -> torch.Tensor:
    """``[N, 1, H/f, W/f]`` bool: latent pixels that an object (or the pixel ring around it) touches."""
    from training.vae import object_masks

    out = [
        F.max_pool2d(object_masks(scenes[i : i + batch], 64, 64), factor).bool() for i in range(0, len(scenes), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def generate(
    pipe: Any, family: str, prompts: list[str], seed: int = 0, batch: int = 50, **overrides: Any
) -> list[np.ndarray]:
    """Text-to-image with the stock pipeline; uint8 64×64 images."""
    kwargs = {**SAMPLING[family], **overrides}
    if family == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False, max_sequence_length=PIXART_T5_LENGTH)
    if family == "flux":
        kwargs.update(max_sequence_length=FLUX_T5_LENGTH)
    images: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        g = torch.Generator().manual_seed(seed + i)
        call = dict(kwargs)
        if isinstance(call.get("negative_prompt"), str):  # one negative prompt per prompt of the batch
            call["negative_prompt"] = [call["negative_prompt"]] * len(chunk)
        out = pipe(prompt=chunk, height=64, width=64, generator=g, output_type="np", **call).images
        images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return images


def load_pipeline(name: str | Path) -> tuple[Any, str, dict[str, Any]]:
    """An embedded model (name or folder) in its stock pipeline class, float32, progress bars off; with its
    family and the world it learned (``world.json``)."""
    import diffusers

    from retouch.backbones import PIPELINE_FAMILIES
    from retouch.models import registry

    path = Path(registry.resolve(str(name)))
    index = path / "model_index.json"
    if not index.exists():
        raise ValueError(f"{path}: no model_index.json, not a diffusers pipeline folder")
    cls = json.loads(index.read_text())["_class_name"]
    family = PIPELINE_FAMILIES.get(cls)
    if family not in SAMPLING:
        raise ValueError(f"{path}: {cls} is not an embedded text-to-image pipeline (sd, pixart, flux)")
    pipe = getattr(diffusers, cls).from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, registry.world_of(path)


def oracle_eval(
    pipe: Any, family: str, n: int = 100, seed: int = 0, max_objects: int = 3, **overrides: Any
) -> dict[str, float]:
    """Oracle attribute accuracy of images generated from ``n`` held-out canonical captions."""
    scenes = data.held_out_scenes(n, max_objects=max_objects)
    images = generate(pipe, family, [data.caption_of(s) for s in scenes], seed=seed, **overrides)
    return {k: round(v, 4) for k, v in oracle.attribute_accuracy(images, scenes).items()}


def init_weights(model: nn.Module, source: str | Path) -> None:
    """Load ``source``'s weights into ``model`` (same class and config; float16 folders are upcast)."""
    source = Path(source)
    sub = next((d for d in ("unet", "transformer") if (source / d / "config.json").exists()), None)
    folder = source / sub if sub else source
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--init-from {source}: no diffusers model folder (config.json) there")
    src = type(model).from_pretrained(str(folder), torch_dtype=torch.float32)
    theirs, ours = src.state_dict(), model.state_dict()
    if set(theirs) != set(ours) or any(theirs[k].shape != ours[k].shape for k in ours):
        raise ValueError(f"--init-from {folder}: its weights do not fit this denoiser's config")
    model.load_state_dict(theirs)
    logger.info("initialised the denoiser from %s", folder)


T5_FOLDER = {"pixart": "text_encoder", "flux": "text_encoder_2"}
"""Where a pipeline folder of each T5 family keeps its T5 encoder."""


def starting_t5(family: str, comps: Components, init_from: str | Path | None) -> Any:
    """The T5 a phase starts from: the one in ``init_from``'s pipeline folder when it has one (an earlier phase
    may have fine-tuned it, and its denoiser was trained on it), else the components' T5."""
    from transformers import T5EncoderModel

    folder = Path(init_from) / T5_FOLDER[family] if init_from is not None else None
    if folder is not None and (folder / "config.json").exists():
        t5 = T5EncoderModel.from_pretrained(str(folder)).float()
        if t5.config.d_model != comps.t5_width or t5.config.vocab_size != comps.t5.config.vocab_size:
            raise ValueError(f"--init-from {init_from}: its T5 does not fit the components' T5")
        logger.info("T5 from %s", folder)
        return t5
    return copy.deepcopy(comps.t5)


def clip_tower(components: str | Path) -> str | None:
    """Which shapes-clip text tower the components hold: ``"phase 2 (binding)"`` after ``clip-bind``,
    ``"phase 2 (binding, scene labels)"`` after ``clip-bind --scene-weight``, ``"phase 1"`` after the
    contrastive stage alone, ``None`` when the stage left no metrics (a runs directory rebuilt from the embedded
    weights)."""
    metrics = Path(components) / "clip" / "metrics.json"
    if not metrics.exists():
        return None
    from training.text import has_binding_phase

    record = json.loads(metrics.read_text())
    if not has_binding_phase(record):
        return "phase 1"
    return "phase 2 (binding, scene labels)" if record.get("scene_weight") else "phase 2 (binding)"


def _init_record(source: str | Path | None) -> dict[str, Any] | None:
    """What a run started from, for its config and card: the folder and, if present, its ``world.json`` and
    ``training.json`` (the earlier phase's record)."""
    if source is None:
        return None
    source = Path(source)
    record: dict[str, Any] = {"path": str(source)}
    for name in ("world.json", "training.json"):
        if (source / name).exists():
            record[name.removesuffix(".json")] = json.loads((source / name).read_text())
    return record


def train_denoiser(
    family: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    components: str | Path,
    size: str = "small",
    resume: bool = True,
    pool_size: int = 16384,
    dropout: float = 0.1,
    eval_n: int = 100,
    max_objects: int = 3,
    offset_noise: float = 0.0,
    offset_from: int = 0,
    init_from: str | Path | None = None,
    object_loss_weight: float = 1.0,
    timestep_weighting: str = "eps",
    train_text_encoder: bool = False,
    binding_loss_weight: float = 0.0,
    device: torch.device | None = None,
) -> nn.Module:
    """Train one family's denoiser in run directory ``out``; the EMA weights go to ``out/final``.

    Args:
        components: the runs directory holding the ``vae``, ``clip`` and ``t5`` stages' ``final`` folders.
        size: denoiser size preset (:func:`~training.pipelines.denoiser_config`).
        pool_size: training scenes rendered and encoded once (cached in ``pool.pt``).
        dropout: probability of replacing a caption by "" (classifier-free guidance).
        eval_n: held-out captions per learning-curve evaluation (0 = no evaluation).
        max_objects: the world the model learns: scenes of 1..``max_objects`` objects (training and evaluation).
        offset_noise: offset-noise strength (see :func:`diffusion_loss`), applied from step ``offset_from`` on.
        init_from: a diffusers folder (a model, or a pipeline with a ``unet`` / ``transformer`` folder) whose
            weights start a new run (ignored when resuming from a checkpoint): a later training phase, e.g. on
            a wider world or another machine, continues from an earlier phase's (EMA) weights.
        object_loss_weight: weight of the loss on latent pixels that objects touch, relative to background
            ones (1 = plain MSE). Objects cover a few percent of a scene, so an unweighted loss is dominated by
            the background; shape and fill are carried by the object pixels.
        timestep_weighting: ``"eps"`` or ``"v"`` (SD and PixArt; see :func:`timestep_weights`).
        train_text_encoder: fine-tune the T5 (PixArt, Flux) jointly with the denoiser, same optimiser and EMA;
            its EMA weights go to ``out/final_t5``. PixArt and Flux runs always write ``final_t5`` (the T5 their
            denoiser was trained on: from ``init_from`` when that folder has one) and ``assemble`` uses it.
        binding_loss_weight: weight of the auxiliary attribute-binding loss on the trained T5's token states
            (:mod:`training.binding`; needs ``train_text_encoder``); 0 = off.
    """
    if train_text_encoder and family not in T5_FOLDER:
        raise ValueError(
            f"train_text_encoder: {family} has no T5; its CLIP text tower is shared with shapes-clip and stays frozen"
        )
    if binding_loss_weight and not train_text_encoder:
        raise ValueError("binding_loss_weight needs train_text_encoder (the loss trains the T5)")
    if timestep_weighting not in TIMESTEP_WEIGHTINGS:
        raise ValueError(f"timestep_weighting {timestep_weighting!r}: expected one of {', '.join(TIMESTEP_WEIGHTINGS)}")
    if timestep_weighting != "eps" and family == "flux":
        raise ValueError("timestep_weighting: flux trains a velocity with its own timestep density; only 'eps' applies")
    device = device or torch.device("cpu")
    run = RunDir(Path(out))
    comps = copy.copy(load_components(components, device))
    if family in T5_FOLDER:
        # A trained T5 is then overwritten by the checkpoint when the run resumes.
        comps.t5 = starting_t5(family, comps, init_from).to(device)
        comps.t5.requires_grad_(train_text_encoder).train(train_text_encoder)
    config = denoiser_config(
        family, size, text_width=comps.text_width, t5_width=comps.t5_width, latent_channels=comps.latent_channels
    )
    model = build_denoiser(family, config)
    if init_from is not None and not (resume and run.checkpoint.exists()):
        init_weights(model, init_from)
    model = model.to(device)
    init_record = _init_record(init_from)
    if resume and run.checkpoint.exists() and (run.path / "config.json").exists():
        # the folder may since hold this very run's result: keep the record of what the run started from
        init_record = json.loads((run.path / "config.json").read_text()).get("init_from", init_record)
    atomic_write_json(
        run.path / "config.json",
        {
            "family": family,
            "size": size,
            "denoiser": config,
            "train": cfg.__dict__,
            "pool_size": pool_size,
            "world": {"max_objects": max_objects},
            "offset_noise": {"strength": offset_noise, "from_step": offset_from},
            "init_from": init_record,
            "object_loss_weight": object_loss_weight,
            "timestep_weighting": timestep_weighting,
            "train_text_encoder": train_text_encoder,
            "binding_loss_weight": binding_loss_weight,
            "clip_tower": clip_tower(components),
            "device": device_name(device),
        },
    )
    logger.info("%s denoiser: %d parameters", family, count_params(model))
    pipe = build_pipeline(family, model, comps)
    pipe.set_progress_bar_config(disable=True)
    scenes, latents, masks = _pool(run, comps, family, pool_size, cfg.seed, max_objects)

    heads = binding.BindingHeads(comps.t5_width).to(device) if binding_loss_weight else None
    t5_tokenizer = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer
    t5_length = FLUX_T5_LENGTH if family == "flux" else PIXART_T5_LENGTH

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = step_rng(cfg.seed, step)
        idx = rng.integers(len(scenes), size=cfg.batch_size)
        # the same draws as data.caption_of(scene, rng), keeping the wording for the binding labels
        wordings = [None if rng.random() < dropout else captions.sample_wording(rng) for _ in idx]
        prompts = [
            "" if w is None else captions.caption(scenes[i], wording=w) for i, w in zip(idx, wordings, strict=True)
        ]
        z0 = latents[torch.from_numpy(idx)].float().to(device)
        weight = None
        if object_loss_weight != 1.0:
            weight = 1.0 + (object_loss_weight - 1.0) * masks[torch.from_numpy(idx)].float().to(device)
        cond = _conditioning(pipe, family, prompts, device, grad=train_text_encoder)
        offset = offset_noise if step >= offset_from else 0.0
        g = step_generator(cfg.seed, step, device)
        loss = diffusion_loss(
            family, model, pipe, z0, cond, g, offset_noise=offset, weight=weight, timestep_weighting=timestep_weighting
        )
        if heads is None:
            return loss, {}
        objs = [None if w is None else scenes[i] for i, w in zip(idx, wordings, strict=True)]
        labels = binding.token_labels(t5_tokenizer, prompts, objs, wordings, t5_length)
        bind, metrics = binding.binding_loss(heads, cond["encoder_hidden_states"], labels)
        parts = {"diffusion": float(loss.detach()), "binding": float(bind.detach())}
        return loss + binding_loss_weight * bind, {**parts, **metrics}

    def eval_fn(step: int, modules: dict[str, nn.Module]) -> dict[str, float]:
        eval_comps = copy.copy(comps)
        if "text_encoder" in modules:
            eval_comps.t5 = modules["text_encoder"]
        eval_pipe = build_pipeline(family, modules["denoiser"], eval_comps)
        eval_pipe.set_progress_bar_config(disable=True)
        return {
            "n": eval_n,
            **oracle_eval(eval_pipe, family, n=eval_n, max_objects=max_objects, num_inference_steps=20),
        }

    modules: dict[str, nn.Module] = {"denoiser": model}
    if train_text_encoder:
        modules["text_encoder"] = comps.t5
    if heads is not None:
        modules["binding_heads"] = heads
    result = train_loop(run, modules, loss_fn, cfg, resume=resume, eval_fn=eval_fn if eval_n > 0 else None)
    final = result["ema"]["denoiser"]
    final.save_pretrained(run.path / "final")
    if family in T5_FOLDER:
        t5 = result["ema"].get("text_encoder", comps.t5)
        t5.save_pretrained(run.path / "final_t5")
        comps.t5_tokenizer.save_pretrained(run.path / "final_t5")
    atomic_write_json(
        run.path / "metrics.json",
        {
            "step": result["step"],
            "wall_s": round(result["wall_s"], 1),
            "params": count_params(final),
            "loss": result["loss"],
        },
    )
    return final
