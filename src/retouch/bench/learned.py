"""Learned metrics: DINO keys self-similarity (structure distance), CLIP score, LPIPS-SqueezeNet.

Nothing is loaded at import. Models load by hub id (or local folder) through ``transformers`` (DINO, CLIP) or
through ``torchmetrics`` / ``lpips`` (LPIPS, which also needs ``torchvision``): ``pip install 'retouch[bench]'``.
When the weights are not in the local Hugging Face cache and the hub cannot be reached (``HF_HUB_OFFLINE=1``,
no network) or a package is missing, loading raises :class:`MetricUnavailable` naming what is missing.

What PIE-Bench's evaluator does, and what is reproduced here:

* **Structure distance** (``LossG.calculate_global_ssim_loss``): DINO ViT-B/8 (``torch.hub`` ``dino_vitb8``; here
  the same weights as ``facebook/dino-vitb8`` in ``transformers``). The image is a float tensor **in 0..255**
  (PIE never divides by 255: its ``calculate_structure_distance`` casts the uint8 array to float32), resized by
  torchvision's ``Resize(224, max_size=480)`` (bilinear; torchvision 0.13.1, which PIE pins, does not antialias
  tensors) and normalised with the ImageNet mean / std. The keys of the last block (index 11) for every token
  (CLS included), heads concatenated, give a cosine self-similarity matrix; the score is the MSE between the
  source's and the edit's matrices. The corrected variant divides by 255 first.
* **CLIP score** (torchmetrics ``CLIPScore("openai/clip-vit-large-patch14")``): ``100 · max(cos(E_img, E_txt), 0)``
  with the CLIP processor's resize / centre crop / normalisation (the PIL implementation, as the processor of
  the time) and the text cut at the model's maximum length.
* **LPIPS** (torchmetrics ``LearnedPerceptualImagePatchSimilarity(net_type="squeeze")``): inputs in [-1, 1].

Known deviations: the ``transformers`` DINO port uses ``layer_norm_eps`` from its config (the original uses
1e-6); on PIE's 0..255 inputs the activations are large and the difference is far below the reported digits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from retouch.bench.metrics import as_uint8, structure_distance_from_keys

log = logging.getLogger(__name__)

__all__ = [
    "CLIP_PIE",
    "DINO_PIE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipScorer",
    "DinoStructure",
    "LpipsScorer",
    "MetricUnavailable",
    "ViTKeys",
    "clip_score",
    "pie_dino_resize",
]

DINO_PIE = "facebook/dino-vitb8"
"""Hub id of DINO ViT-B/8 (the weights of PIE's ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')``)."""
CLIP_PIE = "openai/clip-vit-large-patch14"
"""Hub id of PIE's CLIP model."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetricUnavailable(ValueError):
    """A learned metric cannot run here: its package or weights are missing. The message says which."""


def _offline_hint() -> str:
    return (
        "download them once where the hub is reachable (e.g. `huggingface-cli download ID`), pass a local folder, "
        "or skip the learned metrics with --skip-learned"
    )


def _load(what: str, source: str, loader: Callable[[], Any]) -> Any:
    """Run ``loader`` and turn the hub's / filesystem's errors into :class:`MetricUnavailable`."""
    try:
        return loader()
    except ImportError as err:
        raise MetricUnavailable(
            f"{what} needs a package that is not installed ({err}); pip install 'retouch[bench]'"
        ) from None
    except (OSError, ValueError) as err:
        local = Path(source).expanduser().exists()
        where = "the local folder" if local else "the local Hugging Face cache, and the hub is not reachable"
        raise MetricUnavailable(
            f"{what}: the weights {source!r} could not be loaded (not found in {where}): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; " + _offline_hint().replace("ID", source)
        ) from None


# --------------------------------------------------------------------------------------------------------------
# ViT keys
# --------------------------------------------------------------------------------------------------------------

_KEY_PROJ = re.compile(r"(?:^|\.)layers?\.(\d+)\.(?:attention|self_attn)(?:\.attention)?\.(?:k_proj|key)$")


