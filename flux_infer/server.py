"""One process, one port: the Gradio page and API, the OpenAI route, MCP and the ops routes.

A FastAPI app holds `/healthz`, `/readyz`, `/metrics` (OpsRoutes) and `/v1/...` (openai_api); the
Gradio Blocks are mounted at `/` beside them (with `--auth` and `--mcp` when asked), Housekeeping
runs beside them, and uvicorn serves the lot, draining on a signal (DrainingServer). Imported only
to serve: it imports uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn

from flux_infer import gradio_internals, settings

log = logging.getLogger(__name__)

CSS = """
#col-container {
    margin: 0 auto;
    max-width: 520px;
}
/* Previews (latent: 1/8 of the image; TAEF1: up to 512 px) fill the result box at the final
   image's aspect ratio, scaled by the browser, so the box keeps its size when the image arrives. */
#result .image-frame, #result img, #edit-result .image-frame, #edit-result img {
    width: 100%;
    height: auto;
    max-height: none;
    object-fit: contain;
}
.step-line { min-height: 1.5em; text-align: center; }
"""


# How long SIGTERM waits for generations in flight and queued, and then for their downloads.
DRAIN_SECONDS = 120
DOWNLOAD_GRACE_S = 2.0
# How often images older than --keep-outputs are looked for (sooner when --keep-outputs is shorter).
SWEEP_EVERY_S = 600.0
# Largest request body accepted on a route without a limit of its own (text and numbers; uploads
# go to /v1/images/edits, whose limit is openai_api.MAX_EDIT_BODY_BYTES).
MAX_BODY_BYTES = 1024 * 1024


class BodyLimit:
    """ASGI middleware, the one body-size limit: a request body over its route's limit (`limits`:
    path prefix -> bytes, else `default`) gets a 413 JSON answer and is read no further."""

    def __init__(self, app, limits: dict[str, int] | None = None, default: int = MAX_BODY_BYTES):
        self.app, self.limits, self.default = app, limits or {}, default

    def limit(self, path: str) -> int:
        return next((size for prefix, size in self.limits.items() if path.startswith(prefix)), self.default)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope.get("path", ""))
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(limit, scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(limit, scope, receive, send)

    @staticmethod
    async def _refuse(limit, scope, receive, send):
        from flux_infer.openai_api import ApiError

        response = ApiError(413, f"the request body is larger than this route takes: the limit is {limit} bytes",
                            code="body_too_large").response()
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class ServerConfig:
    host: str = settings.DEFAULT_HOST
    port: int = settings.DEFAULT_PORT
    auth: tuple[str, str] | None = None  # protects the page and the Gradio API
    api_key: str | None = None  # protects the OpenAI route
    model_aliases: tuple[str, ...] = ()  # more `model` names the OpenAI route answers to
    mcp: bool = False
    keep_outputs: float = settings.DEFAULT_KEEP_OUTPUTS_S


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth takes USER:PASSWORD")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Housekeeping:
    """What runs beside the server for its whole life (the app's lifespan): the served images'
    temporary files (Gradio's and /v1's) are deleted once older than `keep_seconds`, looked for every
    so often and all deleted at the end (with /v1's folder); and MCP's session manager, when MCP is on."""

    def __init__(self, demo, files, keep_seconds: float, mcp=None):
        self.demo, self.files, self.keep_seconds, self.mcp = demo, files, keep_seconds, mcp

    def sweep(self, age: float | None) -> None:
        """Delete the temporary images older than `age` seconds; None, at shutdown: every one, and
        /v1's folder."""
        from flux_infer import web

        deleted = web.sweep_files(self.demo, age) + (self.files.sweep(age) if age is not None else self.files.close())
        if deleted:
            log.debug("deleted %d temporary image files", deleted)

    async def sweep_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.sweep, self.keep_seconds)
            except Exception as err:  # a full or read-only disk, anything: say so, try again next time
                log.warning("could not delete old temporary images (will try again): %s: %s",
                            type(err).__name__, err)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        task = asyncio.create_task(self.sweep_forever(min(max(self.keep_seconds, 1.0), SWEEP_EVERY_S)))
        try:
            async with self.mcp.session_manager.run() if self.mcp else contextlib.nullcontext():
                yield
        finally:
            task.cancel()
            self.sweep(None)


class OpsRoutes:
    """`/healthz` (the process answers), `/readyz` (it takes work: 503 while closing) and `/metrics`
    (Prometheus), over one Service."""

    def __init__(self, service):
        self.service = service

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        from fastapi.responses import JSONResponse

        service, ready = self.service, self.service.ready  # read once: the body and the status agree
        body = {"ready": ready, "model_loaded": True, "queue_depth": service.queue_depth(),
                "running": service.scheduler.running, "max_queue": service.max_queue}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self):
        from fastapi.responses import Response

        payload, content_type = self.service.metrics.render()
        return Response(payload, media_type=content_type)

    def register(self, app) -> None:
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/readyz", self.readyz, methods=["GET"])
        app.add_api_route("/metrics", self.metrics, methods=["GET"])


