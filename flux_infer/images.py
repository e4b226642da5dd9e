"""Writing generated images with their settings kept inside the file."""

from __future__ import annotations

import zlib
from pathlib import Path

SUFFIX_FORMATS = {".png": "PNG", ".webp": "WEBP"}
# The formats the OpenAI route can answer in (output_format), with their MIME types.
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# How images are written, by format (Pillow's save parameters): the final image's encoding is on
# every served request's path, so each is chosen for speed at about the same size and quality.
# PNG: zlib's run-length strategy after PNG's own row filters. On photographs (what FLUX makes) the
# files are as small as with zlib's default strategy, within a few percent either way, and written
# 4-8x faster: a 1024x1024 photograph in about 80 ms instead of 390 ms on a 2-core CPU.
# WebP: libwebp's fastest method, at the same quality setting: about 4x faster for 15-20% more
# bytes at about the same PSNR (that photograph at quality 80: 38.4 dB in 22 ms and 90 kB, against
# 38.3 dB in 94 ms and 74 kB; a smooth field loses 1 dB). Figures from bench/encode.py.
SAVE_OPTIONS = {"PNG": {"compress_type": zlib.Z_RLE}, "WEBP": {"method": 0}}


def quick_to_encode(image):
    """`image`, set to be written with SAVE_OPTIONS by whatever saves it (Gradio's encoding of a
    handler's result too), through Pillow's per-image save parameters (`encoderinfo`); each
    format's writer reads only its own."""
    image.encoderinfo = getattr(image, "encoderinfo", {}).copy()
    for options in SAVE_OPTIONS.values():
        image.encoderinfo.update(options)
    return image


def encode(image, image_format: str, *, quality: int | None = None) -> bytes:
    """`image` as PNG (its `info` text in PNG text chunks), JPEG or WebP bytes; `quality` (0-100)
    for JPEG and WebP (default: Pillow's, 75 and 80), ignored for PNG."""
    import io

    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    image_format = image_format.upper()
    if image_format == "PNG":
        chunks = PngInfo()
        for key, value in image.info.items():
            if isinstance(value, str):
                chunks.add_text(key, value)
        image.save(buffer, format="PNG", pnginfo=chunks, **SAVE_OPTIONS["PNG"])
    elif image_format in ("JPEG", "WEBP"):
        image.convert("RGB").save(buffer, format=image_format, **SAVE_OPTIONS.get(image_format, {}),
                                  **({} if quality is None else {"quality": quality}))
    else:
        raise ValueError(f"cannot encode {image_format}: png, jpeg or webp")
    return buffer.getvalue()


def save_image(image, path: str | Path) -> Path:
    """Save `image` as PNG (its `info` text in PNG text chunks) or WebP, chosen by the suffix."""
    path = Path(path)
    image_format = SUFFIX_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"output must end in {' or '.join(SUFFIX_FORMATS)}, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, image_format))
    return path