class ViTKeys:
    """Capture the key projection output of one transformer layer of a ViT (``transformers`` ViT or CLIP vision).

    Matches module names such as ``encoder.layer.11.attention.attention.key`` (transformers 4),
    ``layers.11.attention.k_proj`` (transformers 5) and ``encoder.layers.11.self_attn.k_proj`` (CLIP).
    """

    def __init__(self, model: nn.Module, layer: int = -1) -> None:
        found: dict[int, nn.Module] = {}
        for name, module in model.named_modules():
            m = _KEY_PROJ.search(name)
            if m is not None:
                found[int(m.group(1))] = module
        if not found:
            raise ValueError(f"no attention key projection found in {type(model).__name__}")
        index = sorted(found)[layer] if layer < 0 else layer
        if index not in found:
            raise ValueError(f"layer {layer} out of range: the model has key projections at {sorted(found)}")
        self.model = model
        self.layer = index
        self.module = found[index]

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        """Keys ``[T, D]`` (tokens incl. CLS, heads concatenated) of the first image of ``pixel_values``."""
        captured: list[Tensor] = []
        handle = self.module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=pixel_values, **kwargs)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the key projection was not called during the forward pass")
        return captured[0][0].float()  # [T, D]


def pie_dino_resize(height: int, width: int, size: int = 224, max_size: int = 480) -> tuple[int, int]:
    """Output size of torchvision's ``Resize(size, max_size=max_size)``: the shorter side becomes ``size``, the
    longer ``int(size · long / short)``; if that exceeds ``max_size`` both are scaled so the longer is ``max_size``."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


class DinoStructure:
    """PIE-Bench's structure distance with a DINO ViT (default ViT-B/8, keys of the last block)."""

    def __init__(self, model: nn.Module, *, layer: int = -1, device: str | torch.device | None = None) -> None:
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        self.keys = ViTKeys(self.model, layer)

    @classmethod
    def from_pretrained(cls, source: str = DINO_PIE, *, device: str | torch.device | None = None) -> DinoStructure:
        def load() -> nn.Module:
            from transformers import ViTModel

            return ViTModel.from_pretrained(source, add_pooling_layer=False, torch_dtype=torch.float32)

        return cls(_load("structure distance (DINO ViT-B/8)", source, load), device=device)

    def preprocess(self, image: Image.Image | np.ndarray, *, unit_range: bool = False) -> Tensor:
        """``[1, 3, h, w]`` model input as PIE builds it (0..255 floats) or, with ``unit_range``, from [0, 1]."""
        arr = as_uint8(image).astype(np.float32)
        if unit_range:
            arr = arr / 255.0
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
        h, w = pie_dino_resize(x.shape[-2], x.shape[-1])
        if (h, w) != tuple(x.shape[-2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def image_keys(self, image: Image.Image | np.ndarray, *, unit_range: bool = False) -> Tensor:
        x = self.preprocess(image, unit_range=unit_range)
        cfg = getattr(self.model, "config", None)
        native = getattr(cfg, "image_size", None)
        kwargs = (
            {"interpolate_pos_encoding": True} if native is not None and tuple(x.shape[-2:]) != (native,) * 2 else {}
        )
        return self.keys(x, **kwargs)

    def distance(
        self, source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray, *, unit_range: bool = False
    ) -> float:
        """MSE of the keys self-similarity matrices; ``unit_range=False`` is PIE's 0..255 quirk."""
        return structure_distance_from_keys(
            self.image_keys(source, unit_range=unit_range), self.image_keys(edited, unit_range=unit_range)
        )


# --------------------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------------------


def _clip_image_processor(source: str) -> Any:
    """The PIL implementation of the CLIP image processor (PIE's era), else whatever transformers has."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(source)


def _features(out: Any) -> Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_score(image_features: Tensor, text_features: Tensor) -> float:
    """torchmetrics' CLIPScore of one pair: ``100 · max(cos(image, text), 0)``."""
    i = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
    t = text_features / text_features.norm(p=2, dim=-1, keepdim=True)
    return float(torch.clamp(100 * (i * t).sum(-1), min=0).reshape(-1)[0])


class ClipScorer:
    """CLIP score and CLIP-vision keys of a ``transformers`` CLIPModel (PIE's ViT-L/14, or shapes-clip)."""

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any, *, name: str = "clip") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.device = next(self.model.parameters()).device
        self._keys: ViTKeys | None = None

    @classmethod
    def from_pretrained(
        cls, source: str = CLIP_PIE, *, device: str | torch.device | None = None, what: str = "CLIP score"
    ) -> ClipScorer:
        def load() -> ClipScorer:
            from transformers import AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(source, torch_dtype=torch.float32)
            if device is not None:
                model.to(device)
            return cls(model, AutoTokenizer.from_pretrained(source), _clip_image_processor(source), name=source)

        return _load(what, source, load)

    def pixel_values(self, image: Image.Image | np.ndarray) -> Tensor:
        pil = Image.fromarray(as_uint8(image))
        return self.processor(images=[pil], return_tensors="pt")["pixel_values"].to(self.device, torch.float32)

    @torch.no_grad()
    def image_features(self, image: Image.Image | np.ndarray) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=self.pixel_values(image)))

    @torch.no_grad()
    def text_features(self, text: str) -> Tensor:
        tok = self.tokenizer([text], return_tensors="pt", padding=True)
        limit = int(self.model.config.text_config.max_position_embeddings)
        ids, attn = tok["input_ids"][:, :limit], tok["attention_mask"][:, :limit]  # torchmetrics cuts, no re-EOS
        return _features(
            self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=attn.to(self.device))
        )

    def score(self, image: Image.Image | np.ndarray, text: str, mask: np.ndarray | None = None) -> float:
        """``100 · max(cos, 0)``; with ``mask`` (bool [H, W]) the image is ``uint8(img · mask3)`` as PIE's "edited"."""
        arr = as_uint8(image)
        if mask is not None:
            arr = np.uint8(arr * np.asarray(mask, dtype=np.float64)[..., None])
        return clip_score(self.image_features(arr), self.text_features(text))

    def image_keys(self, image: Image.Image | np.ndarray, layer: int = -1) -> Tensor:
        """Keys ``[T, D]`` of a vision-tower layer (default the last) for the processor-normalised image."""
        if self._keys is None or (layer >= 0 and self._keys.layer != layer):
            self._keys = ViTKeys(self.model.vision_model, layer)
        return self._keys(self.pixel_values(image))

    def structure_distance(self, source: Image.Image | np.ndarray, edited: Image.Image | np.ndarray) -> float:
        """Keys self-similarity distance (PIE's formula) on this model's vision tower."""
        return structure_distance_from_keys(self.image_keys(source), self.image_keys(edited))


