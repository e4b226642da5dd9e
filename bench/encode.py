"""Writing the final image: how long each encoding takes on this CPU and how large its file is.

Every served image is encoded once on the CPU before its caller gets it (Gradio's postprocess for
`/infer`, the OpenAI route's and MCP's own), so the encoding is on every request's path. Compared,
on the same images in one run: the lossless encodings of a final image (PNG as flux-infer writes
it, `images.SAVE_OPTIONS`, and lossless WebP, `images.LOSSLESS_WEBP`) against Pillow's default PNG
and PNG at level 1, and lossy WebP as written (previews, the OpenAI route's output_compression)
against Pillow's default WebP (what Gradio alone would write). Times are the best of `--runs`;
ratios are to Pillow's default of the group; lossy WebP also gets its PSNR.

The images: a photograph shipped with Gradio (resized), when present, and synthetic ones (a smooth
field, a photo-like one with fine noise, a detailed one, flat shapes, and noise, which is what a
random model makes); `--images` adds files of your own, such as FLUX outputs.

    python bench/encode.py [--size 1024] [--runs 5] [--images a.png b.jpg]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path


def variants() -> dict:
    """Name -> (format, save parameters, group); the first of each group is its baseline."""
    from flux_infer.images import LOSSLESS_WEBP, SAVE_OPTIONS

    return {"PNG, Pillow's default": ("PNG", {}, "lossless"),
            "PNG as written": ("PNG", SAVE_OPTIONS["PNG"], "lossless"),
            "PNG, level 1": ("PNG", {"compress_level": 1}, "lossless"),
            "WebP lossless as written": ("WEBP", LOSSLESS_WEBP, "lossless"),
            "WebP, Pillow's default": ("WEBP", {}, "lossy"),
            "WebP as written": ("WEBP", SAVE_OPTIONS["WEBP"], "lossy")}


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
                   "detailed, noise": field(size // 4, 2.0),
                   "noise (a random model's image)": Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8))})
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


def timed(image, image_format: str, options: dict, runs: int) -> tuple[float, bytes]:
    """(best seconds, the file) of writing `image`."""
    best, data = float("inf"), b""
    for _ in range(runs):
        buffer = io.BytesIO()
        began = time.perf_counter()
        image.save(buffer, format=image_format, **options)
        best = min(best, time.perf_counter() - began)
        data = buffer.getvalue()
    return best, data


def psnr(image, data: bytes) -> float:
    import numpy as np
    from PIL import Image

    error = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) - np.asarray(image)
    return float(10 * np.log10(255**2 / max((error**2).mean(), 1e-12)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=Path, nargs="*", default=[])
    args = parser.parse_args()

    import PIL
    from PIL import features

    compared = variants()
    print(f"Pillow {PIL.__version__} (zlib {features.version('zlib')}, libwebp {features.version('webp')}), "
          f"{args.size}x{args.size}, best of {args.runs}\n")
    print("| image | " + " | ".join(compared) + " |")
    print("|---|" + "---:|" * len(compared))
    speedups = {variant: [] for variant in compared if variant.endswith("as written")}
    lossless_webp = []  # lossless WebP's time against PNG as written
    for name, image in test_images(args.size, args.images).items():
        cells, baseline, seconds_of = [], {}, {}
        for variant, (kind, options, group) in compared.items():
            seconds, data = timed(image, kind, options, args.runs)
            seconds_of[variant] = seconds
            base_s, base_bytes = baseline.setdefault(group, (seconds, len(data)))
            cell = (f"{seconds * 1000:.0f} ms, {len(data) / 2**20:.2f} MiB ({seconds / base_s:.2f}x time, "
                    f"{len(data) / base_bytes:.2f}x size")
            cells.append(cell + (f", {psnr(image, data):.1f} dB)" if group == "lossy" else ")"))
            if variant in speedups:
                speedups[variant].append(base_s / seconds)
        lossless_webp.append(seconds_of["PNG as written"] / seconds_of["WebP lossless as written"])
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for variant, ratios in speedups.items():
        print(f"{variant} against Pillow's default of its group: {min(ratios):.1f}x to {max(ratios):.1f}x faster")
    print(f"WebP lossless as written against PNG as written: {min(lossless_webp):.1f}x to "
          f"{max(lossless_webp):.1f}x faster")


if __name__ == "__main__":
    main()
