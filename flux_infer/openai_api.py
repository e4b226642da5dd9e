"""The OpenAI Images API: `POST /v1/images/generations` and `/v1/images/edits`, `GET /v1/models` and
`/v1/loras`, and the files it links to.

`/v1/images/edits` is multipart, as OpenAI's: an `image` file (PNG, JPEG or WebP; read and bounded by
flux_infer.uploads), an optional `mask` (OpenAI's convention, transparent is repainted, or black and
white, white is repainted), and the generation's fields plus `strength`: without a mask it is
image to image, with one inpainting, both by diffusers' own pipelines on the loaded components.

The body is an `ImageRequest` (pydantic): every field of OpenAI's request is accepted, then the
same validation (`build_request`) and the same line and `Service.run()` as `/infer`, so a seed
gives the same image through either door. Honoured: `prompt`, `n`, `size` ("auto": the Space's
1024x1024), `quality` (as steps, QUALITY_STEPS), `response_format`, `output_format` and
`output_compression`, `background` "auto"/"opaque", `model` (FLUX.1-dev's ids and the server's
`--model-alias` names). Accepted without effect, and logged: the fields in NO_EFFECT (`style`,
`moderation`, `user`, ...). Refused with a 400 in OpenAI's error shape (`ApiError`, turned into a
response by the one handler `build_app` registers) that names the field: what cannot be honoured
(`background: "transparent"`, `output_format` gif/svg, `stream: true`), values out of range, and
fields the API does not have. Extensions in the body: `seed`, `guidance_scale`, `num_inference_steps` (it wins over
`quality`), `loras` ([{"name", "scale"}] from `--lora-dir`, listed by `GET /v1/loras`); the response
carries the seed of each image. The API key is a dependency of every route.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (`Request`).

import asyncio
import base64
import contextlib
import json
import logging
import re
import secrets
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from starlette.requests import Request

from flux_infer import settings
from flux_infer.errors import first_line
from flux_infer.images import MIME_TYPES, encode
from flux_infer.inference import (GenerationCancelled, GenerationFailed, InvalidRequest, build_request,
                                  check_strength, draw_seed)
from flux_infer.service import REQUEST_ID, Busy, Service, new_request_id, unexpected_failure
from flux_infer.uploads import edit_size

log = logging.getLogger(__name__)

MODEL_IDS = ("flux.1-dev", "black-forest-labs/FLUX.1-dev")
MAX_IMAGES = 4
# The largest body this route reads (server.BodyLimit enforces it): a prompt and a few numbers.
MAX_BODY_BYTES = 64 * 1024
# /v1/images/edits: an image and a mask, each up to settings.MAX_UPLOAD_BYTES, and the fields.
MAX_EDIT_BODY_BYTES = 2 * settings.MAX_UPLOAD_BYTES + MAX_BODY_BYTES
# Multipart fields that are numbers or flags (a form sends text); the rest stay text.
_FORM_NUMBERS = ("n", "output_compression", "partial_images", "frame_count", "frame_duration_ms")
# OpenAI's `quality` as denoising steps when the body has no `num_inference_steps` ("auto" and
# dall-e-3's "standard": the Space's default; "hd" is dall-e-3's "high").
QUALITY_STEPS = {"low": 12, "medium": 20, "auto": int(settings.NUM_INFERENCE_STEPS.default),
                 "standard": int(settings.NUM_INFERENCE_STEPS.default), "high": 40, "hd": 40, "xhigh": 50,
                 "max": 50}
# Accepted so that clients sending them work, with no effect on a FLUX image (logged when sent).
NO_EFFECT = ("style", "moderation", "user", "safety_identifier", "partial_images", "complexity", "frame_count",
             "frame_duration_ms", "svg")
# output_format values OpenAI has that a still raster image cannot be.
_NOT_RASTER = ("gif", "svg")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_FILE = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")


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
    size: StrictStr = "auto"
    quality: Literal[tuple(QUALITY_STEPS)] = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: StrictStr = "png"
    output_compression: StrictInt | None = None
    background: Literal["auto", "opaque", "transparent"] = "auto"
    stream: StrictBool = False
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] = "auto"
    partial_images: StrictInt | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: StrictInt | None = None
    frame_duration_ms: StrictInt | None = None
    svg: dict[str, Any] | None = None
    safety_identifier: StrictStr | None = None
    user: StrictStr | None = None
    # Extensions: the Space's arguments that the OpenAI API has no field for.
    seed: Any = None
    guidance_scale: Any = settings.GUIDANCE_SCALE.default
    num_inference_steps: Any = None  # default: `quality`'s steps
    loras: Any = None  # [{"name": ..., "scale": ...}] from the server's --lora-dir

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, body: Any) -> Any:
        """OpenAI's fields are nullable: a client sending `"quality": null` means the default."""
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body

    @field_validator("model")
    @classmethod
    def _served(cls, model: str, info: ValidationInfo) -> str:
        served = (info.context or {}).get("models", MODEL_IDS)
        if model not in served:
            raise ValueError(f"unknown model {model!r}: this server serves {', '.join(served)}")
        return model

    @field_validator("background")
    @classmethod
    def _opaque(cls, background: str) -> str:
        if background == "transparent":
            raise ValueError("`background: \"transparent\"` cannot be honoured: FLUX.1-dev makes opaque images "
                             "(use \"auto\" or \"opaque\")")
        return background

    @field_validator("output_format")
    @classmethod
    def _raster(cls, output_format: str) -> str:
        if output_format in _NOT_RASTER:
            raise ValueError(f"`output_format: \"{output_format}\"` cannot be honoured: FLUX.1-dev makes still "
                             f"raster images (use {', '.join(MIME_TYPES)})")
        if output_format not in MIME_TYPES:
            raise ValueError(f"`output_format` must be {', '.join(MIME_TYPES)}, got {output_format!r}")
        return output_format

    @field_validator("stream")
    @classmethod
    def _whole(cls, stream: bool) -> bool:
        if stream:
            raise ValueError("`stream: true` is not supported: the image comes whole in the response "
                             "(leave `stream` out or false)")
        return stream

    @field_validator("output_compression")
    @classmethod
    def _compression(cls, compression: int | None) -> int | None:
        if compression is not None and not 0 <= compression <= 100:
            raise ValueError(f"`output_compression` must be a whole number from 0 to 100, got {compression}")
        return compression

    @field_validator("n")
    @classmethod
    def _count(cls, n: int) -> int:
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"`n` must be a whole number from 1 to {MAX_IMAGES}, got {n}")
        return n

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        if size != "auto" and not _SIZE.match(size):
            raise ValueError(f"`size` must be \"auto\" or \"WIDTHxHEIGHT\" such as \"1024x768\", got {size!r}")
        return size

    @property
    def dimensions(self) -> tuple[int, int]:
        if self.size == "auto":
            return int(settings.WIDTH.default), int(settings.HEIGHT.default)
        width, height = map(int, self.size.split("x"))
        return width, height

    @property
    def steps(self):
        """`num_inference_steps` when given (validated later, with the rest), else `quality`'s."""
        return QUALITY_STEPS[self.quality] if self.num_inference_steps is None else self.num_inference_steps

    def without_effect(self) -> dict:
        """The fields sent that change nothing in a FLUX image."""
        return {name: getattr(self, name) for name in NO_EFFECT if name in self.model_fields_set}

    def generation_requests(self, service: Service) -> list:
        """The n validated GenerationRequests: seed, seed + 1, ... or a fresh random seed each, with
        the LoRAs chosen from the service's --lora-dir."""
        width, height = self.dimensions
        try:
            base = build_request(self.prompt, seed=0 if self.seed is None else self.seed, randomize_seed=False,
                                 width=width, height=height, guidance_scale=self.guidance_scale,
                                 num_inference_steps=self.steps)
        except InvalidRequest as err:
            param = str(err).split(" ", 1)[0]
            raise ApiError(400, str(err), param=param if param in FIELDS else None) from None
        try:
            base = replace(base, loras=service.choose_loras(self.loras))
        except InvalidRequest as err:
            raise ApiError(400, str(err), param="loras") from None
        # Image i gets seed + i (wrapping in the Space's range), or a fresh random seed each.
        seeds = [draw_seed() if self.seed is None else (base.seed + index) % (settings.MAX_SEED + 1)
                 for index in range(self.n)]
        return [replace(base, seed=image_seed) for image_seed in seeds]


