"""Shared fixtures: the tiny pipeline on disk and live servers on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

# Nothing in the tests may talk to anything but 127.0.0.1.
TELEMETRY_OFF = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update(TELEMETRY_OFF)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random pipeline, written once per test session by `flux-infer make-tiny`'s code."""
    from flux_infer.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "FLUX.1-tiny", seed=0)


class InProcessServer:
    """The server's app (flux_infer.server.build_app) under uvicorn in a thread, for fakes in-process."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        # Open event streams (gradio_client heartbeats) would hold a graceful shutdown for ever.
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self):
        self._server.should_exit = True
        self._thread.join(timeout=30)


class Server:
    """A `flux-infer serve` subprocess, as a user would start it."""

    def __init__(self, args: list[str], workdir: Path, startup_s: float = 180, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / f"server-{self.port}.log"
        env = {**os.environ, **TELEMETRY_OFF, "XDG_CACHE_HOME": str(workdir / "cache"), **(env or {})}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flux_infer", "serve", "--port", str(self.port), *args],
            cwd=workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in {startup_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs):
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)

    def stop(self, timeout: float = 20) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory):
    """One server on the tiny weights for the whole session."""
    srv = Server(["--model", str(tiny_dir)], tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()


# Small enough to keep the suite fast on two CPU cores.
SMALL = dict(width=256, height=256, num_inference_steps=4)
