"""Image input: every awkward file either converts cleanly or fails with a clear message."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retouch import io


def test_missing_directory_empty_corrupt_and_text(tmp_path):
    with pytest.raises(io.ImageError, match="not found"):
        io.load_image(tmp_path / "nope.png")
    with pytest.raises(io.ImageError, match="directory"):
        io.load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(io.ImageError, match="empty"):
        io.load_image(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(io.ImageError, match="not an image"):
        io.load_image(tmp_path / "notes.txt")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(io.ImageError, match="corrupt|not an image"):
        io.load_image(tmp_path / "trunc.png")


def test_rgba_greyscale_16bit_and_palette_convert(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    out = io.load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("L", (8, 8), 100).save(tmp_path / "g.png")
    assert io.load_image(tmp_path / "g.png").getpixel((1, 1)) == (100, 100, 100)
    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[0, 0], arr[0, 1] = 65535, 65535 // 2  # full scale and half scale, not clipped to 255
    Image.fromarray(arr).save(tmp_path / "i16.png")
    img16 = io.load_image(tmp_path / "i16.png")
    assert img16.getpixel((0, 0)) == (255, 255, 255) and img16.getpixel((1, 0)) == (127, 127, 127)
    assert img16.getpixel((2, 0)) == (0, 0, 0)
    Image.new("P", (8, 8)).save(tmp_path / "p.png")
    assert io.load_image(tmp_path / "p.png").mode == "RGB"


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (16, 8), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = io.load_image(tmp_path / "r.jpg")
    assert out.size == (8, 16)


def test_fit_size_policies():
    img = Image.new("RGB", (40, 20))
    assert io.fit_size(img, (16, 32), "resize")[0].size == (32, 16)
    cropped, note = io.fit_size(img, (32, 32), "crop")
    assert cropped.size == (32, 32) and note["changed"]
    with pytest.raises(io.ImageError, match="model takes"):
        io.fit_size(img, (32, 32), "strict")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "out.json", boom)
    assert list(tmp_path.iterdir()) == []


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert io.psnr(a, b) == float("inf")
    b[0, 0, 0] = 255
    assert io.psnr(a, b) == pytest.approx(10 * np.log10(48))  # MSE = 255^2 / 48
