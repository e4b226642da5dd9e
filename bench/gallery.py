"""Server-side cost of the page's "Recent images" gallery after each image.

After every image the page sends the result and the session's history to `web.remember()`, and
Gradio's Gallery postprocesses the new history. Two ways of holding the history, in the same run:
- `files`: the result's own file in Gradio's cache (what the page does): the gallery points at it;
- `pixels`: numpy arrays (a gr.Image's default input type): the gallery encodes every image again.
Prints the median seconds per request with a full gallery, and the ratio pixels / files.

    python bench/gallery.py [--size 1024] [--runs 5]

No model is needed: the images are random pixels at --size (real images encode somewhat faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="flux-bench-gallery-")

    import gradio as gr
    import numpy as np
    from PIL import Image

    from flux_infer import settings
    from flux_infer.web import remember

    with gr.Blocks():
        gallery = gr.Gallery(interactive=False)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8) for _ in range(settings.HISTORY_SIZE)]
    paths = []
    for index, array in enumerate(arrays):
        path = os.path.join(gallery.GRADIO_CACHE, f"result-{index}.png")
        Image.fromarray(array).save(path)
        paths.append(path)

    def remember_pixels(image, seed, history):  # remember() as it was with arrays (no files to check)
        history = [(image, f"seed {int(seed)}"), *history][: settings.HISTORY_SIZE]
        return history, history

    def one_request(images, keep):
        history = []
        for seed, image in enumerate(images):  # a session whose gallery is full
            _, history = keep(image, seed, history)
        started = time.perf_counter()
        shown, history = keep(images[0], 99, history)
        assert len(shown) == settings.HISTORY_SIZE
        gallery.postprocess(shown)
        return time.perf_counter() - started

    timings = {"files": [], "pixels": []}
    for _ in range(args.runs):  # interleaved, so both see the same machine
        timings["files"].append(one_request(paths, remember))
        timings["pixels"].append(one_request(arrays, remember_pixels))
    files, pixels = (statistics.median(timings[name]) for name in ("files", "pixels"))
    print(f"gallery of {settings.HISTORY_SIZE} at {args.size}x{args.size}, median of {args.runs}:")
    print(f"  files  {files * 1000:9.2f} ms per request")
    print(f"  pixels {pixels * 1000:9.2f} ms per request")
    print(f"  ratio pixels / files: {pixels / files:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
