"""Shared fixtures: the tiny pipeline on disk and live servers on free loopback ports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from flux_infer.launcher import TELEMETRY_OFF, ServerProcess, free_port

# Nothing in the tests may talk to anything but 127.0.0.1.
os.environ.update(TELEMETRY_OFF)
__all__ = ["TELEMETRY_OFF", "free_port", "Server", "InProcessServer", "SMALL", "wait_for"]


def wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll `condition()` until it is true; fail naming `what` if it is not within `timeout` (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


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


class Server(ServerProcess):
    """A `flux-infer serve` subprocess, as a user would start it, with the tiny model's cache in `workdir`."""

    def __init__(self, args: list[str], workdir: Path, startup_s: float = 180, env: dict | None = None):
        super().__init__(args, workdir, startup_s=startup_s,
                         env={"XDG_CACHE_HOME": str(Path(workdir) / "cache"), **(env or {})})


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
