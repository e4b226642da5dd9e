"""Writing the final image: how long each encoding takes on this CPU and how large its file is.

Every served image is encoded once on the CPU before its caller gets it (Gradio's postprocess for
`/infer`, the OpenAI route's and MCP's own), so the encoding is on every request's path. Compared,
on the same images in one run: Pillow's default PNG (zlib's default strategy at level 6), PNG as
flux-infer writes it (`images.PNG_OPTIONS`), PNG at level 1, and WebP at Pillow's defaults (what
`--image-format webp` sends). Times are the best of `--runs`; ratios are to Pillow's default PNG.

The images: a photograph shipped with Gradio (resized), when present, and synthetic ones (a smooth
field, a photo-like one with fine noise, a detailed one, flat shapes); `--images` adds files of
your own, such as FLUX outputs.

    python bench/encode.py [--size 1024] [--runs 5] [--images a.png b.jpg]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

VARIANTS = {
    "PNG, Pillow's default": ("PNG", {}),
    "PNG as written (PNG_OPTIONS)": ("PNG", None),  # filled in from flux_infer.images
    "PNG, level 1": ("PNG", {"compress_level": 1}),
    "WebP, Pillow's default": ("WEBP", {}),
}


def test_images(size: int, extra: list[Path]) -> dict:
    """Name -> RGB image of size x size."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)

    def field(cells: int, noise: float):
        coarse = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((size, size), Image.BICUBIC)).astype(np.float32)
        return Image.fromarray(np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8))

    images = {}
    try:
        import gradio

        photo = Path(gradio.__file__).parent / "media_assets" / "images" / "groot.jpeg"
        images["photograph (Gradio's groot.jpeg)"] = Image.open(photo).convert("RGB").resize((size, size),
                                                                                             Image.LANCZOS)
    except (ImportError, OSError) as err:
        print(f"(no photograph from Gradio: {err})")
    images.update({"smooth field": field(24, 0), "photo-like, fine noise": field(24, 1.0),
                   "detailed, noise": field(size // 4, 2.0)})
    shapes = Image.new("RGB", (size, size), "skyblue")
    draw = ImageDraw.Draw(shapes)
    for _ in range(40):
        x, y = (int(v) for v in rng.integers(0, size - size // 8, 2))
        draw.ellipse([x, y, x + int(rng.integers(size // 32, size // 5)), y + int(rng.integers(size // 32, size // 5))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    images["flat shapes, antialiased"] = shapes.filter(ImageFilter.GaussianBlur(1.5))
    for path in extra:
        images[path.name] = Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)
    return images


def timed(image, image_format: str, options: dict, runs: int) -> tuple[float, int]:
    """(best seconds, bytes) of writing `image`."""
    best, size = float("inf"), 0
    for _ in range(runs):
        buffer = io.BytesIO()
        began = time.perf_counter()
        image.save(buffer, format=image_format, **options)
        best = min(best, time.perf_counter() - began)
        size = buffer.tell()
    return best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=Path, nargs="*", default=[])
    args = parser.parse_args()

    import PIL
    from PIL import features

    from flux_infer.images import PNG_OPTIONS

    variants = {name: (kind, PNG_OPTIONS if options is None else options) for name, (kind, options) in VARIANTS.items()}
    print(f"Pillow {PIL.__version__} (zlib {features.version('zlib')}), {args.size}x{args.size}, best of {args.runs}\n")
    print("| image | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    speedups = []
    for name, image in test_images(args.size, args.images).items():
        figures = {variant: timed(image, kind, options, args.runs) for variant, (kind, options) in variants.items()}
        base_s, base_bytes = figures["PNG, Pillow's default"]
        cells = [f"{s * 1000:.0f} ms, {size / 2**20:.2f} MiB ({s / base_s:.2f}x time, {size / base_bytes:.2f}x size)"
                 for s, size in figures.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
        speedups.append(base_s / figures["PNG as written (PNG_OPTIONS)"][0])
    print(f"\nPNG as written against Pillow's default: {min(speedups):.1f}x to {max(speedups):.1f}x faster")


if __name__ == "__main__":
    main()
