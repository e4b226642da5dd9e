"""Shared by the benchmarks: start `flux-infer serve` on a free loopback port, and time calls."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from flux_infer.launcher import TELEMETRY_OFF, ServerProcess, download_folders_removed  # noqa: F401 (the benchmarks')

# Loopback only: no analytics, no hub look-ups.
os.environ.update(TELEMETRY_OFF)

PROMPT = "a tiny astronaut hatching from an egg on the moon"


def prompt(take: int) -> str:
    """The prompt of timed image number `take`: one of its own, since flux-infer keeps the text
    embeddings of recent prompts (settings.PROMPT_CACHE_SIZE), and a timed image pays for the text
    encoders, as an image of a new prompt does."""
    return f"{PROMPT}, take {take}"


def add_thread_option(parser) -> None:
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="CPU threads for torch here and in the servers (OMP_NUM_THREADS). On a CPU-only machine "
             "the model, the server and the client share the cores; 1 leaves the other cores to "
             "serving, as a GPU box does (default: torch's own choice)")


def apply_thread_option(args) -> None:
    """Set OMP_NUM_THREADS before torch is imported here, and for every server started after."""
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise SystemExit("--torch-threads must be at least 1")
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)


def Server(model: str | Path, workdir: Path, extra: list[str], name: str = "server", **kwargs) -> ServerProcess:
    """`flux-infer serve --model MODEL EXTRA...` on a free loopback port (flux_infer.launcher; `kwargs`:
    its `env` and `startup_s`)."""
    return ServerProcess(["--model", str(model), *extra], workdir, name=name, **kwargs)


# Gradio's own timings of each event it runs (gradio.profiling: the wait in its queue, the handler,
# the postprocessing that writes the result's files), kept by a server started with this in its
# environment and read back from its /gradio_api/profiling routes.
GRADIO_PROFILING = {"GRADIO_PROFILING": "1"}


def gradio_traces(server: ServerProcess, count: int) -> list[dict]:
    """Gradio's timings (ms) of the last `count` events `server` ran, oldest first; `server` was
    started with GRADIO_PROFILING in its environment."""
    response = server.http.get("gradio_api/profiling/traces", params={"last_n": count})
    if response.status_code == 404:
        raise RuntimeError("the server keeps no Gradio timings: start it with GRADIO_PROFILING=1 in its environment")
    return response.raise_for_status().json()


def gradio_split(times: list[float], server: ServerProcess) -> dict:
    """Medians of the served time's parts. `times` (s, client side) are `server`'s last events, in
    order, with no other client meanwhile; Gradio's timings of the same events split each into the
    event, its handler (the generation and its previews), its postprocessing (summed over every
    yield: each preview's file, then the final image's), the final image's encoding and writing in
    it (Gradio's save_pil_to_cache) and the time outside the event (event stream, downloads,
    client)."""
    traces = gradio_traces(server, len(times))
    if len(traces) != len(times):
        raise RuntimeError(f"Gradio kept {len(traces)} timings for {len(times)} events")
    return {"event_s": statistics.median(t["total_ms"] for t in traces) / 1000,
            "handler_s": statistics.median(t["fn_call_ms"] for t in traces) / 1000,
            "postprocess_ms": statistics.median(t["postprocess_ms"] for t in traces),
            "final_image_ms": statistics.median(t["postprocess_save_pil_to_cache_ms"] for t in traces),
            "outside_ms": statistics.median(s * 1000 - t["total_ms"] for s, t in zip(times, traces))}


def interleaved(calls: dict, runs: int, servers: dict | None = None) -> dict[str, list[float]]:
    """Time each call `runs` times, round-robin, so machine noise hits all of them alike.

    `servers` maps a call's name to the Server it uses: that one runs, all others are paused.
    """
    servers = servers or {}

    def only(name):
        for other, server in servers.items():
            if other != name and server is not servers.get(name):
                server.pause()
        if name in servers:
            servers[name].resume()

    for name, call in calls.items():
        only(name)
        call(0)  # warm-up
    times = {name: [] for name in calls}
    for run in range(runs):
        for name, call in calls.items():
            only(name)
            started = time.perf_counter()
            call(run + 1)
            times[name].append(time.perf_counter() - started)
    for server in servers.values():
        server.resume()
    return times


def report(times: dict[str, list[float]], baseline: str, goals: dict[str, float]) -> None:
    base = statistics.median(times[baseline])
    for name, values in times.items():
        median = statistics.median(values)
        line = f"{name:<34} median {median:7.3f} s  runs {' '.join(f'{v:.2f}' for v in values)}"
        if name != baseline:
            goal = f" (goal <= {goals[name]:.2f})" if name in goals else ""
            line += f"  ratio {median / base:.3f}{goal}"
        print(line)
