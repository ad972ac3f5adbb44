"""How much memory an edit needs, estimated before any model runs, and how much the machine has.

The estimate is a deliberately simple model of the working memory an edit adds on top of the loaded weights
(``benchmarks/memory_estimate.py`` checks it against measured peaks on the embedded models):

* **activations**: every attention layer keeps its image tokens' hidden states alive for a few tensors at once
  (input, Q, K, V, output): ``latent tokens x layers x batch x hidden width x 4 bytes x 6``;
* **attention**: the largest image-to-text attention map of one layer, materialised as scores and
  probabilities (what editors that read text attention do): ``batch x heads x image tokens x text tokens x
  4 bytes x 3``. Image-to-image attention runs in the fused ``scaled_dot_product_attention`` kernel, whose
  memory grows with the tokens, not their square, and is counted in the activations;
* **VAE**: the convolution activations of the autoencoder's decoder at full pixel size (the channels of its
  last two blocks), a few copies plus the 9-fold unfolded input of torch's CPU convolution, for two images
  (its mid-block attention is fused too).

``batch`` is the sampling batch: two branches (source and target), doubled under classifier-free guidance.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

GiB = 1024**3

ACTIVATION_COPIES = 6  # hidden states alive per layer and token (input, q, k, v, attention output, residual)
ATTENTION_COPIES = 3  # scores, probabilities and the softmax's temporary
VAE_COPIES = 4  # input, output and two intermediates of a resnet block
IM2COL = 9  # a 3x3 convolution's unfolded input (torch's CPU kernel)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes an edit adds to the loaded model, by part."""

    activations: int
    attention: int
    vae: int
    latent_tokens: int
    layers: int
    batch: int

    @property
    def total(self) -> int:
        return self.activations + self.attention + self.vae

    def describe(self) -> str:
        return (
            f"{self.total / GiB:.1f} GiB ({self.latent_tokens} latent tokens x {self.layers} attention layers x "
            f"batch {self.batch}: activations {self.activations / GiB:.2f} GiB, largest attention "
            f"{self.attention / GiB:.2f} GiB, VAE {self.vae / GiB:.2f} GiB)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total,
            "activations_bytes": self.activations,
            "attention_bytes": self.attention,
            "vae_bytes": self.vae,
            "latent_tokens": self.latent_tokens,
            "layers": self.layers,
            "batch": self.batch,
        }


def _text_tokens(backbone: Any) -> int:
    return sum(seg.length for seg in backbone.text_segments())


def estimate_edit_memory(backbone: Any, image_hw: tuple[int, int], *, batch: int | None = None) -> MemoryEstimate:
    """Estimate the working memory of an edit at pixel size ``image_hw`` on ``backbone`` (see module doc)."""
    h, w = image_hw
    f = backbone.vae_scale_factor
    latent_hw = (max(1, h // f), max(1, w // f))
    if batch is None:
        batch = 4 if backbone.uses_cfg else 2
    denoiser = backbone.denoiser
    n_text = _text_tokens(backbone)
    act = 0
    attn_peak = 0
    layers = backbone.attention_layers()
    for info in layers.values():
        gh, gw = info.resolution(latent_hw)
        n_img = gh * gw
        try:
            module = denoiser.get_submodule(info.name)
            heads = int(module.heads)
            width = int(module.to_q.out_features)
        except (AttributeError, TypeError):  # an attention module of unknown layout: assume a small one
            heads, width = 8, 512
        n_q = n_img + (n_text if info.kind in ("joint", "single") else 0)
        act += batch * n_q * width * 4 * ACTIVATION_COPIES
        attn_peak = max(attn_peak, batch * heads * n_img * n_text * 4 * ATTENTION_COPIES)
    vae_cfg = backbone.vae.config
    # the decoder's convolutions at full pixel size read the channels of its last two blocks; torch's own CPU
    # convolution (edit()'s deterministic default) unfolds a 3x3 input into 9 copies (im2col); two branches
    channels = max(int(c) for c in list(getattr(vae_cfg, "block_out_channels", (128,)))[:2])
    vae = 2 * h * w * channels * 4 * (VAE_COPIES + IM2COL)
    return MemoryEstimate(
        activations=act,
        attention=attn_peak,
        vae=vae,
        latent_tokens=latent_hw[0] * latent_hw[1],
        layers=len(layers),
        batch=batch,
    )


def available_memory(device: torch.device) -> int | None:
    """Free memory in bytes where ``device``'s tensors live: free accelerator memory, or the host's available
    RAM (``MemAvailable`` on Linux) for the CPU; ``None`` when it cannot be told."""
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        info = getattr(backend, "mem_get_info", None)
        if info is None:
            return None
        try:
            return int(info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


class MemoryLimitError(ValueError):
    """An edit that would need more memory than it may use."""


def check_memory(estimate: MemoryEstimate, device: torch.device, limit_bytes: float | None) -> int | None:
    """Refuse ``estimate`` above ``limit_bytes`` (``None``: the memory available on ``device`` now; ``inf``:
    no check). Returns the limit that was applied (``None`` when none could be told)."""
    if limit_bytes is not None and limit_bytes == float("inf"):
        return None
    source = "given limit"
    if limit_bytes is None:
        limit = available_memory(device)
        source = f"memory available on {device}"
        if limit is None:
            log.info("cannot tell the memory available on %s; no memory check", device)
            return None
    else:
        limit = int(limit_bytes)
    if estimate.total > limit:
        raise MemoryLimitError(
            f"this edit needs about {estimate.describe()}, more than the {limit / GiB:.1f} GiB {source}; "
            "work at a smaller size (--resolution native, --height/--width) or raise the limit with "
            "--max-memory GIB (Python: edit(..., memory_limit=bytes))"
        )
    return limit