# --------------------------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------------------------


class LpipsScorer:
    """LPIPS with the SqueezeNet trunk: torchmetrics' implementation if installed, else the ``lpips`` package."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], *, name: str, device: torch.device) -> None:
        self.fn = fn
        self.name = name
        self.device = device

    @classmethod
    def load(cls, net: str = "squeeze", *, device: str | torch.device | None = None) -> LpipsScorer:
        dev = torch.device(device or "cpu")
        try:
            import torchvision  # noqa: F401  - both implementations build their trunk with it
        except Exception as err:  # noqa: BLE001 - a CPU/GPU build mismatch raises RuntimeError, not ImportError
            raise MetricUnavailable(
                f"LPIPS-SqueezeNet needs torchvision, which does not import here ({type(err).__name__}: {err}); "
                "install a torchvision matching torch and `pip install 'retouch[bench]'` (torchmetrics or lpips), "
                "or skip the learned metrics with --skip-learned"
            ) from None
        try:
            try:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False).to(dev).eval()
                return cls(lambda a, b: metric(a, b), name=f"torchmetrics-lpips-{net}", device=dev)
            except ImportError:
                import lpips

                model = lpips.LPIPS(net=net, verbose=False).to(dev).eval()
                return cls(lambda a, b: model(a, b).mean(), name=f"lpips-{net}", device=dev)
        except ImportError:
            raise MetricUnavailable(
                "LPIPS-SqueezeNet needs torchmetrics or lpips: pip install 'retouch[bench]', or pass --skip-learned"
            ) from None
        except (OSError, RuntimeError, ValueError) as err:  # the trunk's ImageNet weights are downloaded
            raise MetricUnavailable(
                f"LPIPS-SqueezeNet: the SqueezeNet 1.1 ImageNet weights (torchvision) or the LPIPS linear layers "
                f"could not be loaded ({str(err).splitlines()[0] if str(err) else type(err).__name__}); run once "
                "where the internet is reachable to fill the torch hub cache, or pass --skip-learned"
            ) from None

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> float:
        """LPIPS of two ``[1, 3, H, W]`` images in [-1, 1]."""
        return float(self.fn(x.to(self.device), y.to(self.device)))
