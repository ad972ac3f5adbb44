"""The VAE ``shift_factor``: each family's adapter does what the family's diffusers pipeline does, and the embedded
folders say what their denoisers were trained with (``training.denoisers.latent_of``).

StableDiffusion(XL) and PixArt pipelines ignore ``shift_factor`` (real SD 1.x / 2.x / XL VAEs have none); SD3 and
Flux pipelines subtract it before scaling. Before issue 14 the adapters subtracted it for every family, so
shapes-sd and shapes-pixart (trained without it) saw every latent offset by ``-shift * scale`` ≈ 0.02.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from retouch.models import registry  # noqa: E402
from training.denoisers import latent_of  # noqa: E402

from conftest import tiny_backbone  # noqa: E402


def _pixels(seed: int = 0, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, side, side, generator=g) * 2 - 1


@pytest.mark.parametrize(("family", "uses_shift"), [("sd", False), ("pixart", False), ("sd3", True), ("flux", True)])
def test_adapter_follows_the_family_pipeline(family, uses_shift):
    bb = tiny_backbone(family)
    vae = bb.vae
    old = vae.config.get("shift_factor")
    vae.register_to_config(shift_factor=0.25)  # a shift every family's VAE could carry
    try:
        x = _pixels()
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
            z = bb.encode_image(x)
            expected = ((mean - 0.25) if uses_shift else mean) * vae.config.scaling_factor
            assert torch.allclose(z, expected, atol=1e-6)
            assert bb.shift_factor == (0.25 if uses_shift else 0.0)
            # decode is the inverse of the same map (what the family's pipeline decodes)
            want = vae.decode(z / vae.config.scaling_factor + (0.25 if uses_shift else 0.0)).sample
            assert torch.allclose(bb.decode(z), want, atol=1e-6)
    finally:
        vae.register_to_config(shift_factor=old)


def _vae_config(name: str) -> dict:
    return json.loads((registry.embedded_dir() / name / "vae" / "config.json").read_text())


@pytest.mark.parametrize("name", ["shapes-sd", "shapes-pixart"])
def test_sd_and_pixart_folders_carry_no_shift(name):
    """Trained without the shift (latent_of subtracts it only for Flux): the folder says so."""
    assert _vae_config(name)["shift_factor"] is None


def test_flux_folder_keeps_its_shift():
    assert _vae_config("shapes-flux")["shift_factor"] not in (None, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), [("shapes-sd", "sd"), ("shapes-pixart", "pixart")])
def test_embedded_latents_are_the_training_latents(name, family):
    """The adapter's latent of an image is exactly the latent the denoiser was trained on."""
    from diffusers import AutoencoderKL

    from retouch.backbones.pixart import PixArtBackbone
    from retouch.backbones.sd import SDBackbone

    vae = AutoencoderKL.from_pretrained(registry.embedded_dir() / name / "vae", torch_dtype=torch.float32)
    cls = SDBackbone if family == "sd" else PixArtBackbone

    class _VaeOnly(cls):  # the latent maps only need the VAE
        def __init__(self) -> None:
            self.pipe = type("P", (), {"vae": vae})()

        @property
        def dtype(self) -> torch.dtype:
            return torch.float32

    bb = _VaeOnly()
    x = _pixels(1, 64)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(x), latent_of(vae, x, family))
