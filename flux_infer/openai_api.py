"""The OpenAI Images API: `POST /v1/images/generations`, `GET /v1/models`, and the files it links to.

Requests go through the same validation (`build_request`) and the same `Service.run()` as `/infer`,
so a seed gives the same image through either door. Every field is either used or refused with a
400 in OpenAI's error shape: nothing is silently ignored. Extensions in the body: `seed`,
`guidance_scale`, `num_inference_steps`; the response carries the seed of each image.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations, and
# `Request` is imported inside router(), where only evaluated annotations can see it.

import asyncio
import base64
import io
import json
import logging
import re
import secrets
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from flux_infer import settings
from flux_infer.inference import GenerationCancelled, GenerationFailed, InvalidRequest, build_request, draw_seed
from flux_infer.service import REQUEST_ID, Busy, Service, new_request_id

log = logging.getLogger(__name__)

MODEL_IDS = ("flux.1-dev", "black-forest-labs/FLUX.1-dev")
MAX_IMAGES = 4
RESPONSE_FORMATS = ("b64_json", "url")
FIELDS = ("prompt", "model", "n", "size", "response_format", "user", "seed", "guidance_scale", "num_inference_steps")
MAX_BODY_BYTES = 64 * 1024
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_FILE = re.compile(r"^[0-9a-f]{32}\.png$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def parse_body(body: object) -> dict:
    """The request's fields, checked; ApiError(400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object with at least a `prompt`")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ApiError(400, f"unsupported field(s) {', '.join(unknown)}: this server accepts {', '.join(FIELDS)}",
                       param=unknown[0])
    if "prompt" not in body:
        raise ApiError(400, "`prompt` is required", param="prompt")
    model = body.get("model", MODEL_IDS[0])
    if model not in MODEL_IDS:
        raise ApiError(400, f"unknown model {model!r}: this server serves {' or '.join(MODEL_IDS)}", param="model",
                       code="model_not_found")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise ApiError(400, f"`n` must be a whole number from 1 to {MAX_IMAGES}, got {n!r}", param="n")
    size = body.get("size", f"{int(settings.WIDTH.default)}x{int(settings.HEIGHT.default)}")
    match = _SIZE.match(size) if isinstance(size, str) else None
    if not match:
        raise ApiError(400, f"`size` must be \"WIDTHxHEIGHT\" such as \"1024x768\", got {size!r}", param="size")
    response_format = body.get("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise ApiError(400, f"`response_format` must be b64_json or url, got {response_format!r}",
                       param="response_format")
    if "user" in body and not isinstance(body["user"], str):
        raise ApiError(400, "`user` must be a string", param="user")
    seed = body.get("seed")
    arguments = dict(width=int(match.group(1)), height=int(match.group(2)),
                     guidance_scale=body.get("guidance_scale", settings.GUIDANCE_SCALE.default),
                     num_inference_steps=body.get("num_inference_steps", settings.NUM_INFERENCE_STEPS.default))
    try:
        base = build_request(body["prompt"], seed=0 if seed is None else seed, randomize_seed=False, **arguments)
    except InvalidRequest as err:
        param = str(err).split(" ", 1)[0]
        raise ApiError(400, str(err), param=param if param in FIELDS or param in ("width", "height") else None) from None
    # Image i gets seed + i (wrapping in the Space's range), or a fresh random seed each.
    seeds = [draw_seed() if seed is None else (base.seed + index) % (settings.MAX_SEED + 1) for index in range(n)]
    requests = [replace(base, seed=image_seed) for image_seed in seeds]
    return {"requests": requests, "response_format": response_format, "user": body.get("user")}


class ImageFiles:
    """PNG files behind `response_format: url`, deleted after `keep_seconds`."""

    def __init__(self, directory: Path | None = None, keep_seconds: float = settings.DEFAULT_KEEP_OUTPUTS_S):
        self.directory = Path(directory or tempfile.mkdtemp(prefix="flux-infer-v1-"))
        self.keep_seconds = keep_seconds

    def add(self, image) -> str:
        from flux_infer.images import save_image

        self.sweep(self.keep_seconds)
        name = f"{secrets.token_hex(16)}.png"
        save_image(image, self.directory / name)
        return name

    def path(self, name: str) -> Path | None:
        """The file for a name this server handed out, or None (no other path can be reached)."""
        if not _FILE.match(name):
            return None
        path = self.directory / name
        try:
            fresh = path.stat().st_mtime >= time.time() - self.keep_seconds
        except FileNotFoundError:
            return None
        return path if fresh else None

    def sweep(self, age: float | None) -> int:
        """Delete the files older than `age` seconds (None: all of them); returns how many."""
        cutoff = None if age is None else time.time() - age
        deleted = 0
        for path in self.directory.glob("*.png"):
            try:
                if cutoff is None or path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                pass
        return deleted


