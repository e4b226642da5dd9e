"""Server overhead: `/infer` through gradio_client against a direct FluxPipeline call.

Both use the same tiny FLUX.1-dev-shaped weights and the Space's defaults (1024x1024, 28 steps,
guidance 3.5), measured alternately in one run so that machine noise hits both alike. On a CPU the
tiny model takes about as long per image as FLUX.1-dev on one H100, so the ratio reads like a GPU
user's. Prints the medians and their ratio (goal: at most 1.05).

    python bench/overhead.py [--runs 9] [--model DIR_OR_REPO] [--size 1024] [--steps 28]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")

PROMPT = "a tiny astronaut hatching from an egg on the moon"


def start_server(model: str | Path, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "flux_infer", "serve", "--model", str(model), "--port", str(port), *extra],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(360):
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(workdir / 'server.log').read_text()}")
        try:
            if httpx.get(url + "gradio_api/info", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--model", default=None, help="pipeline folder or repo id (default: a fresh tiny one)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--server-args", default="", help="extra `flux-infer serve` flags, space-separated")
    args = parser.parse_args()

    import torch
    from gradio_client import Client

    from flux_infer.loading import load_pipeline
    from flux_infer.tiny import make_tiny

    settings = dict(width=args.size, height=args.size, guidance_scale=3.5, num_inference_steps=args.steps)
    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    model = args.model or make_tiny(workdir / "tiny", seed=0)
    server, url = start_server(model, workdir, args.server_args.split())
    try:
        client = Client(url, verbose=False)
        # The same loader and device choice as the server: on a GPU both hold the model (2 x 33 GB).
        pipe, _, placement = load_pipeline(str(model))
        pipe.set_progress_bar_config(disable=True)

        def direct(seed: int) -> None:
            pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **settings).images[0]

        def served(seed: int) -> None:
            client.predict(PROMPT, seed, False, api_name="/infer", **settings)

        direct(0), served(0)  # warm-up: first-call allocations, Gradio's file cache
        times = {"direct": [], "served": []}
        for run in range(args.runs):
            for name, call in (("direct", direct), ("served", served)):
                started = time.perf_counter()
                call(run + 1)
                times[name].append(time.perf_counter() - started)
        d, s = statistics.median(times["direct"]), statistics.median(times["served"])
        print(f"{args.size}x{args.size}, {args.steps} steps, {model}, {placement.device} {placement.dtype_name}, "
              f"{args.runs} runs each, torch threads {torch.get_num_threads()}")
        print(f"direct FluxPipeline call   median {d:.3f} s  {['%.3f' % t for t in times['direct']]}")
        print(f"/infer via gradio_client   median {s:.3f} s  {['%.3f' % t for t in times['served']]}")
        print(f"ratio served/direct: {s / d:.3f} (goal <= 1.05)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
