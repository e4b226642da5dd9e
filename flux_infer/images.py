"""Writing generated images with their settings kept inside the file."""

from __future__ import annotations

import json
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
# WebP with a quality (previews, the OpenAI route's output_compression): libwebp's fastest method,
# about 4x faster than its default for 15-20% more bytes at about the same PSNR (that photograph at
# quality 80: 38.4 dB in 22 ms and 90 kB, against 38.3 dB in 94 ms and 74 kB).
# WebP without one (a final image): lossless at libwebp's least effort, the same pixels as PNG in
# about half its time at about its size (that photograph: 48 ms and 0.92 MiB against PNG's 77 ms and
# 1.11 MiB; a random model's noise 37 ms against 105). Figures from bench/encode.py.
SAVE_OPTIONS = {"PNG": {"compress_type": zlib.Z_RLE}, "WEBP": {"method": 0}}
LOSSLESS_WEBP = {"lossless": True, "method": 0, "quality": 0}
# Where a WebP or JPEG keeps the settings (a PNG keeps them in text chunks of the same names): EXIF's
# UserComment holds the `parameters` text, where other Stable Diffusion tools write and read it (UTF-16
# after the "UNICODE" marker, in a big-endian EXIF so that the two byte orders agree); its
# ImageDescription holds the `flux_infer` JSON (ASCII: json.dumps escapes the rest).
USER_COMMENT_UNICODE = b"UNICODE\0"
# EXIF's types for a tag's value (TIFF's): UserComment is UNDEFINED (bytes whose first 8 say their
# encoding); Pillow, which has no type for that tag, writes bytes as BYTE, and readers built on piexif
# (the PNG Info of A1111's web UI, Forge) then get a tuple of numbers, not the text.
TIFF_BYTE, TIFF_UNDEFINED = 1, 7


def keep_settings(image, parameters: str, settings: dict):
    """Record the generation settings in `image.info`, where every writer of the image finds them:
    PNG text chunks (`parameters`, `flux_infer`) and the EXIF of a WebP or JPEG (`exif`, which Gradio
    passes on when it writes a WebP)."""
    import struct

    from PIL import ExifTags, Image

    text = json.dumps(settings)
    comment = USER_COMMENT_UNICODE + parameters.encode("utf-16-be")
    exif = Image.Exif()
    exif.endian = ">"
    exif[ExifTags.Base.ImageDescription] = text
    exif[ExifTags.Base.Software] = "flux-infer"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    data = exif.tobytes()
    # UserComment's entry (tag, type, count) made UNDEFINED: the same size per element, so nothing
    # else moves. Everything written before it is ASCII (the JSON, "flux-infer"), so a single match is
    # the entry; were Pillow's layout ever to differ, its own bytes stay (tests/test_images.py says so).
    entry = struct.pack(">HHI", ExifTags.Base.UserComment, TIFF_BYTE, len(comment))
    if data.count(entry) == 1:
        data = data.replace(entry, struct.pack(">HHI", ExifTags.Base.UserComment, TIFF_UNDEFINED, len(comment)))
    image.info.update(parameters=parameters, flux_infer=text, exif=data)
    return image


def settings_of(image) -> dict:
    """The `flux_infer` settings an image written by flux-infer carries (PNG, WebP or JPEG); {} if none."""
    from PIL import ExifTags

    text = image.info.get("flux_infer")
    if text is None and "exif" in image.info:
        text = image.getexif().get(ExifTags.Base.ImageDescription)
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def parameters_of(image) -> str | None:
    """The `parameters` text an image carries (a PNG's text chunk, a WebP's or JPEG's EXIF UserComment)."""
    from PIL import ExifTags

    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and comment.startswith(USER_COMMENT_UNICODE):
        return comment[len(USER_COMMENT_UNICODE):].decode("utf-16-be", errors="replace")
    return None


def quick_to_encode(image):
    """`image`, set to be written as a final image by whatever saves it (Gradio's encoding of a
    handler's result too): PNG with SAVE_OPTIONS, WebP lossless (LOSSLESS_WEBP), through Pillow's
    per-image save parameters (`encoderinfo`); each format's writer reads only its own."""
    image.encoderinfo = {**getattr(image, "encoderinfo", {}), **SAVE_OPTIONS["PNG"], **LOSSLESS_WEBP}
    return image


def encode(image, image_format: str, *, quality: int | None = None) -> bytes:
    """`image` as PNG (its settings in text chunks), JPEG or WebP bytes (their settings in EXIF).
    `quality` (0-100) for JPEG (default: Pillow's, 75) and WebP; a WebP without one is lossless."""
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
        options = dict(SAVE_OPTIONS.get(image_format, {}), exif=image.info.get("exif", b""))
        if image_format == "WEBP" and quality is None:
            options.update(LOSSLESS_WEBP)
        elif quality is not None:
            options["quality"] = quality
        image.convert("RGB").save(buffer, format=image_format, **options)
    else:
        raise ValueError(f"cannot encode {image_format}: png, jpeg or webp")
    return buffer.getvalue()


def save_image(image, path: str | Path) -> Path:
    """Save `image` as PNG or lossless WebP (chosen by the suffix), its settings inside."""
    path = Path(path)
    image_format = SUFFIX_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"output must end in {' or '.join(SUFFIX_FORMATS)}, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, image_format))
    return path