class EditRequest(ImageRequest):
    """`POST /v1/images/edits`'s form fields, the files apart: the generation's fields, plus
    `strength` (an extension: 0 keeps the image, 1 repaints it all) and `input_fidelity` (accepted,
    no effect). `size` "auto" is the image's own size, within the Space's limits."""

    strength: Any = settings.STRENGTH.default
    input_fidelity: Literal["high", "low"] | None = None

    def edit_requests(self, service: Service, image, mask) -> list:
        """The n validated GenerationRequests editing `image` (RGB) with `mask` ("L" or None)."""
        width, height = edit_size(image.size) if self.size == "auto" else self.dimensions
        try:
            strength = check_strength(self.strength)
        except InvalidRequest as err:
            raise ApiError(400, str(err), param="strength") from None
        requests = self.model_copy(update={"size": f"{width}x{height}"}).generation_requests(service)
        return [replace(request, image=image, mask=mask, strength=strength) for request in requests]


FIELDS = (*EditRequest.model_fields, "width", "height")
# What pydantic's error types mean here, where the field's own message does not say.
_MESSAGES = {
    "missing": "`{field}` is required",
    "extra_forbidden": "unsupported field(s) {field}: this server accepts {accepted}",
    "literal_error": "`{field}` must be {expected}, got {value!r}",
    "json_invalid": "the body is not valid JSON",
    "model_type": "the body must be a JSON object with at least a `prompt`",
}


