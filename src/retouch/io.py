"""Image input/output: robust loading (EXIF, RGBA, greyscale, 16-bit), size policies, atomic writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE_POLICIES = ("resize", "crop", "strict")

log = logging.getLogger(__name__)

MAX_PIXELS = 150_000_000
"""Largest image (width x height) :func:`load_image` decodes: a 10000x10000 photo passes, a decompression bomb
(a small file claiming a huge canvas) is refused before its pixels are decoded. ``max_pixels`` overrides it."""


class ImageError(ValueError):
    """An input image that cannot be used."""


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB.

    EXIF orientation is applied; RGBA / LA / palette-with-alpha images are composited on white; greyscale
    is expanded to RGB; 16-bit and 32-bit images are scaled to 8 bits (not clipped).

    Args:
        path: a file path (``str`` or ``os.PathLike``). For images already in memory use :func:`as_image`.
        max_pixels: refuse images with more pixels than this (decompression bombs); ``None``: no limit.

    Raises:
        TypeError: ``path`` is not a path.
        ImageError: the file is missing, a directory, empty, corrupt, not an image, has no pixels or more
            than ``max_pixels``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"load_image takes a file path (str or os.PathLike), got {type(path).__name__}; "
            "for a PIL image, numpy array or tensor use retouch.io.as_image"
        )
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if p.is_dir():
        raise ImageError(f"expected an image file, got a directory: {p}")
    if p.stat().st_size == 0:
        raise ImageError(f"image file is empty: {p}")
    try:
        with warnings.catch_warnings():
            # retouch checks the size itself (below), before decoding; PIL's own limits are lifted here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _check_pixels(im.size, max_pixels, str(p))
                im.load()
                img = ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # a frame of an animated file larger than the first
        raise ImageError(f"image {p} is too large to decode safely (a decompression bomb?): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image (or an unsupported format): {p}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image {p}: {exc}") from None
    return to_rgb(img)


def _check_pixels(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {what} has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"image {what} is {w}x{h} = {w * h / 1e6:.0f} megapixels, more than the {max_pixels / 1e6:.0f} "
            "megapixels retouch decodes (a decompression bomb?); shrink it first, or pass max_pixels"
        )


def as_image(image: Any, *, name: str = "image", max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Any supported image input -> 8-bit RGB PIL image.

    Accepted: a PIL image (any mode); a file path (``str`` / ``os.PathLike``, read by :func:`load_image`);
    a numpy array ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` (uint8 0-255, or float in [0, 1]); a torch tensor
    ``[3, H, W]`` or ``[1, 3, H, W]`` (float in [0, 1], or uint8), the torchvision convention.

    Raises:
        TypeError: anything else (the message names ``name`` and what it accepts).
        ImageError: an empty image, or values out of range.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, f"{name} ({image.mode})")
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, max_pixels=max_pixels)
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageError(f"{name}: a tensor must be [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
        return as_image(t.permute(1, 2, 0).cpu().numpy(), name=name, max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ImageError(f"{name}: an array must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}")
        _check_pixels((arr.shape[1], arr.shape[0]), max_pixels, name)
        if arr.dtype == np.uint8:
            pass
        elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
            raise ImageError(f"{name}: integer arrays must be uint8 (0-255), got {arr.dtype}")
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
                raise ImageError(f"{name}: float arrays / tensors must hold values in [0, 1]")
            arr = np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
        else:
            raise ImageError(f"{name}: unsupported array dtype {arr.dtype}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    raise TypeError(
        f"{name} must be a PIL image, a file path, a numpy array [H, W(, 3|4)] or a tensor [3, H, W], "
        f"got {type(image).__name__}"
    )


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
    "crop" (scale to cover, centre-crop), or "strict" (refuse any change). Returns the image and a note.

    Large reductions (a photo to a model's native size) first shrink by whole factors (PIL's
    ``reducing_gap``), which keeps them fast and memory-bounded for 100-megapixel inputs."""
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
        return img.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0), note
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
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
    x = np.asarray(a)
    y = np.asarray(b)
    if x.shape != y.shape:
        raise ValueError(f"PSNR of images of different shapes {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("PSNR of empty images")
    rows = max(1, 4_000_000 // max(1, x[:1].size))  # row blocks: bounded memory for 100-megapixel images
    total = 0.0
    for i in range(0, x.shape[0], rows):
        d = x[i : i + rows].astype(np.float64) - y[i : i + rows].astype(np.float64)
        total += float(np.sum(d * d))
    mse = total / x.size
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
        os.chmod(tmp_path, 0o666 & ~_umask())
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


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM (delivered on exit) so that a group of renames is not cut in the middle."""
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if not can:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` on Linux; 0o022 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_all(
    items: Sequence[tuple[str | os.PathLike[str], Callable[[Path], None]]], committed: list[Path] | None = None
) -> list[Path]:
    """Write several files all-or-nothing: each ``write(tmp)`` fills a temporary file beside its destination,
    then every temporary is renamed onto its destination with interrupts held. If anything fails (or a signal
    lands) before the renames, no destination is touched; if a rename fails, the destinations already renamed
    are put back as they were. No temporary file survives. ``committed`` (if given) receives the destinations
    once all are in place, before held signals are delivered."""
    staged: list[tuple[Path, Path]] = []
    backups: list[tuple[Path, Path | None]] = []
    try:
        for dest_, write in items:
            dest = Path(dest_)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            staged.append((Path(tmp), dest))
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        with _signals_deferred():
            try:
                for tmp, dest in staged:
                    backup = None
                    if dest.exists():
                        fd, b = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".bak", dir=dest.parent)
                        os.close(fd)
                        backup = Path(b)
                        os.replace(dest, backup)
                    backups.append((dest, backup))
                    os.replace(tmp, dest)
            except BaseException:
                for dest, backup in reversed(backups):
                    if backup is not None:
                        os.replace(backup, dest)
                    else:
                        dest.unlink(missing_ok=True)
                backups.clear()
                raise
            for _, backup in backups:
                if backup is not None:
                    backup.unlink(missing_ok=True)
            if committed is not None:
                committed.extend(dest for _, dest in staged)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [dest for _, dest in staged]


def image_writer(img: Image.Image, path: str | os.PathLike[str]) -> Callable[[Path], None]:
    """A ``write(tmp)`` for :func:`write_all` that saves ``img`` in the format of ``path``'s extension."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image extension for output {path}; use .png, .jpg or .webp")
    return lambda p: img.save(p, format=fmt)


def json_writer(obj: Any) -> Callable[[Path], None]:
    """A ``write(tmp)`` for :func:`write_all` that writes ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    return lambda p: p.write_text(text + "\n")


def check_writable(path: str | os.PathLike[str], label: str, *, directory: bool = False) -> Path:
    """Check before any work that ``path`` (a file, or a folder with ``directory``) can be written: it is not
    of the other kind, and it (or its nearest existing parent) is a folder that accepts a new file. Raises
    ``ValueError`` naming ``label``."""
    p = Path(path)
    if p.exists():
        if directory and not p.is_dir():
            raise ValueError(f"{label} {p} is a file; give a folder")
        if not directory and p.is_dir():
            raise ValueError(f"{label} {p} is a directory; give a file name")
    probe_dir = p if directory and p.is_dir() else p.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ValueError(f"{label} {p} cannot be created: {probe_dir} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".retouch-probe.", dir=probe_dir)
    except OSError as exc:
        raise ValueError(f"{label} {p} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(tmp)
    return p