def build_app(service, demo, config: ServerConfig):
    """The FastAPI app with every route; `demo` is queued and mounted at `/`."""
    import gradio as gr
    from fastapi import FastAPI

    from flux_infer import openai_api

    files = openai_api.ImageFiles(keep_seconds=config.keep_outputs)
    mcp = None
    if config.mcp:
        from flux_infer.mcp_tool import build_mcp

        mcp = build_mcp(service, host=config.host)
    housekeeping = Housekeeping(demo, files, config.keep_outputs, mcp)

    app = FastAPI(title="flux-infer", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=housekeeping.lifespan)
    OpsRoutes(service).register(app)
    app.include_router(openai_api.router(service, api_key=config.api_key, files=files,
                                         aliases=config.model_aliases))
    app.add_exception_handler(openai_api.ApiError, openai_api.api_error_handler)

    if mcp:
        from flux_infer.mcp_tool import MOUNT_PATH

        app.mount(MOUNT_PATH, mcp.streamable_http_app())  # before the page's mount at `/`
    app.add_middleware(BodyLimit, limits={"/v1/images/edits": openai_api.MAX_EDIT_BODY_BYTES,
                                          "/v1/": openai_api.MAX_BODY_BYTES,
                                          # the Edit tab's image (flux_infer.uploads bounds it again)
                                          "/gradio_api/upload": settings.MAX_UPLOAD_BYTES + openai_api.MAX_BODY_BYTES})
    # Gradio's queue holds nothing back and refuses nothing: every request reaches the handler at
    # once and waits in the service's one line, which admits, orders and refuses for every door.
    # At most slots + max_queue requests are in the line, so this finite limit never binds (with no
    # limit at all, one run of bench/overhead.py took ~0.3 s more per request).
    room = service.concurrency + service.max_queue
    demo.queue(default_concurrency_limit=room + 1, max_size=None)
    app = gr.mount_gradio_app(
        app, demo, path="/", server_name=config.host, server_port=config.port,
        auth=config.auth, css=CSS,
        # Our own errors are gr.Error already; this lets Gradio's own checks (a raw HTTP call with
        # too few values, say) reach the caller as their message instead of a bare "error".
        show_error=True,
    )
    gradio_internals.check_mounted(app)
    return app


