"""The one generation path: validate -> seed -> generate -> result.

Every front end turns its inputs into a `GenerationRequest` with `build_request()` (the Space's
seven arguments, validated) and generates through a `Backend`'s `run()`: `FluxInference` here, or
the Ray Serve replicas. Nothing here knows about Gradio or HTTP.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from flux_infer import settings
from flux_infer.images import keep_settings
from flux_infer.settings import Range

log = logging.getLogger(__name__)


# A request that names LoRAs, on a server without --lora-dir.
NO_LORA_FOLDER = "loras: this server has no LoRA folder; start it with --lora-dir DIR"


class InvalidRequest(ValueError):
    """A request argument is wrong; the message names it, its allowed range and the value sent."""


class GenerationFailed(RuntimeError):
    """The pipeline failed on a valid request; the message says what to try."""


class GenerationCancelled(Exception):
    """The caller asked to stop (a cancelled job, a closed page); raised at the next step's end."""


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA of the server's --lora-dir (by name) and the scale one request uses it at."""

    name: str
    scale: float


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request. `seed` is the seed that will be used (already drawn if randomized)."""

    prompt: str
    seed: int
    width: int
    height: int
    guidance_scale: float
    num_inference_steps: int
    # Per-request LoRAs, from --lora-dir (see flux_infer.loras); () for the base model.
    loras: tuple[LoraChoice, ...] = ()
    # An edit (flux_infer.uploads): the RGB image to start from, with `mask` ("L", 255 repaints)
    # inpainting, without it image to image; `strength` 0 keeps the image, 1 repaints it all.
    image: Any = None
    mask: Any = None
    strength: float = 1.0

    @property
    def denoising_steps(self) -> int:
        """Steps the pipeline really runs: diffusers' image-to-image and inpainting start at
        `strength` of the schedule, so they run int(steps * strength) of them."""
        if self.image is None:
            return self.num_inference_steps
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    def settings(self) -> dict:
        """The request as JSON-ready values (the image's `flux_infer` settings, the --output-dir sidecar);
        an edit's kind, strength and the sizes of its image and mask, not their pixels."""
        fields = asdict(replace(self, image=None, mask=None))
        del fields["image"], fields["mask"], fields["strength"]
        if self.image is not None:
            fields.update(kind=self.kind, strength=self.strength, image_size=list(self.image.size),
                          mask_size=None if self.mask is None else list(self.mask.size))
        return fields

    @property
    def kind(self) -> str:
        return "text-to-image" if self.image is None else "image-to-image" if self.mask is None else "inpaint"

    @classmethod
    def from_dict(cls, fields: dict) -> GenerationRequest:
        """The inverse of dataclasses.asdict() (how a request travels to a Ray Serve replica)."""
        return cls(**{**fields, "loras": tuple(LoraChoice(**lora) for lora in fields.get("loras", ()))})

    def parameters_text(self) -> str:
        """The generation settings in the common `parameters` layout (a PNG chunk, a WebP's EXIF UserComment)."""
        loras = "".join(f", Lora: {lora.name}:{lora.scale:g}" for lora in self.loras)
        if self.image is not None:
            loras += f", Strength: {self.strength:g}, Mode: {self.kind}"
        return (
            f"{self.prompt}\nSteps: {self.num_inference_steps}, Sampler: FlowMatchEuler, "
            f"Guidance: {self.guidance_scale}, Seed: {self.seed}, Size: {self.width}x{self.height}, "
            f"Model: FLUX.1-dev{loras}"
        )


@dataclass(frozen=True)
class GenerationResult:
    image: Any  # PIL.Image.Image, with the settings in image.info
    seed: int
    request: GenerationRequest
    seconds: float
    # Steps whose transformer pass a --cache skipped (0 without a cache).
    cached_steps: int = 0
    # The Ray Serve replica that made it ("" in a single process).
    replica: str = ""
    # The most GPU memory torch's allocator held while it was made, weights included (None off CUDA).
    gpu_peak_bytes: int | None = None


def _number(name: str, value: Any, limits: Range, *, whole: bool) -> float:
    kind = "a whole number" if whole else "a number"
    expected = f"{name} must be {kind} {limits.describe()}"
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidRequest(f"{expected}, got the text {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{expected}, got {value!r}")
    if not math.isfinite(value):
        raise InvalidRequest(f"{expected}, got {value}")
    if whole and not float(value).is_integer():
        raise InvalidRequest(f"{expected}, got {value}")
    if not limits.minimum <= value <= limits.maximum:
        raise InvalidRequest(f"{expected}, got {int(value) if float(value).is_integer() else value}")
    return value


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidRequest(f"{name} must be true or false, got {value!r}")


def _prompt(value: Any) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidRequest("prompt is empty: describe the image to generate")
    if not isinstance(value, str):
        raise InvalidRequest(f"prompt must be text, got {type(value).__name__}")
    if len(value) > settings.MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"prompt is {len(value)} characters long; the limit is {settings.MAX_PROMPT_CHARS} "
            "(the text encoders read at most 512 tokens)"
        )
    return value


