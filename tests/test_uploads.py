"""Uploaded images and masks (flux_infer.uploads): bounded, converted when they can be, refused clearly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flux_infer import settings
from flux_infer.inference import InvalidRequest
from flux_infer.uploads import read_image, read_mask


def encoded(image, image_format="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """The start of an 8-bit RGB PNG of that size, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)))


def test_what_can_be_converted_becomes_rgb():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    assert read_image(encoded(rgb)).tobytes() == rgb.tobytes()
    assert read_image(encoded(rgb, "JPEG")).size == (60, 40)
    cmyk = read_image(encoded(rgb.convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.size == (60, 40)
    grey16 = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    as_rgb = np.asarray(read_image(encoded(grey16)))
    assert as_rgb.shape == (8, 8, 3) and abs(int(as_rgb[0, 0, 0]) - 128) <= 1
    rgba = read_image(encoded(rgb.convert("RGBA")))
    assert rgba.mode == "RGB" and rgba.tobytes() == rgb.tobytes()
    assert read_image(encoded(rgb.convert("P"))).mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "image is empty"),
    (b"GIF89a not really", "not an image this server can read"),
    (b"%PDF-1.4", "not an image this server can read"),
])
def test_what_is_not_an_image_is_refused(data, message):
    with pytest.raises(InvalidRequest, match=message):
        read_image(data)


def test_truncated_animated_huge_and_bomb_images_are_refused():
    rgb = Image.new("RGB", (256, 256), "navy")
    rgb.putpixel((3, 3), (255, 0, 0))
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    with pytest.raises(InvalidRequest, match="truncated or damaged"):
        read_image(encoded(noisy)[:-3000])
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidRequest, match="animated \\(2 frames\\)"):
        read_image(buffer.getvalue())
    # A decompression bomb: a PNG header that promises 30000x30000. Refused from the header, before
    # any pixel is decoded.
    bomb = png_header(30000, 30000)
    with pytest.raises(InvalidRequest, match="far too many pixels; the limit is 4096 pixels a side"):
        read_image(bomb)
    with pytest.raises(InvalidRequest, match="8000x3000 pixels; the limit is 4096 pixels a side"):
        read_image(png_header(8000, 3000))
    with pytest.raises(InvalidRequest, match="MiB; the limit is 25 MiB"):
        read_image(b"\x89PNG" + bytes(settings.MAX_UPLOAD_BYTES))


def test_masks_in_both_conventions():
    size = (32, 16)
    # OpenAI's: a PNG whose transparent pixels are repainted.
    alpha = np.full((16, 32), 255, dtype=np.uint8)
    alpha[:, :10] = 0
    openai_mask = Image.fromarray(np.dstack([np.zeros((16, 32, 3), np.uint8), alpha]), "RGBA")
    mask = np.asarray(read_mask(encoded(openai_mask), size))
    assert mask.dtype == np.uint8 and (mask[:, :10] == 255).all() and (mask[:, 10:] == 0).all()
    # Black and white: white is repainted.
    white = np.zeros((16, 32), dtype=np.uint8)
    white[4:8] = 250
    mask = np.asarray(read_mask(encoded(Image.fromarray(white).convert("RGB")), size))
    assert (mask[4:8] == 255).all() and mask.sum() == 255 * 4 * 32
    # An opaque RGBA mask is read as black and white.
    mask = np.asarray(read_mask(encoded(Image.fromarray(white).convert("RGBA")), size))
    assert (mask[4:8] == 255).all() and mask.sum() == 255 * 4 * 32
    with pytest.raises(InvalidRequest, match="mask is 16x16 but the image is 32x16: the mask must be the same size"):
        read_mask(encoded(Image.new("L", (16, 16))), size)
