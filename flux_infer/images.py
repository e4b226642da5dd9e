"""Writing generated images with their settings kept inside the file."""

from __future__ import annotations

from pathlib import Path

SUFFIX_FORMATS = {".png": "PNG", ".webp": "WEBP"}


def save_image(image, path: str | Path) -> Path:
    """Save `image` as PNG (its `info` text in PNG text chunks) or WebP, chosen by the suffix."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    image_format = SUFFIX_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"output must end in {' or '.join(SUFFIX_FORMATS)}, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_format == "PNG":
        chunks = PngInfo()
        for key, value in image.info.items():
            if isinstance(value, str):
                chunks.add_text(key, value)
        image.save(path, format="PNG", pnginfo=chunks)
    else:
        image.save(path, format="WEBP", lossless=False)
    return path
