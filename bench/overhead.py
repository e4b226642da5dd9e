"""Server overhead: `/infer` through gradio_client against a direct FluxPipeline call.

Both use the same weights and the Space's defaults (1024x1024, 28 steps, guidance 3.5), measured
alternately in one run: a server with its default previews (`--preview auto`: TAEF1 when on disk,
else the latent map), whose 28 previews gradio_client's predict() also receives and downloads,
and one with `--preview none`. On a CPU the tiny model takes about as long per image as
FLUX.1-dev on one H100, so the ratio reads like a GPU user's; but here the client, the server and
the "GPU" share two cores. Goal: at most 1.05. Each server's time is then split by Gradio's own
timings of the same requests (bench/common.py's gradio_split): its event, the handler and the
postprocessing in it, and the time outside it (event stream, downloads, client): parts that this
machine's noise hides in a ratio of totals.

    python bench/overhead.py [--runs 9] [--model DIR_OR_REPO] [--size 1024] [--steps 28] [--torch-threads N]

`--torch-threads 1` on a CPU leaves a core to the server and the client, as a GPU box leaves the
whole CPU to them; without it the denoising's threads and the serving threads take turns on the
same cores, and every preview's few ms of serving stall the denoising too.

With real weights on a GPU, the benchmark and the server each hold the model (2 x 33 GB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (GRADIO_PROFILING, Server, add_thread_option, apply_thread_option,  # noqa: E402
                    download_folders_removed, gradio_split, interleaved, prompt, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--model", default=None, help="pipeline folder or repo id (default: a fresh tiny one)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--server-args", default="", help="extra `flux-infer serve` flags, space-separated")
    add_thread_option(parser)
    args = parser.parse_args()
    apply_thread_option(args)

    import torch

    from flux_infer.loading import load_pipeline
    from flux_infer.tiny import make_tiny

    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    model = args.model or make_tiny(workdir / "tiny", seed=0)
    settings = dict(width=args.size, height=args.size, guidance_scale=3.5, num_inference_steps=args.steps)
    server = Server(model, workdir / "default", args.server_args.split(), env=GRADIO_PROFILING)
    plain = Server(model, workdir / "none", [*args.server_args.split(), "--preview", "none"], env=GRADIO_PROFILING)
    try:
        client = server.client()
        plain_client = plain.client()
        # The same loader and device choice as the server.
        pipe, _, placement, _, _ = load_pipeline(str(model))
        pipe.set_progress_bar_config(disable=True)

        def direct(seed: int) -> None:
            pipe(prompt(seed), generator=torch.Generator().manual_seed(seed), **settings).images[0]

        def served(seed: int) -> None:
            client.predict(prompt(seed), seed, False, api_name="/infer", **settings)

        def served_plain(seed: int) -> None:
            plain_client.predict(prompt(seed), seed, False, api_name="/infer", **settings)

        # Servers not in use are paused, so their idle polling does not slow what is timed.
        times = interleaved(
            {"direct FluxPipeline call": direct, "/infer, default previews": served,
             "/infer, --preview none": served_plain},
            args.runs,
            servers={"/infer, default previews": server, "/infer, --preview none": plain},
        )
        print(f"{args.size}x{args.size}, {args.steps} steps, {model}, {placement.device} {placement.dtype_name}, "
              f"{args.runs} runs each, torch threads {torch.get_num_threads()}")
        report(times, "direct FluxPipeline call", {"/infer, default previews": 1.05, "/infer, --preview none": 1.05})
        # Where the served time goes, by Gradio's own timings of the same requests.
        for name, served_by in (("/infer, default previews", server), ("/infer, --preview none", plain)):
            split = gradio_split(times[name], served_by)
            print(f"{name:<34} Gradio's event {split['event_s']:.3f} s (handler {split['handler_s']:.3f} s, "
                  f"postprocess {split['postprocess_ms']:.0f} ms, the final image's {split['final_image_ms']:.0f} "
                  f"of them), outside it {split['outside_ms']:.0f} ms")
    finally:
        server.stop()
        plain.stop()


if __name__ == "__main__":
    with download_folders_removed():
        main()
