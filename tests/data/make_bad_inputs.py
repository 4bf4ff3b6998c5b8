"""Generate the bad-input corpus for the HTTP API (nothing binary is committed by hand).

    python tests/data/make_bad_inputs.py [OUT_DIR]     # default tests/data/bad_inputs/

Each case is one upload (or one malformed request) with the status the API must answer:
the right 4xx for what is wrong, or 200 where the input is valid but unusual. OUT_DIR gets the
files plus cases.json (name, file, filename, content_type, form_field, params, expect).
"""
from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BYTE_LIMIT = 20 * 1024 * 1024  # the API's default max_upload_bytes


@dataclass
class Case:
    name: str
    data: bytes | None  # None: send no file part at all
    expect: int
    filename: str = "upload.jpg"
    content_type: str = "image/jpeg"
    form_field: str = "file"
    params: dict = field(default_factory=dict)
    extra_files: int = 0  # additional parts under the same field
    raw_body: bytes | None = None  # send this body instead of multipart
    aspect: tuple[int, int] | None = None  # expected overlay (w, h) on a 200


def _photo(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    from skin.synth import make_sample
    return make_sample(seed % 6, 42, seed, max(w, h)).image.resize((w, h))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(w: int = 40_000, h: int = 40_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + _png_chunk(b"IEND", b""))


def corrupt_huffman(jpeg: bytes) -> bytes:
    """Overwrite the entropy-coded scan with bytes that are not a valid Huffman stream."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", jpeg[sos + 2:sos + 4])[0]
    rng = np.random.default_rng(7)
    junk = rng.integers(0, 255, len(jpeg) - start - 2, dtype=np.uint8).tobytes().replace(b"\xff", b"\xfe")
    return jpeg[:start] + junk[: max(0, len(jpeg) - start - 2)] + b"\xff\xd9"


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return _save(_photo(300, 150, 3), "JPEG", exif=exif.tobytes())


def cases() -> list[Case]:
    jpeg = _save(_photo(), "JPEG", quality=90)
    png = _save(_photo(seed=1), "PNG")
    frames = [_photo(120, 90, i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    palette = _photo(seed=2).convert("P")
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((np.asarray(_photo(seed=4).convert("L"), np.uint16) * 257))
    rgba = _photo(seed=5).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return [
        Case("valid_jpeg", jpeg, 200, aspect=(320, 240)),
        Case("empty_body", b"", 400),
        Case("no_file_part", None, 422),
        Case("wrong_field_name", jpeg, 422, form_field="image"),
        Case("not_multipart", None, 422, raw_body=jpeg, content_type="image/jpeg"),
        Case("text_named_jpg", b"patient notes, not a photograph\n" * 20, 400, "notes.jpg"),
        Case("html", b"<!doctype html><html><body><img src=x></body></html>", 400, "page.jpg", "text/html"),
        Case("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"/>', 400, "x.svg", "image/svg+xml"),
        Case("pdf", b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF", 400, "scan.pdf", "application/pdf"),
        Case("random_bytes", np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8).tobytes(), 400, "x.jpg"),
        Case("truncated_jpeg", jpeg[: len(jpeg) // 2], 400),
        Case("truncated_png", png[: len(png) // 2], 400, "x.png", "image/png"),
        Case("png_bad_crc", png[:40] + bytes([png[40] ^ 0xFF]) + png[41:], 400, "x.png", "image/png"),
        Case("jpeg_corrupt_huffman", corrupt_huffman(jpeg), 400),
        Case("cmyk_jpeg", _save(_photo(seed=6).convert("CMYK"), "JPEG"), 200, aspect=(320, 240)),
        Case("png_16bit", _save(sixteen, "PNG"), 200, "x.png", "image/png", aspect=(320, 240)),
        Case("palette_png_transparency", _save(palette, "PNG"), 200, "x.png", "image/png", aspect=(320, 240)),
        Case("rgba_png", _save(rgba, "PNG"), 200, "x.png", "image/png", aspect=(320, 240)),
        Case("grayscale_jpeg", _save(_photo(seed=7).convert("L"), "JPEG"), 200, aspect=(320, 240)),
        Case("webp", _save(_photo(seed=8), "WEBP"), 200, "x.webp", "image/webp", aspect=(320, 240)),
        Case("one_pixel", _save(Image.new("RGB", (1, 1)), "PNG"), 422, "dot.png", "image/png"),
        Case("ten_thousand_by_one", _save(Image.new("RGB", (10_000, 1)), "PNG"), 422, "line.png", "image/png"),
        Case("tall_thin_valid", _save(_photo(40, 2000, 9), "JPEG"), 200, aspect=(20, 1024)),
        Case("decompression_bomb", png_bomb(), 413, "bomb.png", "image/png"),
        Case("over_byte_limit", b"\xff\xd8\xff\xe0" + b"\0" * (BYTE_LIMIT + 16), 413, "huge.jpg"),
        Case("animated_gif", gif.getvalue(), 415, "anim.gif", "image/gif"),
        Case("still_gif", _save(_photo(seed=10), "GIF"), 415, "x.gif", "image/gif"),
        Case("tiff", _save(_photo(seed=11), "TIFF"), 415, "x.tiff", "image/tiff"),
        Case("bmp", _save(_photo(seed=12), "BMP"), 415, "x.bmp", "image/bmp"),
        Case("exif_rotated", exif_rotated(), 200, aspect=(150, 300)),
        Case("wrong_content_type", png, 200, "photo.jpg", "application/octet-stream", aspect=(320, 240)),
        Case("two_files", jpeg, 422, extra_files=1),
        Case("unicode_filename", jpeg, 200, "lésion_皮膚_😀.jpg", aspect=(320, 240)),
        Case("alpha_out_of_range", jpeg, 422, params={"alpha": "1.5"}),
        Case("alpha_not_a_number", jpeg, 422, params={"alpha": "lots"}),
        Case("cam_not_a_bool", jpeg, 422, params={"cam": "perhaps"}),
        Case("unknown_class", jpeg, 422, params={"class": "Melanoma"}),
    ]


def write(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for c in cases():
        meta = asdict(c)
        meta.pop("data")
        meta.pop("raw_body")
        if c.data is not None:
            (out / f"{c.name}.bin").write_bytes(c.data)
            meta["file"] = f"{c.name}.bin"
        if c.raw_body is not None:
            (out / f"{c.name}.body").write_bytes(c.raw_body)
            meta["raw_body_file"] = f"{c.name}.body"
        index.append(meta)
    (out / "cases.json").write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return index


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "bad_inputs"
    print(f"wrote {len(write(target))} cases to {target}")
