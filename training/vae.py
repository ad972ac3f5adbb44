"""Stage ``vae``: an :class:`~diffusers.AutoencoderKL` for ShapesWorld, 64×64×3 → 16×16×4.

Two downsamples (three encoder blocks), narrow channels, one ResNet layer per block and the usual attention
mid block. Trained on renders (a mix of 64×64 and 64×128 batches) with L1 + MSE reconstruction loss on a
posterior sample and a tiny KL term. Objects cover a few percent of a scene, so the reconstruction loss weighs
pixels on and next to an object ``1 + object_weight`` times (without it the first thousand steps learn only
backgrounds, and the oracle cannot read the objects of the reconstructions). After training, ``scaling_factor``
is set to 1 / std and ``shift_factor`` to the mean of the held-out latents (SD uses only the scale; Flux/SD3
pipelines also use the shift).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from retouch.worlds import shapes
from training import data
from training.common import RunDir, TrainConfig, atomic_write_json, count_params, step_rng, train_loop

logger = logging.getLogger(__name__)

__all__ = [
    "build_vae",
    "latent_stats",
    "load_vae",
    "object_masks",
    "psnr",
    "reconstruction_oracle",
    "reconstruction_psnr",
    "train_vae",
    "vae_config",
]


def vae_config(
    block_out: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4, layers_per_block: int = 1, groups: int = 16
) -> dict[str, Any]:
    """AutoencoderKL config: ``len(block_out) - 1`` downsamples by 2."""
    n = len(block_out)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": groups,
        "sample_size": 64,
        "scaling_factor": 1.0,
    }


def build_vae(**kwargs: Any) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL (see :func:`vae_config`)."""
    return AutoencoderKL(**vae_config(**kwargs))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image between two ``[B, 3, H, W]`` tensors in [-1, 1] (peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, n: int = 256, offset: int = 0, batch: int = 64) -> dict[str, float]:
    """Mean PSNR (dB) of mean-latent reconstructions of held-out scenes at 64×64 and 64×128 (after 8-bit
    quantisation of the output, as a saved image would be)."""
    scenes = data.held_out_scenes(n, offset)
    out: dict[str, float] = {}
    device = next(vae.parameters()).device
    for name, (h, w) in {"psnr_64x64": (64, 64), "psnr_64x128": (64, 128)}.items():
        vals = []
        for i in range(0, n, batch):
            x = data.render_batch(scenes[i : i + batch], h, w).to(device)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            y = data.images_to_tensor(data.tensor_to_images(y)).to(device)
            vals.append(psnr(x, y))
        out[name] = float(torch.cat(vals).mean())
    return out


@torch.no_grad()
def reconstruction_oracle(vae: AutoencoderKL, n: int = 128, offset: int = 0, batch: int = 64) -> dict[str, float]:
    """Oracle attribute accuracy on mean-latent reconstructions of held-out 64×64 scenes: the ceiling of any
    denoiser trained on this VAE's latents."""
    from retouch.worlds import oracle

    scenes = data.held_out_scenes(n, offset)
    device = next(vae.parameters()).device
    images = []
    for i in range(0, n, batch):
        x = data.render_batch(scenes[i : i + batch]).to(device)
        images += data.tensor_to_images(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return {f"oracle_{k}": round(v, 4) for k, v in oracle.attribute_accuracy(images, scenes).items()}


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, n: int = 512, batch: int = 64) -> tuple[float, float]:
    """(mean, std) of the posterior-mean latents of ``n`` held-out scenes (64×64)."""
    scenes = data.held_out_scenes(n, offset=100_000)
    device = next(vae.parameters()).device
    zs = [vae.encode(data.render_batch(scenes[i : i + batch]).to(device)).latent_dist.mean for i in range(0, n, batch)]
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def object_masks(scenes: list, height: int, width: int) -> torch.Tensor:
    """``[B, 1, H, W]`` float mask of the pixels within one pixel of any object's silhouette."""
    masks = np.stack([np.any(shapes.render_masks(s, height, width), axis=0) for s in scenes])
    m = torch.from_numpy(masks).float()[:, None]
    return F.max_pool2d(m, 3, stride=1, padding=1)


def train_vae(
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = True,
    block_out: tuple[int, ...] = (32, 64, 64),
    groups: int = 16,
    latent_channels: int = 4,
    object_weight: float = 8.0,
    wide_fraction: float = 0.25,
    kl_weight: float = 1e-6,
    eval_n: int = 256,
    device: torch.device | None = None,
) -> AutoencoderKL:
    """Train the VAE in run directory ``out``; writes ``out/final`` (diffusers folder) and ``out/metrics.json``.

    Args:
        wide_fraction: share of steps whose batch is rendered at 64×128 instead of 64×64.
        kl_weight: weight of the KL term (tiny: the latent is nearly deterministic, as in SD's VAE).
        latent_channels: channels of the 16×16 latent.
        object_weight: extra loss weight of pixels within one pixel of an object's silhouette.
    """
    device = device or torch.device("cpu")
    run = RunDir(Path(out))
    vae = build_vae(block_out=block_out, groups=groups, latent_channels=latent_channels).to(device)
    logger.info("VAE: %d parameters", count_params(vae))

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = step_rng(cfg.seed, step)
        wide = rng.random() < wide_fraction
        bs = max(1, cfg.batch_size // 2) if wide else cfg.batch_size
        h, w = 64, 128 if wide else 64
        scenes = data.sample_scenes(rng, bs)
        x = data.render_batch(scenes, h, w).to(device)
        post = vae.encode(x).latent_dist
        g = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)
        y = vae.decode(z).sample
        weight = 1.0 + object_weight * object_masks(scenes, h, w).to(device)
        err = y - x
        mse = F.mse_loss(y, x)
        recon = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        kl = post.kl().mean() / x[0].numel()
        return recon + kl_weight * kl, {
            "mse": float(mse.detach()),
            "psnr": 10 * math.log10(4.0 / max(float(mse.detach()), 1e-12)),
        }

    def eval_fn(step: int, modules: dict) -> dict[str, float]:
        m = modules["vae"]
        return {**reconstruction_psnr(m, n=min(eval_n, 128)), **reconstruction_oracle(m, n=min(eval_n, 128))}

    result = train_loop(run, {"vae": vae}, loss_fn, cfg, resume=resume, eval_fn=eval_fn)
    final = result["ema"]["vae"]
    final.eval()
    mean, std = latent_stats(final, n=max(16, 2 * eval_n))
    final.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    metrics = {
        "step": result["step"],
        "wall_s": round(result["wall_s"], 1),
        "train": dict(cfg.__dict__),
        "params": count_params(final),
        "latent_mean": mean,
        "latent_std": std,
        **reconstruction_psnr(final, n=eval_n),
        **reconstruction_oracle(final, n=eval_n),
    }
    final.save_pretrained(run.path / "final")
    atomic_write_json(run.path / "metrics.json", metrics)
    logger.info("VAE done: %s", metrics)
    return final


def load_vae(path: str | Path, device: torch.device | None = None) -> AutoencoderKL:
    """Load a trained VAE folder, frozen, in eval mode."""
    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=torch.float32)
    return vae.to(device or torch.device("cpu")).eval().requires_grad_(False)
