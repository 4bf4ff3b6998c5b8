"""Image validation, in one place: dataset scanning and serving both decode through `load_image`.

Every failure is a typed `ImageError` carrying the HTTP status it maps to and a message that
says what is wrong and how to fix it.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image

# HEIC/HEIF (iPhones' default photo format) through libheif; the decoder applies the file's
# rotation itself and resets the EXIF orientation, so exif_transpose below stays correct
import pillow_heif  # noqa: E402

pillow_heif.register_heif_opener()

SERVE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "HEIF"})
DATASET_FORMATS = SERVE_FORMATS | {"BMP", "TIFF"}
# file names the folder readers list (batch inference: the API's formats; datasets: theirs)
SERVE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif")
DATASET_SUFFIXES = SERVE_SUFFIXES + (".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    status = 400
    code = "bad_image"


class UndecodableImageError(ImageError):
    status, code = 400, "undecodable_image"


class UnsupportedImageTypeError(ImageError):
    status, code = 415, "unsupported_image_type"


class ImageTooLargeError(ImageError):
    status, code = 413, "image_too_large"


class ImageTooSmallError(ImageError):
    status, code = 422, "image_too_small"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 64_000_000  # a 48 MP phone photo fits; a 40,000 x 40,000 bomb does not
    min_side: int = 32
    formats: frozenset[str] = SERVE_FORMATS


DATASET_LIMITS = ImageLimits(max_bytes=200 * 1024 * 1024, formats=DATASET_FORMATS)


def _check_jpeg_stream(data: bytes) -> None:
    """libjpeg only *warns* on corrupt entropy-coded data and Pillow then returns garbage
    pixels. Decode again with libjpeg-turbo in strict mode, at 1/8 scale (every Huffman code is
    still read, the IDCT is cheap), and refuse the file when it reports corruption."""
    try:
        import simplejpeg
    except ImportError:  # optional speed-up dependency missing: keep Pillow's leniency
        return
    try:
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
    except ValueError as e:
        msg = str(e)
        if any(w in msg for w in ("Corrupt", "corrupt", "Premature", "Huffman", "premature")):
            raise UndecodableImageError(
                f"JPEG data is corrupt ({msg}); re-export or re-upload the photograph") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(data: bytes | str | Path, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode fully, check, apply EXIF orientation, return RGB. Raises ImageError subclasses."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageTooLargeError(f"file is {size:,} bytes; the limit is {limits.max_bytes:,}")
        data = path.read_bytes()
    if len(data) == 0:
        raise UndecodableImageError("the file is empty; upload a JPEG or PNG photograph")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"upload is {len(data):,} bytes; the limit is {limits.max_bytes:,}. "
            "Resize or re-compress the photograph")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in limits.formats:
                raise UnsupportedImageTypeError(
                    f"{fmt or 'unknown'} images are not accepted; send one of "
                    f"{', '.join(sorted(limits.formats))}")
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageTooLargeError(
                    f"image is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,}. "
                    "Downscale it before uploading")
            if getattr(img, "n_frames", 1) > 1:
                raise UnsupportedImageTypeError("animated images are not accepted; send one still frame")
            img.load()
            if fmt == "JPEG":
                _check_jpeg_stream(data)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"image is too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise UndecodableImageError(
            "not a readable image (is it really a JPEG/PNG?); re-export the photograph") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UndecodableImageError(
            f"image data is corrupt or truncated ({e}); re-export or re-upload the file") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a valid image
        pass
    if min(img.size) < limits.min_side:
        raise ImageTooSmallError(
            f"image is {img.size[0]}x{img.size[1]}; each side must be at least "
            f"{limits.min_side} px for a meaningful answer")
    return _to_rgb(img)


def display_copy(img: Image.Image, max_side: int) -> Image.Image:
    """A copy no larger than max_side on its longer side, aspect ratio kept (for overlays)."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)


def difference_hash(img: Image.Image, hash_size: int = 8) -> int:
    """64-bit dHash (Krawetz) of the illumination-flattened image: a 64 px grey thumbnail minus
    its local mean, then the sign of horizontal gradients on a 9x8 grid. Flattening first matters
    for skin photographs: a plain dHash of smooth skin mostly encodes the lighting gradient, and
    distinct photos collide (251 false pairs in 360 synthetic images here, none after)."""
    grey = img.convert("L").resize((64, 64), Image.Resampling.BILINEAR)
    detail = np.asarray(grey, np.int16) - np.asarray(grey.filter(ImageFilter.BoxBlur(10)), np.int16)
    detail = Image.fromarray(np.clip(detail * 2 + 128, 0, 255).astype(np.uint8), "L")
    a = np.asarray(detail.resize((hash_size + 1, hash_size), Image.Resampling.BILINEAR), np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two uint64 hash vectors, shape (len(a), len(b))."""
    return np.bitwise_count(a[:, None] ^ b[None, :])