def _size(name: str, value: Any, limits: Range) -> int:
    # Floored to the multiple FluxPipeline itself would floor to, so the reported size is exact.
    pixels = int(_number(name, value, limits, whole=False))
    return pixels - pixels % settings.SIZE_MULTIPLE


def check_strength(value: Any) -> float:
    """An edit's strength, validated: 0 keeps the image, 1 repaints it all."""
    return float(_number("strength", value, settings.STRENGTH, whole=False))


def draw_seed() -> int:
    """A random seed in the Space's range [0, MAX_SEED]."""
    return secrets.randbelow(settings.MAX_SEED + 1)


def build_request(
    prompt: Any,
    seed: Any = settings.SEED.default,
    randomize_seed: Any = settings.RANDOMIZE_SEED_DEFAULT,
    width: Any = settings.WIDTH.default,
    height: Any = settings.HEIGHT.default,
    guidance_scale: Any = settings.GUIDANCE_SCALE.default,
    num_inference_steps: Any = settings.NUM_INFERENCE_STEPS.default,
) -> GenerationRequest:
    """Validate the Space's seven arguments (numbers may arrive as floats or text) into a request.

    Every value is checked, the seed included when it is about to be replaced, so a wrong value is
    reported the same way whatever the other arguments are.
    """
    fixed_seed = int(_number("seed", seed, settings.SEED, whole=True))
    request = GenerationRequest(
        prompt=_prompt(prompt),
        seed=fixed_seed,
        width=_size("width", width, settings.WIDTH),
        height=_size("height", height, settings.HEIGHT),
        guidance_scale=float(_number("guidance_scale", guidance_scale, settings.GUIDANCE_SCALE, whole=False)),
        num_inference_steps=int(
            _number("num_inference_steps", num_inference_steps, settings.NUM_INFERENCE_STEPS, whole=True)
        ),
    )
    if _flag("randomize_seed", randomize_seed):
        request = replace(request, seed=draw_seed())
    return request


class Backend(Protocol):
    """What generates: `FluxInference` in this process, or `cluster.RemoteInference` on Ray Serve
    replicas. The service layer and every front end see only this."""

    def run(self, request: GenerationRequest, *, on_step=None,
            cancel: threading.Event | None = None) -> GenerationResult:
        """Generate for a validated request (blocking). `on_step(Step)` after each step; setting
        `cancel` stops at the end of the current step with GenerationCancelled."""


def _start_generation_thread(here: threading.local, device: str | None) -> None:
    """As a FluxInference's generation thread starts: mark it, and make the model's GPU its current device."""
    here.on = True
    if device is not None:
        from flux_infer.tuning import use_device

        use_device(device)


