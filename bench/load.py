"""Load: N concurrent clients (gradio_client and the openai package) against one tiny-model server.

First one request per seed, alone, as the reference. Then N client threads, half through `/infer`
and half through `/v1/images/generations`, each sending at most `--requests` requests for at most
`--seconds`, seeds drawn from the reference set. Checks that every accepted request returns the
reference image for its seed, that overflow beyond `--max-queue` is refused at once ("busy" from `/infer` /
HTTP 503) and never hangs. Prints throughput and p50/p95 latency; exits 1 on a wrong image, an
unexpected error or a slow refusal. Loopback only.

    python bench/load.py [--clients 8] [--requests 6] [--seconds 120] [--max-queue 4] [--size 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Server, download_folders_removed  # noqa: E402

SEEDS = range(6)
SLOW_REFUSAL_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="at most this many per client")
    parser.add_argument("--seconds", type=float, default=120, help="no client starts a request after this")
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default=None, help="pipeline folder (default: a fresh tiny one)")
    args = parser.parse_args()

    import numpy as np
    import openai
    from gradio_client.exceptions import AppError
    from PIL import Image

    from flux_infer.tiny import make_tiny

    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-load-"))
    model = args.model or make_tiny(workdir / "tiny", seed=0)
    server = Server(model, workdir, ["--preview", "none", "--max-queue", str(args.max_queue)], name="load")
    prompt = "a lighthouse in a storm"

    def via_gradio(client, seed):
        path, used = client.predict(prompt, seed, False, args.size, args.size, 3.5, args.steps, api_name="/infer")
        assert used == seed
        return np.asarray(Image.open(path).convert("RGB"))

    def via_openai(client, seed):
        response = client.images.generate(prompt=prompt, size=f"{args.size}x{args.size}",
                                          extra_body={"seed": seed, "num_inference_steps": args.steps})
        assert response.model_extra["seeds"] == [seed]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB"))

    try:
        reference = {seed: via_gradio(server.client(), seed) for seed in SEEDS}
        results, lock = [], threading.Lock()
        deadline = time.monotonic() + args.seconds

        def worker(index: int) -> None:
            kind = "gradio" if index % 2 == 0 else "openai"
            client = (server.client() if kind == "gradio" else
                      openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=600))
            call = via_gradio if kind == "gradio" else via_openai
            for number in range(args.requests):
                if time.monotonic() > deadline:
                    return
                seed = SEEDS[(index + number) % len(SEEDS)]
                started = time.perf_counter()
                try:
                    pixels = call(client, seed)
                    outcome = "ok" if np.array_equal(pixels, reference[seed]) else "wrong image"
                except (AppError, openai.InternalServerError) as err:
                    outcome = "busy" if "busy" in str(err).lower() else f"error: {err}"
                except Exception as err:  # noqa: BLE001 - every other failure is reported
                    outcome = f"error: {type(err).__name__}: {err}"
                with lock:
                    results.append((kind, outcome, time.perf_counter() - started))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        server.stop()

    ok = [seconds for _, outcome, seconds in results if outcome == "ok"]
    busy = [seconds for _, outcome, seconds in results if outcome == "busy"]
    bad = [(kind, outcome) for kind, outcome, _ in results if outcome not in ("ok", "busy")]
    p = statistics.quantiles(ok, n=20) if len(ok) >= 2 else [float("nan")] * 19
    print(f"{args.clients} clients (half gradio_client, half openai), {len(results)} requests, "
          f"{args.size}x{args.size}, {args.steps} steps, --max-queue {args.max_queue}")
    print(f"completed with the right image: {len(ok)}; refused as busy: {len(busy)}"
          f" (slowest refusal {max(busy, default=0):.2f} s); wrong or failed: {len(bad)}")
    print(f"throughput {len(ok) / elapsed:.2f} images/s over {elapsed:.1f} s; "
          f"latency p50 {statistics.median(ok) if ok else float('nan'):.2f} s, p95 {p[18]:.2f} s")
    for kind, outcome in bad[:10]:
        print(f"  {kind}: {outcome}")
    if bad or max(busy, default=0) > SLOW_REFUSAL_S or not ok:
        sys.exit(1)


if __name__ == "__main__":
    with download_folders_removed():
        main()
