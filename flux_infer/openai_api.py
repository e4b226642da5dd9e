"""The OpenAI Images API: `POST /v1/images/generations`, `GET /v1/models`, and the files it links to.

The body is an `ImageRequest` (pydantic; unknown fields refused), then the same validation
(`build_request`) and the same line and `Service.run()` as `/infer`, so a seed gives the same
image through either door. Every field is either used or refused with a 400 in OpenAI's error
shape (`ApiError`, turned into a response by the one handler `build_app` registers): nothing is
silently ignored. Extensions in the body: `seed`, `guidance_scale`, `num_inference_steps`; the
response carries the seed of each image. The API key is a dependency of every route.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations, and
# `Request` is imported inside router(), where only evaluated annotations can see it.

import asyncio
import base64
import io
import logging
import re
import secrets
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, field_validator

from flux_infer import settings
from flux_infer.inference import GenerationCancelled, GenerationFailed, InvalidRequest, build_request, draw_seed
from flux_infer.service import REQUEST_ID, Busy, Service, new_request_id

log = logging.getLogger(__name__)

MODEL_IDS = ("flux.1-dev", "black-forest-labs/FLUX.1-dev")
MAX_IMAGES = 4
# The largest body this route reads (server.BodyLimit enforces it): a prompt and a few numbers.
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


class ImageRequest(BaseModel):
    """`POST /v1/images/generations`'s body. The Space's own arguments (prompt, seed, guidance,
    steps, the size's numbers) are checked by `build_request`, as on every door."""

    model_config = ConfigDict(extra="forbid")

    prompt: Any
    model: StrictStr = MODEL_IDS[0]
    n: StrictInt = 1
    size: StrictStr = f"{int(settings.WIDTH.default)}x{int(settings.HEIGHT.default)}"
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: StrictStr | None = None
    # Extensions: the Space's arguments that the OpenAI API has no field for.
    seed: Any = None
    guidance_scale: Any = settings.GUIDANCE_SCALE.default
    num_inference_steps: Any = settings.NUM_INFERENCE_STEPS.default

    @field_validator("model")
    @classmethod
    def _served(cls, model: str) -> str:
        if model not in MODEL_IDS:
            raise ValueError(f"unknown model {model!r}: this server serves {' or '.join(MODEL_IDS)}")
        return model

    @field_validator("n")
    @classmethod
    def _count(cls, n: int) -> int:
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"`n` must be a whole number from 1 to {MAX_IMAGES}, got {n}")
        return n

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        if not _SIZE.match(size):
            raise ValueError(f"`size` must be \"WIDTHxHEIGHT\" such as \"1024x768\", got {size!r}")
        return size

    def generation_requests(self) -> list:
        """The n validated GenerationRequests: seed, seed + 1, ... or a fresh random seed each."""
        width, height = map(int, self.size.split("x"))
        try:
            base = build_request(self.prompt, seed=0 if self.seed is None else self.seed, randomize_seed=False,
                                 width=width, height=height, guidance_scale=self.guidance_scale,
                                 num_inference_steps=self.num_inference_steps)
        except InvalidRequest as err:
            param = str(err).split(" ", 1)[0]
            raise ApiError(400, str(err), param=param if param in FIELDS else None) from None
        # Image i gets seed + i (wrapping in the Space's range), or a fresh random seed each.
        seeds = [draw_seed() if self.seed is None else (base.seed + index) % (settings.MAX_SEED + 1)
                 for index in range(self.n)]
        return [replace(base, seed=image_seed) for image_seed in seeds]


FIELDS = (*ImageRequest.model_fields, "width", "height")
# What pydantic's error types mean here, where the field's own message does not say.
_MESSAGES = {
    "missing": "`{field}` is required",
    "extra_forbidden": "unsupported field(s) {field}: this server accepts " + ", ".join(ImageRequest.model_fields),
    "literal_error": "`{field}` must be b64_json or url, got {value!r}",
    "json_invalid": "the body is not valid JSON",
    "model_type": "the body must be a JSON object with at least a `prompt`",
}


def parse_body(raw: bytes) -> ImageRequest:
    """The request body as an ImageRequest; ApiError(400) naming the field otherwise."""
    try:
        return ImageRequest.model_validate_json(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = errors[0]
        field = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            field = ", ".join(sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"))
        if first["type"] == "value_error":
            message = str(first["ctx"]["error"])
        elif first["type"] in _MESSAGES:
            message = _MESSAGES[first["type"]].format(field=field, value=first.get("input"))
        else:
            message = f"`{field}`: {first['msg']}, got {first.get('input')!r}"
        code = "model_not_found" if field == "model" and first["type"] == "value_error" else None
        raise ApiError(400, message, param=field.split(", ")[0] if field else None, code=code) from None


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


def bearer_key(api_key: str | None):
    """A FastAPI dependency: the request's `Authorization: Bearer` must carry `api_key` (when set)."""
    from fastapi import Request

    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` (the server's --api-key)",
                           code="invalid_api_key")

    return check


async def api_error_handler(request, err: ApiError):
    """The one place an ApiError becomes OpenAI's error shape (registered by server.build_app)."""
    return err.response()


def _encode(results, response_format: str, files: ImageFiles) -> list[dict]:
    """The response's items: PNG bytes (base64) or a file name for the url. Called in a worker
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


def router(service: Service, *, api_key: str | None = None, files: ImageFiles | None = None):
    """`/v1`'s routes. Their ApiErrors need `api_error_handler` on the app (server.build_app)."""
    from fastapi import APIRouter, Depends, Request
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    files = files or ImageFiles()
    routes = APIRouter(dependencies=[Depends(bearer_key(api_key))])

    @routes.get("/v1/models")
    async def models():
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
            body = parse_body(await request.body())
            generation_requests = body.generation_requests()
        except ApiError:
            service.count_rejected("openai", "invalid")
            raise
        try:
            ticket = service.admit("openai")
        except Busy as err:  # counted by admit()
            raise ApiError(503, str(err), kind="server_error", code="busy") from None
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
                raise ApiError(499, "the client closed the request", kind="server_error")

            def generate_all():  # one ticket, one slot, for the request's n images
                return [service.run(generation, route="openai", request_id=request_id, cancel=gone)
                        for generation in generation_requests]

            results = await run_in_threadpool(generate_all)
            data = await run_in_threadpool(_encode, results, body.response_format, files)
        except GenerationCancelled as err:
            log.info("the caller closed the connection: %s", err)
            raise ApiError(499, "the client closed the request", kind="server_error") from None
        except GenerationFailed as err:
            raise ApiError(500, str(err), kind="server_error", code="generation_failed") from None
        except ApiError:
            raise
        except Exception as err:  # the log has the traceback, the caller one line
            log.error("openai generation failed", exc_info=err)
            raise ApiError(500, f"generation failed ({type(err).__name__}); the server log has the details",
                           kind="server_error") from None
        finally:
            watcher.cancel()
            service.done(ticket)
        for item in data:
            if "file" in item:
                item["url"] = str(request.url_for("image_file", name=item.pop("file")))
        return JSONResponse({"created": int(time.time()), "data": data, "seeds": [r.seed for r in results]},
                            headers={"x-request-id": request_id})

    @routes.get("/v1/files/{name}", name="image_file")
    async def image_file(name: str):
        path = files.path(name)
        if path is None:
            raise ApiError(404, f"no image {name!r} here (they are kept for {files.keep_seconds:g} s)",
                           code="not_found")
        return FileResponse(path, media_type="image/png")

    return routes