def parse_body(raw: bytes, models: tuple[str, ...] = MODEL_IDS) -> ImageRequest:
    """The request body as an ImageRequest; ApiError(400) naming the field otherwise. `models`: the
    names a body may give as `model`."""
    return _validated(lambda: ImageRequest.model_validate_json(raw, context={"models": models}))


def parse_form(fields: dict, models: tuple[str, ...] = MODEL_IDS) -> EditRequest:
    """An edit's multipart text fields as an EditRequest; ApiError(400) naming the field otherwise.
    A form sends text: counts and flags are read as JSON, `loras` as JSON or "name:scale,..."."""
    values = dict(fields)
    for name in (*_FORM_NUMBERS, "stream", "loras"):
        if name in values:
            try:
                values[name] = json.loads(values[name])
            except ValueError:
                if name != "loras":
                    raise ApiError(400, f"`{name}` must be a {'flag' if name == 'stream' else 'whole number'}, "
                                   f"got {values[name]!r}", param=name) from None
    return _validated(lambda: EditRequest.model_validate(values, context={"models": models}), EditRequest)


def _validated(parse, model=ImageRequest):
    accepted = ", ".join(model.model_fields)
    try:
        return parse()
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = errors[0]
        field = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            field = ", ".join(sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"))
        if first["type"] == "value_error":
            message = str(first["ctx"]["error"])
        elif first["type"] in _MESSAGES:
            message = _MESSAGES[first["type"]].format(field=field, value=first.get("input"), accepted=accepted,
                                                      expected=first.get("ctx", {}).get("expected"))
        else:
            message = f"`{field}`: {first['msg']}, got {first.get('input')!r}"
        code = "model_not_found" if field == "model" and first["type"] == "value_error" else None
        raise ApiError(400, message, param=field.split(", ")[0] if field else None, code=code) from None


class ImageFiles:
    """The image files behind `response_format: url`, deleted after `keep_seconds`."""

    def __init__(self, directory: Path | None = None, keep_seconds: float = settings.DEFAULT_KEEP_OUTPUTS_S):
        self._made = directory is None  # a folder of its own (in TMPDIR), removed by close()
        self.directory = Path(directory or tempfile.mkdtemp(prefix="flux-infer-v1-"))
        self.keep_seconds = keep_seconds

    def add(self, data: bytes, image_format: str) -> str:
        self.sweep(self.keep_seconds)
        name = f"{secrets.token_hex(16)}.{image_format}"
        (self.directory / name).write_bytes(data)
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
        for path in self.directory.iterdir():
            if not _FILE.match(path.name):
                continue
            try:
                if cutoff is None or path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                pass
        return deleted

    def close(self) -> int:
        """At shutdown: delete every file, and the folder when it made it; how many files went."""
        deleted = self.sweep(None)
        if self._made:
            try:
                self.directory.rmdir()
            except OSError:  # something else was put there: left as it is
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


@contextlib.contextmanager
def _request_id(request):
    """The caller's x-request-id (or a new one), set for this route's log lines while it runs."""
    request_id = request.headers.get("x-request-id") or new_request_id()
    token = REQUEST_ID.set(request_id)
    try:
        yield request_id
    finally:
        REQUEST_ID.reset(token)


def bearer_key(api_key: str | None):
    """A FastAPI dependency: the request's `Authorization: Bearer` must carry `api_key` (when set)."""
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


def _read_uploads(image_bytes: bytes, mask_bytes: bytes | None):
    """The edit's image (RGB) and mask ("L", 255 repaints, or None), decoded off the event loop."""
    from flux_infer.uploads import read_image, read_mask

    image = read_image(image_bytes, "image")
    return image, None if mask_bytes is None else read_mask(mask_bytes, image.size, "mask")


def _encode(results, body: ImageRequest, files: ImageFiles) -> list[dict]:
    """The response's items: the image's bytes in `output_format` (base64), or a file name for the
    url. Called in a worker thread: encoding a 1024x1024 PNG takes a good fraction of a second,
    which on the event loop would stall every other door's streams."""
    data = []
    for result in results:
        item = {"revised_prompt": result.request.prompt, "seed": result.seed}
        encoded = encode(result.image, body.output_format, quality=body.output_compression)
        if body.response_format == "url":
            item["file"] = files.add(encoded, body.output_format)
        else:
            item["b64_json"] = base64.b64encode(encoded).decode("ascii")
        data.append(item)
    return data


class ImagesApi:
    """`/v1`'s handlers over one Service, a method per route (`router()` registers them): each door
    reads its body into an ImageRequest and its generation requests, then `answer()` admits them to
    the service's line, generates and encodes them, and replies in OpenAI's shape. Their ApiErrors
    need `api_error_handler` on the app (server.build_app). `aliases`: more names clients may give as
    `model` (`--model-alias`)."""

    def __init__(self, service: Service, *, files: ImageFiles | None = None, aliases: tuple[str, ...] = ()):
        self.service = service
        self.files = files or ImageFiles()
        self.served = tuple(dict.fromkeys((*MODEL_IDS, *aliases)))

    async def models(self):
        created = 1722470400  # FLUX.1-dev's release, 2024-08-01
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "black-forest-labs"} for name in self.served]}

    async def loras(self):
        """The LoRAs a request may name in `loras`, with their rank and the layers they touch."""
        from starlette.concurrency import run_in_threadpool

        library = self.service.loras
        if library is None:
            return {"object": "list", "data": [], "lora_dir": None}
        listed = await run_in_threadpool(library.describe)  # reads file headers
        return {"object": "list", "data": listed, "lora_dir": str(library.folder)}

    async def generations(self, request: Request):
        return await self.handle(request, self.read_generation)

    async def edits(self, request: Request):
        return await self.handle(request, self.read_edit)

    async def handle(self, request: Request, read):
        """Read the request with `read` (a refusal is counted as invalid), then `answer` it, under
        the caller's request id."""
        with _request_id(request) as request_id:
            try:
                body, generation_requests = await read(request)
            except ApiError:
                self.service.count_rejected("openai", "invalid")
                raise
            return await self.answer(request, request_id, body, generation_requests)

    async def read_generation(self, request: Request):
        """A generation's JSON body as (ImageRequest, its generation requests); ApiError(400) naming
        what is wrong."""
        body = parse_body(await request.body(), self.served)
        return body, body.generation_requests(self.service)

    async def read_edit(self, request: Request):
        """An edit's multipart body as (EditRequest, its generation requests), the files bounded and
        decoded off the event loop; ApiError(400) naming what is wrong."""
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import UploadFile

        try:
            form = await request.form(max_files=2, max_fields=64)
        except Exception as err:  # starlette's HTTPException(400) for a body that is not a form
            reason = getattr(err, "detail", None) or first_line(err)  # its str() starts with the status
            raise ApiError(400, f"the body must be multipart/form-data with an `image` file and a `prompt` "
                           f"({reason})") from None
        try:
            uploads = {key: value for key, value in form.multi_items() if isinstance(value, UploadFile)}
            fields = {key: value for key, value in form.multi_items() if not isinstance(value, UploadFile)}
            unknown_files = set(uploads) - {"image", "image[]", "mask"}
            if unknown_files:
                raise ApiError(400, f"unexpected file field(s) {', '.join(sorted(unknown_files))}: send `image` "
                               "and optionally `mask`", param=sorted(unknown_files)[0])
            image_file = uploads.get("image") or uploads.get("image[]")
            if image_file is None:
                raise ApiError(400, "`image` is required: the picture to edit, as a PNG, JPEG or WebP file",
                               param="image")
            body = parse_form(fields, self.served)
            image_bytes = await image_file.read(settings.MAX_UPLOAD_BYTES + 1)
            mask_bytes = await uploads["mask"].read(settings.MAX_UPLOAD_BYTES + 1) if "mask" in uploads else None
        finally:
            await form.close()
        try:
            image, mask = await run_in_threadpool(_read_uploads, image_bytes, mask_bytes)
        except InvalidRequest as err:
            raise ApiError(400, str(err), param=str(err).split(" ", 1)[0]) from None
        return body, body.edit_requests(self.service, image, mask)

    async def answer(self, request: Request, request_id: str, body: ImageRequest, generation_requests: list):
        """Admit the request's images, wait their turn (or leave the line if the caller hangs up),
        generate them one after the other in one slot, and answer in OpenAI's shape."""
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool

        service = self.service
        if ignored := body.without_effect():
            log.info("accepted without effect on the image: %s",
                     ", ".join(f"{name}={value!r}" for name, value in ignored.items()))
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
            data = await run_in_threadpool(_encode, results, body, self.files)
        except GenerationCancelled as err:
            log.info("the caller closed the connection: %s", err)
            raise ApiError(499, "the client closed the request", kind="server_error") from None
        except InvalidRequest as err:  # only the LoRAs are found wrong where they run (a bad file, a rank)
            raise ApiError(400, str(err), param="loras") from None
        except GenerationFailed as err:
            raise ApiError(500, str(err), kind="server_error", code="generation_failed") from None
        except ApiError:
            raise
        except Exception as err:  # the log has the traceback, the caller one line
            raise ApiError(500, unexpected_failure("openai", err), kind="server_error") from None
        finally:
            watcher.cancel()
            service.done(ticket)
        for item in data:
            if "file" in item:
                item["url"] = str(request.url_for("image_file", name=item.pop("file")))
        made = results[0].request  # the size as made (the Space floors sizes to multiples of 16)
        return JSONResponse({"created": int(time.time()), "data": data, "seeds": [r.seed for r in results],
                             "output_format": body.output_format, "quality": body.quality,
                             "size": f"{made.width}x{made.height}", "background": "opaque"},
                            headers={"x-request-id": request_id})

    async def image_file(self, name: str):
        from fastapi.responses import FileResponse

        path = self.files.path(name)
        if path is None:
            raise ApiError(404, f"no image {name!r} here (they are kept for {self.files.keep_seconds:g} s)",
                           code="not_found")
        return FileResponse(path, media_type=MIME_TYPES[path.suffix.lstrip(".")])


def router(service: Service, *, api_key: str | None = None, files: ImageFiles | None = None,
           aliases: tuple[str, ...] = ()):
    """`/v1`'s routes: ImagesApi's handlers behind the API key (`bearer_key`)."""
    from fastapi import APIRouter, Depends

    api = ImagesApi(service, files=files, aliases=aliases)
    routes = APIRouter(dependencies=[Depends(bearer_key(api_key))])
    routes.add_api_route("/v1/models", api.models, methods=["GET"])
    routes.add_api_route("/v1/loras", api.loras, methods=["GET"])
    routes.add_api_route("/v1/images/generations", api.generations, methods=["POST"])
    routes.add_api_route("/v1/images/edits", api.edits, methods=["POST"])
    routes.add_api_route("/v1/files/{name}", api.image_file, methods=["GET"], name="image_file")
    return routes
