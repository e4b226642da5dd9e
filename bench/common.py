"""Shared by the benchmarks: start `flux-infer serve` on a free loopback port, and time calls."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Loopback only: no analytics, no hub look-ups.
os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")

PROMPT = "a tiny astronaut hatching from an egg on the moon"


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


class Server:
    def __init__(self, model: str | Path, workdir: Path, extra: list[str], name: str = "server"):
        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flux_infer", "serve", "--model", str(model), "--port", str(port), *extra],
            cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}/"
        for _ in range(360):
            if self.process.poll() is not None:
                raise SystemExit(f"{name} exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "gradio_api/info", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{name} did not start")

    def pause(self) -> None:
        """Stop the process while another variant is timed: an idle Gradio server still polls its
        queue every millisecond (several % of a core), which would tax whatever runs beside it."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


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