async def _watch_disconnect(request, gone: threading.Event, every: float = 0.25) -> None:
    """Set `gone` when the HTTP client disconnects (timed out, closed), so no GPU time goes on an image
    nobody will receive."""
    while not gone.is_set():
        if await request.is_disconnected():
            gone.set()
            return
        await asyncio.sleep(every)


def router(service: Service, *, api_key: str | None = None, files: ImageFiles | None = None):
    from fastapi import APIRouter, Request
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    files = files or ImageFiles()
    routes = APIRouter()

    def encode(results, response_format: str) -> list[dict]:
        """The response's items: PNG bytes (base64) or a file name for the url. Runs in a worker
        thread: encoding a 1024x1024 PNG takes a good fraction of a second, which on the event loop
        would stall every other door's streams."""
        data = []
        for result in results:
            item = {"revised_prompt": result.request.prompt, "seed": result.seed}
            if response_format == "url":
                item["file"] = files.add(result.image)
            else:
                buffer = io.BytesIO()
                result.image.save(buffer, format="PNG")
                item["b64_json"] = base64.b64encode(buffer.getvalue()).decode("ascii")
            data.append(item)
        return data

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` (the server's --api-key)",
                           code="invalid_api_key")

    @routes.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as err:
            return err.response()
        created = 1722470400  # FLUX.1-dev's release, 2024-08-01
        return {"object": "list", "data": [{"id": MODEL_IDS[0], "object": "model", "created": created,
                                            "owned_by": "black-forest-labs"}]}

    @routes.post("/v1/images/generations")
    async def generations(request: Request):
        request_id = request.headers.get("x-request-id") or new_request_id()
        token = REQUEST_ID.set(request_id)  # this route's log lines carry it too
        try:
            return await generate_images(request, request_id)
        finally:
            REQUEST_ID.reset(token)

    async def generate_images(request: Request, request_id: str):
        try:
            check_key(request)
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nested too deep to be a real request
                raise ApiError(400, "the body is not valid JSON") from None
            parsed = parse_body(body)
        except ApiError as err:
            service.count_rejected("openai", "invalid")
            return err.response()
        try:
            ticket = service.admit("openai")
        except Busy as err:  # counted by admit()
            return ApiError(503, str(err), kind="server_error", code="busy").response()
        gone = threading.Event()  # the caller hung up: leave the line, or stop at the end of the current step
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            turn = asyncio.ensure_future(service.wait_turn(ticket))
            await asyncio.wait((turn, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not turn.done():  # the caller left while waiting: it never generates
                turn.cancel()
                await asyncio.gather(turn, return_exceptions=True)
                service.count_rejected("openai", "cancelled")
                log.info("the caller closed the connection while waiting in line")
                return ApiError(499, "the client closed the request", kind="server_error").response()

            def generate_all():  # one ticket, one slot, for the request's n images
                return [service.run(generation, route="openai", request_id=request_id, cancel=gone)
                        for generation in parsed["requests"]]

            results = await run_in_threadpool(generate_all)
            data = await run_in_threadpool(encode, results, parsed["response_format"])
        except GenerationCancelled as err:
            log.info("the caller closed the connection: %s", err)
            return ApiError(499, "the client closed the request", kind="server_error").response()
        except GenerationFailed as err:
            return ApiError(500, str(err), kind="server_error", code="generation_failed").response()
        except Exception as err:  # the log has the traceback, the caller one line
            log.error("openai generation failed", exc_info=err)
            return ApiError(500, f"generation failed ({type(err).__name__}); the server log has the details",
                            kind="server_error").response()
        finally:
            watcher.cancel()
            service.done(ticket)
        for item in data:
            if "file" in item:
                item["url"] = str(request.url_for("image_file", name=item.pop("file")))
        return JSONResponse({"created": int(time.time()), "data": data, "seeds": [r.seed for r in results]},
                            headers={"x-request-id": request_id})

    @routes.get("/v1/files/{name}", name="image_file")
    async def image_file(name: str, request: Request):
        try:
            check_key(request)
        except ApiError as err:
            return err.response()
        path = files.path(name)
        if path is None:
            return ApiError(404, f"no image {name!r} here (they are kept for {files.keep_seconds:g} s)",
                            code="not_found").response()
        return FileResponse(path, media_type="image/png")

    return routes

