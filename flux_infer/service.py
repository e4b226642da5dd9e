"""What every front end shares around a generation: request ids, metrics, saved outputs, admission.

The Gradio page and API, the OpenAI route and MCP all call `Service.run()`, so each generation is
counted, timed, logged with its request id and (with `--output-dir`) saved the same way,
whichever door it came through. One generation runs at a time (FluxInference's lock); requests
that wait are counted against `max_queue` across all front ends.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from flux_infer import settings
from flux_infer.inference import FluxInference, GenerationCancelled, InvalidRequest

log = logging.getLogger(__name__)

REQUEST_ID = contextvars.ContextVar("request_id", default="-")


class Busy(RuntimeError):
    """Too many requests are waiting; the caller should try again later."""


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record as `%(request_id)s`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


class Metrics:
    """Prometheus metrics in their own registry (prometheus_client), exposed on /metrics."""

    def __init__(self, queue_depth):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("flux_requests", "Generation requests by front end and outcome",
                                ["route", "outcome"], registry=self.registry)
        self.failures = Counter("flux_failures", "Generations that failed on a valid request", ["route"],
                                registry=self.registry)
        self.seconds = Histogram("flux_generation_seconds", "Seconds per generated image", registry=self.registry,
                                 buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 300))
        self.steps_per_second = Gauge("flux_steps_per_second", "Denoising steps per second of the last image",
                                      registry=self.registry)
        self.replica_images = Counter("flux_replica_images", "Images made by each Ray Serve replica (--replicas)",
                                      ["replica"], registry=self.registry)
        depth = Gauge("flux_queue_depth", "Requests waiting for a generation", registry=self.registry)
        depth.set_function(queue_depth)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Service:
    def __init__(self, inference: FluxInference, *, max_queue: int = settings.DEFAULT_MAX_QUEUE,
                 output_dir: Path | None = None, log_prompts: bool = True, concurrency: int = 1):
        self.inference = inference
        self.concurrency = concurrency  # generations at once: 1, or the Ray Serve replicas
        self.max_queue = max_queue
        self.output_dir = Path(output_dir) if output_dir else None
        self.log_prompts = log_prompts
        self._waiting = 0
        self.active = 0  # generations running now
        self._count_lock = threading.Lock()
        self.external_depth = lambda: 0  # set by the web layer: Gradio's own queue
        self.waiting_changed = lambda waiting: None  # set by the web layer: Gradio's room shrinks with ours
        self.metrics = Metrics(self.queue_depth)
        self.ready = True

    def queue_depth(self) -> int:
        return self._waiting + self.external_depth()

    def check_open(self) -> None:
        """Busy while the server drains for shutdown."""
        if not self.ready:
            raise Busy("the server is shutting down: try again when it is back")

    def admit(self) -> None:
        """Count a request (the OpenAI route's, until its images are done) against max_queue, with Gradio's
        queue; Busy when the queue is full or closing."""
        self.check_open()
        with self._count_lock:
            if self.queue_depth() >= self.max_queue:
                raise Busy(f"the server is busy ({self.queue_depth()} requests waiting): try again shortly")
            self._waiting += 1
            self.waiting_changed(self._waiting)

    def release(self) -> None:
        with self._count_lock:
            self._waiting -= 1
            self.waiting_changed(self._waiting)

    def run(self, request, *, route: str, request_id: str | None = None, on_step=None, cancel=None):
        """Generate for a validated request, counting, timing, logging and saving it."""
        token = REQUEST_ID.set(request_id or new_request_id())
        with self._count_lock:
            self.active += 1
        try:
            prompt = request.prompt if self.log_prompts else f"<{len(request.prompt)} characters>"
            log.info("%s request: %r, %dx%d, %d steps, seed %d", route, prompt, request.width, request.height,
                     request.num_inference_steps, request.seed)
            try:
                result = self.inference.run(request, on_step=on_step, cancel=cancel)
            except GenerationCancelled:
                self.metrics.requests.labels(route, "cancelled").inc()
                raise
            except InvalidRequest:
                self.metrics.requests.labels(route, "invalid").inc()
                raise
            except Exception:
                self.metrics.requests.labels(route, "failed").inc()
                self.metrics.failures.labels(route).inc()
                raise
            self.metrics.requests.labels(route, "ok").inc()
            self.metrics.seconds.observe(result.seconds)
            self.metrics.steps_per_second.set(request.num_inference_steps / max(result.seconds, 1e-9))
            if result.replica:
                self.metrics.replica_images.labels(result.replica).inc()
            if self.output_dir is not None:
                self.save(result)
            return result
        finally:
            with self._count_lock:
                self.active -= 1
            REQUEST_ID.reset(token)

    def count_rejected(self, route: str, outcome: str) -> None:
        """A request refused before it reached run(): invalid input or a full queue."""
        self.metrics.requests.labels(route, outcome).inc()

    def save(self, result) -> Path:
        """`--output-dir`: the image with its settings in its PNG text chunks, and a JSON sidecar."""
        from flux_infer.images import save_image

        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{result.seed}-{REQUEST_ID.get()}"
        path = self.output_dir / f"{stem}.png"
        save_image(result.image, path)
        sidecar = {**asdict(result.request), "seconds": round(result.seconds, 3), "request_id": REQUEST_ID.get(),
                   "model": "FLUX.1-dev", "file": path.name}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
        log.info("saved %s", path)
        return path