class FluxInference:
    """A loaded FluxPipeline and its preview decoder.

    Every generation runs on one thread of its own, whichever thread asks (the start-up's warm-up,
    the page's and the API's worker threads, a script's threads), one at a time. The server's
    scheduler decides which request runs; this thread also keeps two callers in one process from
    sharing the pipeline at once. One thread, because torch keeps some of its state per thread (the
    current CUDA device, set once as the thread starts; grad mode), and so that every request runs
    where the start-up's warm-up ran.
    """

    def __init__(self, pipeline, *, runtime=None, preview=None, preview_every: int = 1, progress_bar: bool = False,
                 adapters=None):
        if preview_every < 1:
            raise ValueError(f"preview_every must be at least 1, got {preview_every}")
        self.pipeline = pipeline
        self.runtime = runtime  # a flux_infer.tuning.Runtime: per-request tiling, cache counting
        self.preview = preview  # a flux_infer.previews decoder, or None
        self.preview_every = preview_every
        self.adapters = adapters  # a flux_infer.loras.LoraAdapters (--lora-dir), or None
        self.pipeline.set_progress_bar_config(disable=not progress_bar)
        self._progress_bar = progress_bar
        self._edit_pipelines: dict[str, Any] = {}
        self._prompts: OrderedDict[str, dict] = OrderedDict()  # prompt -> its embeddings, last used last
        # The generation thread, and a mark that only it carries (`_here.on`), set as it starts. Its
        # initializer holds no reference to this object (the thread keeps it for its whole life), so
        # the thread ends when this object is collected.
        self._here = threading.local()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-generate",
                                          initializer=_start_generation_thread,
                                          initargs=(self._here, runtime.device if runtime is not None else None))

    def pipeline_for(self, kind: str):
        """The pipeline for a request's kind: the loaded FluxPipeline, or diffusers' image-to-image or
        inpainting pipeline made from its components (the same modules: no weight is copied, and
        LoRAs, quantization, offloading and compilation apply to them as they are). Not `from_pipe`:
        it casts the shared modules to its `dtype` (float32 unless told), and refuses quantized ones."""
        if kind == "text-to-image":
            return self.pipeline
        if kind not in self._edit_pipelines:
            from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

            kinds = {"image-to-image": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}
            pipeline = kinds[kind](**self.pipeline.components)
            pipeline.set_progress_bar_config(disable=not self._progress_bar)
            self._edit_pipelines[kind] = pipeline
        return self._edit_pipelines[kind]

    def _text_inputs(self, request: GenerationRequest) -> tuple[dict, bool]:
        """The prompt as the pipeline takes it, and whether its embeddings were kept from an earlier
        image. T5's and CLIP's embeddings of the last `settings.PROMPT_CACHE_SIZE` prompts are kept
        on the device, so the same prompt again (a new seed, another size, an edit) skips the text
        encoders: with model offload, T5's trip to the GPU and back. The same embeddings the pipeline
        would make (its own `encode_prompt`), so the same pixels. A request with LoRAs encodes
        afresh, and is not kept: a LoRA may change CLIP's layers."""
        import torch

        if request.loras:
            return {"prompt": request.prompt}, False
        if request.prompt in self._prompts:
            self._prompts.move_to_end(request.prompt)
            return self._prompts[request.prompt], True
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds, _ = self.pipeline.encode_prompt(request.prompt)
        self._prompts[request.prompt] = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
        while len(self._prompts) > settings.PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return self._prompts[request.prompt], False

    def _step_callback(self, request: GenerationRequest, on_step, cancel):
        from flux_infer.previews import Step

        total = request.denoising_steps

        def callback(pipeline, index, timestep, tensors):
            done = index + 1
            if cancel.is_set():
                raise GenerationCancelled(f"cancelled after step {done} of {total}")
            if on_step is not None:
                frame = None
                if self.preview is not None and (done % self.preview_every == 0 or done == total):
                    latents = pipeline._unpack_latents(
                        tensors["latents"], request.height, request.width, pipeline.vae_scale_factor
                    )
                    frame = self.preview(latents[0])
                on_step(Step(index=done, total=total, preview=frame))
            return {}

        return callback

    def _call_pipeline(self, request: GenerationRequest, *, on_step, cancel: threading.Event):
        """Run the pipeline for a validated request; return the PIL image and the runtime's stats.

        The noise comes from a CPU generator seeded with `request.seed`, as in the Space, so a seed
        gives the same pixels as `FluxPipeline(...)(..., generator=torch.Generator().manual_seed(seed))`
        on the same device and dtype. `on_step(Step)` is called from the denoising loop after each
        step, with a preview every `preview_every` steps and at the last; setting `cancel` stops the
        loop at the end of the current step with GenerationCancelled.
        """
        import torch

        generator = torch.Generator().manual_seed(request.seed)
        edit = {}
        if request.image is not None:
            edit = dict(image=request.image, strength=request.strength)
            if request.mask is not None:
                edit["mask_image"] = request.mask
        hooks = dict(callback_on_step_end=self._step_callback(request, on_step, cancel),
                     callback_on_step_end_tensor_inputs=["latents"])
        if cancel.is_set():
            raise GenerationCancelled("cancelled before it started")
        if request.loras and self.adapters is None:
            raise InvalidRequest(NO_LORA_FOLDER)
        if self.adapters is not None:
            self.adapters.use(request.loras)
        if request.image is not None and request.denoising_steps < 1:
            # No step to run (diffusers refuses that): the image, as the edit leaves it.
            log.info("strength %g of %d steps runs no step: the image is returned as it is",
                     request.strength, request.num_inference_steps)
            return request.image.resize((request.width, request.height)), {}
        if self.runtime is not None:
            self.runtime.before(request)
        try:
            with self.runtime.call_context(request) if self.runtime is not None else contextlib.nullcontext():
                text, reused = self._text_inputs(request)
                output = self.pipeline_for(request.kind)(
                    **text,
                    width=request.width,
                    height=request.height,
                    guidance_scale=request.guidance_scale,
                    num_inference_steps=request.num_inference_steps,
                    generator=generator,
                    output_type="pil",
                    **edit,
                    **hooks,
                )
        except torch.OutOfMemoryError as err:
            # The operator's log gets torch's account (where, how much); the client a way out.
            log.warning("out of GPU memory at %dx%d: %s", request.width, request.height,
                        str(err).split(". See documentation")[0], exc_info=True)
            # The traceback holds the failed call's frames, and they its activations (GiBs at a
            # large size) for as long as the error lives: the caller's error and the log record
            # keep it. Their locals go now (the traceback still prints), then their blocks go
            # back to the GPU, so the next (smaller) request fits and nvidia-smi shows them free.
            traceback.clear_frames(err.__traceback__)
            torch.cuda.empty_cache()
            raise GenerationFailed(
                f"out of GPU memory at {request.width}x{request.height}: try a smaller size, or restart the "
                "server with less GPU memory in use (--memory auto, --quantize fp8, --offload t5 or model)"
            ) from None
        stats = self.runtime.after(request) if self.runtime is not None else {}
        return output.images[0], {**stats, "prompt_reused": reused}

    def run(self, request: GenerationRequest, *, on_step=None, cancel: threading.Event | None = None):
        """Generate for a validated request on the generation thread, waiting for it; the image
        carries its settings in `image.info`. Interrupted while it waits (Ctrl-C), the caller leaves
        with the interrupt, and the generation stops at the end of its current step."""
        cancel = cancel if cancel is not None else threading.Event()
        try:
            return self.on_generation_thread(self._generate, request, on_step, cancel)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C while it waits: stop at the end of the step
            cancel.set()
            raise

    def on_generation_thread(self, fn, *args):
        """`fn(*args)` called on the generation thread (see the class), with the caller's context
        variables (the request id in the log); directly when called there. Its result, or its error."""
        if getattr(self._here, "on", False):
            return fn(*args)
        return self._thread.submit(contextvars.copy_context().run, fn, *args).result()

    def _generate(self, request: GenerationRequest, on_step, cancel: threading.Event) -> GenerationResult:
        started = time.perf_counter()
        image, stats = self._call_pipeline(request, on_step=on_step, cancel=cancel)
        seconds = time.perf_counter() - started
        keep_settings(image, request.parameters_text(), request.settings())
        peak = stats.get("gpu_peak_bytes")
        log.info("generated %dx%d (%s), %d steps, seed %d in %.2f s%s%s", request.width, request.height, request.kind,
                 request.denoising_steps, request.seed, seconds,
                 f", GPU memory peak {peak / 1024**3:.1f} GiB" if peak is not None else "",
                 " (the prompt's embeddings kept from before)" if stats.get("prompt_reused") else "")
        return GenerationResult(image=image, seed=request.seed, request=request, seconds=seconds,
                                cached_steps=stats.get("cached_steps", 0), gpu_peak_bytes=peak)

    def warm_up(self, sizes, steps: int = 2, images: int = 1) -> None:
        """Generate `images` images of `steps` steps at each (width, height), so that torch.compile
        has compiled for them, and the GPU's one-time costs are paid, before the first request."""
        for width, height in sizes:
            started = time.perf_counter()
            for seed in range(images):
                self.run(build_request("warm-up", seed=seed, width=width, height=height,
                                       num_inference_steps=steps))
            log.info("warmed up at %dx%d in %.1f s", width, height, time.perf_counter() - started)

    def infer(self, prompt: Any, **arguments: Any) -> GenerationResult:
        """The Space's infer() from a script: `build_request()` (validate, pick the seed), then `run()`."""
        return self.run(build_request(prompt, **arguments))


