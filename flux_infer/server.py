"""One process, one port: the Gradio page and API, the OpenAI route, MCP and the ops routes.

A FastAPI app holds `/healthz`, `/readyz`, `/metrics` and `/v1/...`; the Gradio Blocks are mounted
at `/` beside them (with `--auth` and `--mcp` when asked), and uvicorn serves the lot.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from flux_infer import settings

log = logging.getLogger(__name__)

CSS = """
#col-container {
    margin: 0 auto;
    max-width: 520px;
}
"""


@dataclass(frozen=True)
class ServerConfig:
    host: str = settings.DEFAULT_HOST
    port: int = settings.DEFAULT_PORT
    auth: tuple[str, str] | None = None  # protects the page and the Gradio API
    api_key: str | None = None  # protects the OpenAI route
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


def build_app(service, demo, config: ServerConfig):
    """The FastAPI app with every route; `demo` is queued and mounted at `/`."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    from flux_infer import openai_api

    app = FastAPI(title="flux-infer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready = service.ready
        body = {"ready": ready, "model_loaded": ready, "queue_depth": service.queue_depth(),
                "max_queue": service.max_queue}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        payload, content_type = service.metrics.render()
        return Response(payload, media_type=content_type)

    files = openai_api.ImageFiles(keep_seconds=config.keep_outputs)
    app.include_router(openai_api.router(service, api_key=config.api_key, files=files))

    demo.queue(default_concurrency_limit=1, max_size=service.max_queue)
    return gr.mount_gradio_app(
        app, demo, path="/", server_name=config.host, server_port=config.port,
        auth=config.auth, mcp_server=config.mcp or None, css=CSS,
        # Our own errors are gr.Error already; this lets Gradio's own checks (a raw HTTP call with
        # too few values, say) reach the caller as their message instead of a bare "error".
        show_error=True,
    )


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


def serve(service, demo, config: ServerConfig) -> None:
    """Build the app and serve it with uvicorn until interrupted."""
    import uvicorn

    for warning in exposure_warnings(config):
        log.warning(warning)
    app = build_app(service, demo, config)
    log.info("serving on http://%s:%d (page and /infer at /, OpenAI route at /v1%s)", config.host, config.port,
             ", MCP at /gradio_api/mcp/" if config.mcp else "")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=30)
