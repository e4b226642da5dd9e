"""Throughput with 1 against 2 Ray Serve replicas on this machine, as a ratio measured in one run.

For each replica count: start `flux-infer serve --replicas N` on the tiny model (or `--model`),
warm it up, then send `--requests` requests from as many concurrent gradio_client threads and time
them all. Prints images/s for each and the ratio. On a CPU-only machine each replica gets
cores / N threads, so 2 replicas mostly trade threads for parallel requests; on a box with one GPU
per replica the ratio approaches N. Ray probes outside addresses at start, so this re-runs itself in
a network namespace with only loopback (`unshare -n`, root or user namespaces).

    python bench/replicas.py [--requests 8] [--size 512] [--steps 8] [--model DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Server, download_folders_removed  # noqa: E402

INSIDE = "FLUX_BENCH_IN_NETNS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default=None, help="pipeline folder (default: a fresh tiny one)")
    args = parser.parse_args()
    if not os.environ.get(INSIDE):
        command = f"ip link set lo up && exec {sys.executable} {' '.join(map(repr, sys.argv))}"
        sys.exit(subprocess.run(["unshare", "-n", "sh", "-c", command], env={**os.environ, INSIDE: "1",
                                                                            "RAY_USAGE_STATS_ENABLED": "0"}).returncode)

    from flux_infer.tiny import make_tiny

    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-replicas-"))
    model = args.model or make_tiny(workdir / "tiny", seed=0)
    rates = {}
    for replicas in (1, 2):
        server = Server(model, workdir / f"r{replicas}", ["--replicas", str(replicas), "--preview", "none",
                                                          "--max-queue", str(args.requests + 2)], name=f"r{replicas}")
        try:
            client = server.client()
            call = lambda seed: client.predict("a lighthouse", seed, False, args.size, args.size, 3.5,  # noqa: E731
                                               args.steps, api_name="/infer")
            with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
                list(pool.map(call, range(replicas * 2)))  # warm every replica
                started = time.perf_counter()
                list(pool.map(call, range(args.requests)))
                elapsed = time.perf_counter() - started
        finally:
            server.stop()
        rates[replicas] = args.requests / elapsed
        print(f"{replicas} replica(s): {args.requests} requests in {elapsed:.2f} s -> {rates[replicas]:.2f} images/s")
    print(f"{os.cpu_count()} CPU cores, {args.size}x{args.size}, {args.steps} steps: "
          f"2 replicas / 1 replica throughput ratio {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    with download_folders_removed():
        main()
