"""`flux-infer serve` in a child process on a free loopback port: the one launcher of the tests and
the benchmarks, which drive the server as a user would, over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Nothing but 127.0.0.1: no analytics, no hub look-ups, no Ray usage reports.
TELEMETRY_OFF = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


# The server speaks plain HTTP on 127.0.0.1: no certificate to verify. Saying so spares httpx loading
# its CA bundle (about 35 ms of CPU) for each client it makes, and gradio_client makes several per
# call: on two cores that alone took as much CPU as the server spent on a small image.
NO_TLS = False


@contextlib.contextmanager
def download_folders_removed():
    """gradio_client downloads every file through a folder of its own, <temporary folder>/<40 hex
    digits>, which it leaves behind, empty: some 1,900 in a test run, 30 in a benchmark's. Those made
    while this runs are removed at its end; rmdir removes only empty folders. For the end of a
    process's work, when no download is under way."""
    import tempfile

    root, name = Path(tempfile.gettempdir()), re.compile(r"[0-9a-f]{40}")

    def folders() -> set[Path]:
        return {path for path in root.iterdir() if name.fullmatch(path.name)}

    before = folders()
    try:
        yield
    finally:
        for folder in folders() - before:
            with contextlib.suppress(OSError):
                folder.rmdir()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m flux_infer serve --port PORT ARGS...` run in `workdir`, its output in a log file there.

    Returns once `/healthz` answers (the model is loaded); RuntimeError, with the log, if the
    process exits or does not answer within `startup_s`. `http` is an httpx client on its URL.
    """

    def __init__(self, args: list[str], workdir: Path, *, env: dict | None = None, startup_s: float = 360,
                 name: str = "server"):
        import httpx

        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / f"{name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.http = httpx.Client(base_url=self.url, verify=NO_TLS, timeout=30)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flux_infer", "serve", "--port", str(self.port), *map(str, args)],
            cwd=workdir, env={**os.environ, **TELEMETRY_OFF, **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log.close()
                self.http.close()
                raise RuntimeError(f"{name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.http.get("healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling a process that is loading a model
        self.stop()
        raise RuntimeError(f"{name} did not start in {startup_s:g} s:\n{self.log()}")

    def scheduler_depth(self) -> int:
        """Requests waiting in the server's line (its /readyz)."""
        return self.http.get("readyz").json()["queue_depth"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs):
        """A gradio_client Client for this server."""
        from gradio_client import Client

        return Client(self.url, verbose=False, ssl_verify=NO_TLS, **kwargs)

    def pause(self) -> None:
        """Stop the process while something else is timed: an idle Gradio server still polls its
        queue every millisecond (several % of a core), which would tax whatever runs beside it."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (the server drains), then SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.http.close()
