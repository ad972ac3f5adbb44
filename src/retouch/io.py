"""Image input/output: robust loading (EXIF, RGBA, greyscale, 16-bit), size policies, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE_POLICIES = ("resize", "crop", "strict")


class ImageError(ValueError):
    """An input image that cannot be used."""


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as 8-bit RGB.

    EXIF orientation is applied; RGBA / LA / palette-with-alpha images are composited on white; greyscale
    is expanded to RGB; 16-bit and 32-bit images are scaled to 8 bits (not clipped).

    Raises:
        ImageError: the file is missing, a directory, empty, corrupt or not an image.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if p.is_dir():
        raise ImageError(f"expected an image file, got a directory: {p}")
    if p.stat().st_size == 0:
        raise ImageError(f"image file is empty: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or an unsupported format): {p}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image {p}: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, high bit depths rescaled)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def fit_size(img: Image.Image, target_hw: tuple[int, int], policy: str) -> tuple[Image.Image, dict[str, Any]]:
    """Bring ``img`` to ``target_hw`` by ``policy``: "resize" (bicubic, aspect may change slightly),
    "crop" (scale to cover, centre-crop), or "strict" (refuse any change). Returns the image and a note."""
    if policy not in SIZE_POLICIES:
        raise ValueError(f"unknown size policy {policy!r}; choose one of {SIZE_POLICIES}")
    w, h = img.size
    th, tw = target_hw
    note = {"input_size": [w, h], "model_size": [tw, th], "policy": policy, "changed": (w, h) != (tw, th)}
    if (w, h) == (tw, th):
        return img, note
    if policy == "strict":
        raise ImageError(f"image is {w}x{h} but the model takes {tw}x{th} here; use --size-policy resize or crop")
    if policy == "resize":
        return img.resize((tw, th), Image.Resampling.BICUBIC), note
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th)), note


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL -> ``[1, 3, H, W]`` float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` or ``[1, 3, H, W]`` in [-1, 1] -> 8-bit RGB PIL."""
    if x.ndim == 4:
        x = x[0]
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """PSNR in dB of two 8-bit images (inf when identical)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"PSNR of images of different shapes {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; nothing half-written is ever left at ``path``."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return dest


def save_image(img: Image.Image, path: str | os.PathLike[str]) -> Path:
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image extension for output {path}; use .png, .jpg or .webp")
    return atomic_write(path, lambda p: img.save(p, format=fmt))


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    return atomic_write(path, lambda p: p.write_text(text + "\n"))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