class _QuietStreamClose(logging.Filter):
    """At shutdown uvicorn cancels the streams still open (page heartbeats, event streams) and logs
    each as an error with a traceback; that is the expected end of a stream, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return False
        return "timeout graceful shutdown exceeded" not in record.getMessage()


def claim_address(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (uvicorn starts listening on it once the
    model is ready; until then connections are refused, as if nothing were there). A port in use or
    an address this machine does not have is said at once, not after the minutes a load can take.
    Port 0 takes any free port (the log says which)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535 (or 0: any free port), got {port}")
    # The family as uvicorn picks it (a name such as localhost binds its IPv4 address).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if isinstance(err, socket.gaierror):
            raise ValueError(f"--host {host} is not a name or address this machine can resolve ({err.strerror}): "
                             "use 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use (another server, or an earlier flux-infer still "
                             "running): stop it, or pick another --port") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--host {host} is not an address of this machine: use 127.0.0.1 (this machine "
                             "only), 0.0.0.0 (every network) or one of its own addresses") from None
        if err.errno == errno.EACCES:
            raise ValueError(f"port {port} needs administrator rights here: pick one above 1023 "
                             f"(the default is {settings.DEFAULT_PORT})") from None
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def exposure_warnings(config: ServerConfig) -> list[str]:
    """What is open to the network when binding beyond this machine."""
    if is_loopback(config.host):
        return []
    warnings = []
    if config.auth is None:
        warnings.append(f"serving on {config.host} without --auth: anyone who can reach this address can use "
                        "the page and the Gradio API (add --auth USER:PASSWORD)")
    if config.api_key is None:
        warnings.append(f"the OpenAI route on {config.host} has no --api-key: anyone who can reach it can "
                        "generate (add --api-key KEY)")
    return warnings


class DrainingServer(uvicorn.Server):
    """uvicorn, draining on SIGTERM/SIGINT instead of closing the door on work in flight.

    The first signal closes the line (new requests at every door are refused as "shutting down",
    /readyz answers 503); every request already admitted, running or waiting, whatever its door, is
    still served, for up to DRAIN_SECONDS; then up to DOWNLOAD_GRACE_S after the last generation ended
    for clients to fetch their images, the page and gradio_client heartbeat streams are ended, and
    uvicorn stops; the process exits with 0. A second signal stops at once, as does the first one
    before the service is ready.
    """

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service
        self.draining = None

    async def startup(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame):
        if not self.service.ready:
            self.should_exit = self.force_exit = True
            return
        self.service.close()
        log.info("shutting down: draining %d running and %d waiting (a second signal stops now)",
                 self.service.scheduler.running, self.service.scheduler.waiting)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self):
        self.draining = self.loop.create_task(self.drain())  # held: the loop keeps tasks only weakly

    async def drain(self):
        scheduler = self.service.scheduler
        with contextlib.suppress(asyncio.TimeoutError):  # what is still running then is cut off
            await asyncio.wait_for(scheduler.drained(), DRAIN_SECONDS)
        # A client told its image is ready a moment ago may not have asked for the file yet.
        if scheduler.last_finished is not None:
            await asyncio.sleep(max(0.0, scheduler.last_finished + DOWNLOAD_GRACE_S - time.monotonic()))
        # Pages and gradio_clients keep a heartbeat stream open; uvicorn would wait for them.
        gradio_internals.end_streams(self.config.app)
        self.should_exit = True


def serve(service, demo, config: ServerConfig, sock: socket.socket) -> None:
    """Build the app and serve it with uvicorn until interrupted, on `sock` (from `claim_address`,
    bound before the model loaded)."""
    for warning in exposure_warnings(config):
        log.warning(warning)
    logging.getLogger("uvicorn.error").addFilter(_QuietStreamClose())
    app = build_app(service, demo, config)
    port = sock.getsockname()[1]
    log.info("serving on http://%s:%d (page and /infer at /, OpenAI route at /v1%s)",
             f"[{config.host}]" if ":" in config.host else config.host, port,
             ", MCP at /gradio_api/mcp/" if config.mcp else "")
    DrainingServer(uvicorn.Config(app, host=config.host, port=port, log_level="warning",
                                  timeout_graceful_shutdown=5), service).run(sockets=[sock])
    service.saved()  # the last images' --output-dir files
    log.info("stopped")