def _log_stopped(worker) -> None:
    err = worker.exception()
    if err is not None:
        log.info("generation stopped: %s", err)


async def stream_run(run, request: GenerationRequest, *, finished=None):
    """Run `run(request, on_step=..., cancel=...)` in a worker thread and yield, on the event loop,
    each Step as the denoising reports it and then the GenerationResult (or raise its error).

    When the consumer stops iterating (a cancelled job, a closed page, a cancelled Ray stream),
    the `finally` sets `cancel`, which stops the denoising at the end of the current step.
    `finished()` is called on the loop once the worker has ended, however it ended.
    """
    import asyncio
    import functools

    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def on_step(step):  # called on the denoising thread
        loop.call_soon_threadsafe(steps.put_nowait, step)

    worker = loop.run_in_executor(None, functools.partial(run, request, on_step=on_step, cancel=cancel))
    # The worker's end is queued after its last step (both arrive through the loop in order).
    worker.add_done_callback(lambda _: steps.put_nowait(None))
    if finished is not None:
        worker.add_done_callback(lambda _: finished())
    try:
        while (step := await steps.get()) is not None:
            yield step
        yield worker.result()
    finally:
        if not worker.done():
            log.info("caller cancelled or went away: stopping at the end of the current step")
            worker.add_done_callback(_log_stopped)
        cancel.set()
