"""Images sent to be edited, and their masks: bounded, decoded safely, converted or clearly refused.

`read_image()` takes the bytes of an upload (the OpenAI route's multipart file, the page's upload,
the CLI's file) and returns an RGB PIL image, refusing with an InvalidRequest that says what to do:
too many bytes or pixels (checked from the header, before any pixel is decoded, so a decompression
bomb costs nothing), not an image, a truncated file, an animation. What can be converted is:
CMYK, palette, grey, 16-bit grey and alpha images become RGB. `read_mask()` reads a mask in either
convention: OpenAI's (a PNG whose transparent pixels are repainted) or black and white (white is
repainted, diffusers' own), as an "L" image where 255 means repaint.
"""

from __future__ import annotations

import io

from flux_infer import settings
from flux_infer.inference import InvalidRequest


def _open(data: bytes, name: str):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidRequest(f"{name} is empty: send a PNG, JPEG or WebP file")
    if len(data) > settings.MAX_UPLOAD_BYTES:
        raise InvalidRequest(f"{name} is {len(data) / 2**20:.1f} MiB; the limit is "
                             f"{settings.MAX_UPLOAD_BYTES / 2**20:.0f} MiB: send a smaller or compressed file")
    limit = (f"the limit is {settings.MAX_UPLOAD_SIDE} pixels a side and "
             f"{settings.MAX_UPLOAD_PIXELS // 10**6} megapixels: resize it first")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours
        raise InvalidRequest(f"{name} has far too many pixels; {limit}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidRequest(f"{name} is not an image this server can read: send a PNG, JPEG or WebP file") from None
    width, height = image.size
    if width * height > settings.MAX_UPLOAD_PIXELS or max(width, height) > settings.MAX_UPLOAD_SIDE:
        raise InvalidRequest(f"{name} is {width}x{height} pixels; {limit}")
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidRequest(f"{name} is animated ({image.n_frames} frames): send a single frame as PNG or JPEG")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):  # Pillow's truncated/corrupt-data errors
        raise InvalidRequest(f"{name} is truncated or damaged: send the whole file again") from None
    return image


def _eight_bit(image):
    """16- and 32-bit grey ("I;16", "I") as 8-bit grey, keeping the range."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        return Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        raise InvalidRequest("a floating-point image cannot be edited: save it as 8- or 16-bit PNG")
    return image


def read_image(data: bytes, name: str = "image"):
    """An uploaded image as RGB (see the module docstring)."""
    image = _eight_bit(_open(data, name))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = image.convert("RGB")  # transparent pixels keep their colour; the mask says what changes
    return image.convert("RGB")


def read_mask(data: bytes, size: tuple[int, int], name: str = "mask"):
    """An uploaded mask as "L" (255: repaint), the size of the image it goes with (`size`)."""
    import numpy as np
    from PIL import Image

    mask = _eight_bit(_open(data, name))
    if mask.size != size:
        raise InvalidRequest(f"{name} is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}: "
                             "the mask must be the same size")
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if alpha.min() < 255:  # OpenAI's convention: transparent is repainted
            return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    grey = np.asarray(mask.convert("L"))
    return Image.fromarray(np.where(grey >= 128, 255, 0).astype(np.uint8), "L")


def edit_size(size: tuple[int, int]) -> tuple[int, int]:
    """An image's own size as an output size: scaled (keeping its shape) into the Space's limits."""
    width, height = size
    scale = min(1.0, settings.WIDTH.maximum / width, settings.HEIGHT.maximum / height)
    scale = max(scale, settings.WIDTH.minimum / width, settings.HEIGHT.minimum / height)
    return (min(max(round(width * scale), int(settings.WIDTH.minimum)), int(settings.WIDTH.maximum)),
            min(max(round(height * scale), int(settings.HEIGHT.minimum)), int(settings.HEIGHT.maximum)))
