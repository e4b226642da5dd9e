"""What every front end shares around a generation: the line, request ids, metrics, saved outputs.

Every door (the page and `/infer`, MCP, the OpenAI route) takes a ticket with `Service.admit()`,
waits its turn in the one scheduler (`flux_infer.scheduler`), and generates through
`Service.run()` (or `Service.stream()`, which does both and streams the steps), so each
generation is admitted, ordered, counted, timed, logged with its request id and (with
`--output-dir`) saved the same way whichever door it came through. Saving runs beside the next
requests, in a thread of its own: the caller gets its image without waiting for the PNG encode
and the disk.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from flux_infer import settings
from flux_infer.inference import GenerationCancelled, InvalidRequest, build_request, check_strength, stream_run
from flux_infer.scheduler import Busy, Scheduler, Ticket

log = logging.getLogger(__name__)

REQUEST_ID = contextvars.ContextVar("request_id", default="-")
__all__ = ["Busy", "Service", "REQUEST_ID", "RequestIdFilter", "new_request_id", "unexpected_failure"]


def unexpected_failure(route: str, err: Exception) -> str:
    """A generation that failed with an exception no message was written for (a library's own, a bug):
    the one line every door tells its caller, which names the exception's type but not its text (a
    library's internals: shapes, paths), and the traceback in the server's log."""
    log.error("%s generation failed", route, exc_info=err)
    return f"generation failed ({type(err).__name__}); the server log has the details"


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
        self.seconds = Histogram("flux_generation_seconds", "Seconds per generated image, not counting the wait "
                                 "in line", registry=self.registry,
                                 buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 300))
        self.queue_wait = Histogram("flux_queue_wait_seconds", "Seconds a request waited in line before it started",
                                    ["route"], registry=self.registry,
                                    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320))
        self.steps_per_second = Gauge("flux_steps_per_second", "Denoising steps per second of the last image",
                                      registry=self.registry)
        self.gpu_peak = Gauge("flux_gpu_memory_peak_bytes", "The most GPU memory torch's allocator held while the "
                              "last image was made, weights included (0 without a GPU)", registry=self.registry)
        self.replica_images = Counter("flux_replica_images", "Images made by each Ray Serve replica (--replicas)",
                                      ["replica"], registry=self.registry)
        self.replica_seconds = Histogram("flux_replica_generation_seconds", "Seconds per image on each Ray Serve "
                                         "replica, as the replica timed it", ["replica"], registry=self.registry,
                                         buckets=(0.5, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 300))
        depth = Gauge("flux_queue_depth", "Requests waiting for a generation", registry=self.registry)
        depth.set_function(queue_depth)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def output_folder(folder: Path) -> Path:
    """`--output-dir`, made now and found writable, or said with what to do before the model loads."""
    import tempfile

    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"--output-dir {folder} cannot be written ({err.strerror or err}): point it at a folder "
                         "you can write to") from None
    return folder


class Service:
    def __init__(self, inference, *, max_queue: int = settings.DEFAULT_MAX_QUEUE,
                 output_dir: Path | None = None, log_prompts: bool = True, concurrency: int = 1, loras=None):
        self.inference = inference  # a flux_infer.inference.Backend
        self.loras = loras  # the flux_infer.loras.LoraLibrary requests may choose from (--lora-dir), or None
        self.concurrency = concurrency  # generations at once: 1, or the Ray Serve replicas
        self.max_queue = max_queue
        self.output_dir = Path(output_dir) if output_dir else None
        self.log_prompts = log_prompts
        self.scheduler = Scheduler(slots=concurrency, max_queue=max_queue)
        self.metrics = Metrics(self.queue_depth)
        # --output-dir: one thread writes the images, in order, off the caller's path (encoding a
        # 1024x1024 PNG and writing it takes about 0.1 s of CPU, which the caller need not wait for).
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-save") if self.output_dir else None

    @property
    def ready(self) -> bool:
        return not self.scheduler.closed

    def close(self) -> None:
        """Refuse new requests at every door; those admitted are still served."""
        self.scheduler.close()

    def queue_depth(self) -> int:
        """Requests waiting in line, from every door."""
        return self.scheduler.waiting

    def admit(self, route: str) -> Ticket:
        """A place in line for a validated request; Busy (counted) when the line is full or closing.
        Call it on the server's event loop."""
        try:
            return self.scheduler.admit(route)
        except Busy:
            self.count_rejected(route, "busy")
            raise

    def admit_request(self, route: str, *, loras=None, edit: dict | None = None, **arguments):
        """The Space's arguments (build_request's), the request's LoRAs and, for an edit, its
        `edit` (image, mask, strength) validated, and a place in line for them: (request, ticket);
        InvalidRequest or Busy, each counted, otherwise. On the event loop."""
        try:
            request = replace(build_request(**arguments), loras=self.choose_loras(loras))
            if edit is not None:
                request = replace(request, image=edit["image"], mask=edit.get("mask"),
                                  strength=check_strength(edit.get("strength", settings.STRENGTH.default)))
        except InvalidRequest:
            self.count_rejected(route, "invalid")
            raise
        return request, self.admit(route)

    def choose_loras(self, loras):
        """A request's LoRAs (see flux_infer.loras.parse_loras) validated against --lora-dir."""
        from flux_infer.loras import parse_loras

        return parse_loras(loras, self.loras)

    async def wait_turn(self, ticket: Ticket, on_position=None) -> None:
        """Wait in line (see Scheduler.turn); the wait is measured per route."""
        await self.scheduler.turn(ticket, on_position)
        self.metrics.queue_wait.labels(ticket.route).observe(ticket.waited)

    def done(self, ticket: Ticket) -> None:
        """The ticket's generation is over (or it never started): the next in line may go."""
        self.scheduler.leave(ticket)

    async def stream(self, ticket: Ticket, request, *, request_id: str, on_position=None):
        """Wait for `ticket`'s turn, then generate in a worker thread, yielding each Step and then the
        GenerationResult. The slot is given back when the worker has really stopped, so a cancelled
        generation still finishing its step never overlaps the next one."""
        started = False
        try:
            await self.wait_turn(ticket, on_position)
            started = True
            run = functools.partial(self.run, route=ticket.route, request_id=request_id)
            async for item in stream_run(run, request, finished=lambda: self.done(ticket)):
                yield item
        finally:
            if not started:
                self.done(ticket)

    def run(self, request, *, route: str, request_id: str | None = None, on_step=None, cancel=None):
        """Generate for a validated request whose ticket has its turn, counting, timing, logging and
        saving it (in a worker thread: it blocks until the image is made)."""
        token = REQUEST_ID.set(request_id or new_request_id())
        try:
            prompt = request.prompt if self.log_prompts else f"<{len(request.prompt)} characters>"
            log.info("%s request: %r, %dx%d, %d steps, seed %d%s", route, prompt, request.width, request.height,
                     request.num_inference_steps, request.seed,
                     "".join(f", LoRA {lora.name}:{lora.scale:g}" for lora in request.loras))
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
            if result.gpu_peak_bytes is not None:
                self.metrics.gpu_peak.set(result.gpu_peak_bytes)
            if result.replica:
                self.metrics.replica_images.labels(result.replica).inc()
                self.metrics.replica_seconds.labels(result.replica).observe(result.seconds)
            if self._saver is not None:
                # Its own copy of the image: a Pillow image is not safe to save from two threads at
                # once (save() sets its encoder parameters on it), and the caller's is being encoded
                # beside it. With this request's id, for the file's name and the log.
                self._saver.submit(contextvars.copy_context().run, self._save_or_say,
                                   replace(result, image=result.image.copy()))
            return result
        finally:
            REQUEST_ID.reset(token)

    def count_rejected(self, route: str, outcome: str) -> None:
        """A request refused before it reached run(): invalid input, a full line, a closing server."""
        self.metrics.requests.labels(route, outcome).inc()

    def _save_or_say(self, result) -> None:
        try:
            self.save(result)
        except OSError as err:  # a full disk, a folder removed: the caller has the image all the same
            log.error("could not save the image in --output-dir %s (%s); the client gets it all the same",
                      self.output_dir, err)
        except Exception as err:  # nobody waits on this thread: say it, or it would go unseen
            log.error("could not save the image in --output-dir %s", self.output_dir, exc_info=err)

    def saved(self) -> None:
        """Wait until every image generated so far is written in --output-dir (or its failure logged)."""
        if self._saver is not None:
            self._saver.submit(lambda: None).result()

    def save(self, result) -> Path:
        """`--output-dir`: the image with its settings in its PNG text chunks, and a JSON sidecar."""
        from flux_infer.images import save_image

        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{result.seed}-{REQUEST_ID.get()}"
        path = self.output_dir / f"{stem}.png"
        save_image(result.image, path)
        sidecar = {**result.request.settings(), "seconds": round(result.seconds, 3), "request_id": REQUEST_ID.get(),
                   "model": "FLUX.1-dev", "file": path.name}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
        log.info("saved %s", path)
        return path

