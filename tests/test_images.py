import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from skin.images import (ImageLimits, ImageTooLargeError, ImageTooSmallError, UndecodableImageError,
                         UnsupportedImageTypeError, load_image)


def _bytes(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _photo(w=80, h=60):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def png_bomb(w=40_000, h=40_000) -> bytes:
    """A PNG whose header claims w x h pixels, with almost no data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA", "LA", "I;16", "P"])
def test_modes_become_rgb(mode):
    base = _photo()
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
        fmt = "PNG"
    elif mode == "P":
        img = base.convert("P")
        img.info["transparency"] = 0
        fmt = "PNG"
    else:
        img = base.convert(mode)
        fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
    out = load_image(_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == (80, 60)


def test_sixteen_bit_scaled_not_clipped():
    a = np.full((40, 40), 65535, np.uint16)
    out = load_image(_bytes(Image.fromarray(a), "PNG"))
    assert np.asarray(out).min() == 255


def test_alpha_composited_on_white():
    img = Image.new("RGBA", (40, 40), (10, 20, 30, 0))
    assert np.asarray(load_image(_bytes(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_applied():
    img = _photo(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (40, 80)


@pytest.mark.parametrize("data,error", [
    (b"", UndecodableImageError),
    (b"hello, this is text not a jpeg", UndecodableImageError),
    (b"<html><body>hi</body></html>", UndecodableImageError),
])
def test_not_images(data, error):
    with pytest.raises(error):
        load_image(data)


def test_truncated_jpeg_and_png():
    for fmt in ("JPEG", "PNG"):
        data = _bytes(_photo(200, 200), fmt)
        with pytest.raises(UndecodableImageError, match="corrupt or truncated"):
            load_image(data[: len(data) // 2])


def test_limits():
    with pytest.raises(ImageTooSmallError):
        load_image(_bytes(Image.new("RGB", (1, 1)), "PNG"))
    with pytest.raises(ImageTooSmallError):
        load_image(_bytes(Image.new("RGB", (10_000, 1)), "PNG"))
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(png_bomb())
    with pytest.raises(ImageTooLargeError, match="bytes"):
        load_image(_bytes(_photo(), "PNG"), ImageLimits(max_bytes=100))


def test_unsupported_types():
    with pytest.raises(UnsupportedImageTypeError):
        load_image(_bytes(_photo(), "GIF"))
    with pytest.raises(UnsupportedImageTypeError):
        load_image(_bytes(_photo(), "TIFF"))
    frames = [_photo(), _photo().rotate(90)]
    b = io.BytesIO()
    frames[0].save(b, "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageTypeError, match="animated"):
        load_image(b.getvalue())


def test_error_statuses():
    assert UndecodableImageError.status == 400
    assert ImageTooLargeError.status == 413
    assert UnsupportedImageTypeError.status == 415
