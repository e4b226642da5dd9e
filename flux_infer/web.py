"""The Gradio front end: the Space's page and its one API endpoint, `/infer`.

The layout, labels, ranges and defaults are the Space's, so `gradio_client` scripts written for
`black-forest-labs/FLUX.1-dev` run unchanged against this server. The handler only translates:
raw values in, `Service.admit_request()` (build_request, the line) and `Service.stream()`,
previews and the final (image, seed) out, core errors to `gr.Error`. Around the Space's layout,
private events (not API endpoints: the API still has the one) add what a local user expects: a
step line under the previews, an "Edit" tab (image to image, inpainting), a LoRA picker with
`--lora-dir`, and a gallery of the session's recent images.
"""

# No `from __future__ import annotations`: Gradio finds the `gr.Request` parameters of the handlers
# by their evaluated annotations, and `gr` is imported inside the functions that define them.

import asyncio
import os
import secrets
import time
from pathlib import Path

from flux_infer import gradio_internals, settings
from flux_infer.images import encode, quick_to_encode
from flux_infer.inference import GenerationFailed, InvalidRequest
from flux_infer.previews import Step
from flux_infer.service import Busy, Service, new_request_id, unexpected_failure


def _slider(label: str, limits: settings.Range):
    import gradio as gr

    return gr.Slider(
        label=label, minimum=limits.minimum, maximum=limits.maximum, step=limits.step, value=limits.default
    )


def _gradio_error(err: Exception):
    """A core exception as the one-line gr.Error the caller sees; never a stack trace."""
    import gradio as gr

    # Expected outcomes, said to the caller: no traceback in the server's log for them.
    if isinstance(err, InvalidRequest):
        return gr.Error(str(err), title="Invalid input", print_exception=False)
    if isinstance(err, GenerationFailed):
        return gr.Error(str(err), title="Generation failed", print_exception=False)
    if isinstance(err, Busy):
        return gr.Error(str(err), title="Busy", print_exception=False)
    return gr.Error(unexpected_failure("gradio", err), title="Generation failed", print_exception=False)


class PerSession:
    """A value per browser session (Gradio's session hash), beside the `/infer` event rather than in
    it, so `/infer` keeps the Space's parameters and outputs exactly: the step line the page shows
    while a request runs, and the LoRAs picked on the page. Private events write and read it; a
    session's values go when its page closes."""

    def __init__(self, default=None):
        self.default = default
        self._values: dict[str, object] = {}

    def set(self, session: str | None, value) -> None:
        if session:
            self._values[session] = value

    def clear(self, session: str | None) -> None:
        if session:
            self._values.pop(session, None)

    def get(self, session: str | None):
        return self._values.get(session, self.default) if session else self.default


PREVIEWS_FOLDER = "flux-infer-previews"  # in Gradio's folder


def preview_file(frame) -> str:
    """A preview as a WebP file in Gradio's folder, which Gradio serves as it is and the server's
    sweep deletes with Gradio's own files (gradio_internals.cache_folder). WebP, as the Space sent
    them: a 512x512 preview of a photograph is ~30 KB against ~380 KB as PNG, in 8 ms against 22 ms
    here (bench/encode.py --size 512), at every step, which a browser on another machine feels. The
    final image keeps the page's format (--image-format)."""
    folder = Path(gradio_internals.cache_folder()) / PREVIEWS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(16)}.webp"
    path.write_bytes(encode(frame.image(), "webp", quality=settings.PREVIEW_QUALITY))
    return str(path)


async def _to_page(service: Service, request, ticket, progress, steps_shown: PerSession | None, session):
    """Wait in line and generate `request` for a page or Gradio API caller: yields (preview, seed) per
    step and then (image, seed), reports the place in line and the step as Gradio progress and in
    `steps_shown`, and turns errors into gr.Error (see make_handler)."""
    import gradio as gr

    shown = steps_shown or PerSession()

    def in_line(ahead: int) -> None:
        progress(0, desc=f"Waiting in line: {ahead} ahead")
        shown.set(session, f"Waiting in line: {ahead} ahead")

    steps = service.stream(ticket, request, request_id=new_request_id(), on_position=in_line)
    try:
        async for item in steps:
            if isinstance(item, Step):
                progress((item.index, item.total), desc="Denoising", unit="steps")
                shown.set(session, f"Step {item.index} of {item.total}")
                if item.preview is not None:
                    yield await asyncio.to_thread(preview_file, item.preview), request.seed
            else:
                yield quick_to_encode(item.image), item.seed
    except asyncio.CancelledError:
        if ticket.started is not None:
            raise
        # Cancelled while waiting in line (it has left it). Gradio cancels every running event
        # of a session when one of them is cancelled, so this may be a gradio_client job whose
        # neighbour was cancelled: answer it, or its caller would wait for ever.
        raise gr.Error("cancelled while waiting in line (a job of the same client session was cancelled): "
                       "submit it again", title="Cancelled", print_exception=False) from None
    except Exception as err:
        raise _gradio_error(err) from None
    finally:
        shown.clear(session)
        await steps.aclose()


def make_handler(service: Service, steps_shown: PerSession | None = None, loras_picked: PerSession | None = None):
    """The function behind `/infer`, with the Space's signature, streaming (image, seed).

    Like the Space's, it yields a preview after each denoising step (every `preview_every`), then
    the full-quality image: `gradio_client`'s predict() gets the last, submit() iterates them all.
    It waits in the service's one line (Gradio's queue holds nothing back: see build_app), showing
    its place in line as progress. The pipeline runs in a worker thread; when the caller cancels
    or goes away, Gradio cancels this generator: a request still waiting leaves the line, a
    running one stops at the end of its current step. Where it was called from the page, it uses the
    session's `loras_picked` and tells `steps_shown` which step it is on (shown under the image).

    Its own defaults are the Space's infer() defaults (seed 42, fixed), which the lazily cached
    examples use; API callers get the components' defaults instead (seed 0, randomized).
    """
    import gradio as gr

    loras_picked = loras_picked or PerSession()

    async def infer(
        prompt,
        seed=settings.EXAMPLE_SEED,
        randomize_seed=False,
        width=settings.WIDTH.default,
        height=settings.HEIGHT.default,
        guidance_scale=settings.GUIDANCE_SCALE.default,
        num_inference_steps=settings.NUM_INFERENCE_STEPS.default,
        progress=gr.Progress(),
        caller: gr.Request = None,
    ):
        """Generate an image with FLUX.1 [dev] from a text prompt.

        Args:
            prompt: what the image shows, in words (up to 512 tokens).
            seed: the random seed, 0 to 2147483647; the same seed and settings give the same image.
            randomize_seed: draw a new random seed instead of using `seed`.
            width: image width in pixels, 256 to 2048 (rounded down to a multiple of 16).
            height: image height in pixels, 256 to 2048 (rounded down to a multiple of 16).
            guidance_scale: how closely to follow the prompt, 1 to 15 (3.5 is usual).
            num_inference_steps: denoising steps, 1 to 50 (28 is usual; fewer is faster).

        Returns:
            The image, and the seed it was made with.
        """
        session = getattr(caller, "session_hash", None)
        try:
            request, ticket = service.admit_request(
                "gradio", prompt=prompt, seed=seed, randomize_seed=randomize_seed, width=width, height=height,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                loras=loras_picked.get(session))
        except (InvalidRequest, Busy) as err:  # counted by admit_request()
            raise _gradio_error(err) from None

        async for output in _to_page(service, request, ticket, progress, steps_shown, session):
            yield output

    return infer


def editor_images(value) -> tuple:
    """The Edit tab's ImageEditor value (files) as the edit's (image, mask): the uploaded picture,
    read and bounded as any upload (flux_infer.uploads), and what was brushed over it (any layer's
    painted pixels; None when nothing was: image to image)."""
    import numpy as np
    from PIL import Image

    from flux_infer.uploads import read_image

    background = (value or {}).get("background")
    if not background:
        raise InvalidRequest("no image to edit: upload one in the Edit tab's image box first")
    with open(background, "rb") as file:
        image = read_image(file.read(), "image")
    painted = None
    for layer in (value or {}).get("layers") or []:
        with Image.open(layer) as opened:
            alpha = np.asarray(opened.convert("RGBA").resize(image.size, Image.NEAREST))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return image, None
    return image, Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def make_edit_handler(service: Service, steps_shown: PerSession | None = None,
                      loras_picked: PerSession | None = None):
    """The Edit tab's handler (a private event, not an API endpoint: programs use
    /v1/images/edits): the uploaded image reworked, or repainted where the mask was brushed, with
    the same line, previews, cancellation and errors as `/infer`."""
    import gradio as gr

    loras_picked = loras_picked or PerSession()

    async def edit(editor, prompt, strength, seed, randomize_seed, guidance_scale, num_inference_steps,
                   progress=gr.Progress(), caller: gr.Request = None):
        from flux_infer.uploads import edit_size

        session = getattr(caller, "session_hash", None)
        try:
            image, mask = editor_images(editor)
            width, height = edit_size(image.size)
            request, ticket = service.admit_request(
                "gradio", prompt=prompt, seed=seed, randomize_seed=randomize_seed, width=width, height=height,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                loras=loras_picked.get(session),
                edit=dict(image=image, mask=mask, strength=strength))
        except (InvalidRequest, Busy) as err:  # counted by admit_request() once validated
            raise _gradio_error(err) from None
        async for output in _to_page(service, request, ticket, progress, steps_shown, session):
            yield output

    return edit


def remember(image: str | None, seed, history):
    """Put the newest image first in the session's gallery, keeping HISTORY_SIZE.

    Images are the result's file in the server's temporary storage, not pixels: the gallery shows
    them as they are (no re-encoding of the whole gallery per request, no arrays held per session),
    and one whose file was deleted after --keep-outputs drops out instead of showing broken.
    """
    if image is None:
        return history, history
    kept = [(path, caption) for path, caption in (history or []) if os.path.exists(path)]
    history = [(image, f"seed {int(seed)}"), *kept][: settings.HISTORY_SIZE]
    return history, history


def sweep_files(demo, age: float | None) -> int:
    """Delete the temporary files Gradio made for `demo` (results, previews) older than `age` seconds,
    all of them with None; returns how many went.

    Gradio's own `delete_cache` sweep walks its live sets of files from a worker thread: a request that
    adds a file meanwhile raises "Set changed size during iteration" and ends Gradio's sweep task for
    the life of the process, after which the files pile up. This one walks a copy (copying a set is
    atomic under the GIL) and takes out only what it deleted. The server runs it on a timer.
    """
    keep = gradio_internals.kept_files(demo)
    root = Path(gradio_internals.cache_folder()).resolve()
    cutoff = None if age is None else time.time() - age
    deleted = 0
    for files in list(gradio_internals.temp_file_sets(demo)):
        gone = set()
        for name in files.copy() - keep:
            try:
                if cutoff is None or os.lstat(name).st_ctime < cutoff:
                    os.remove(name)
                    gone.add(name)
                    _remove_if_empty(Path(name).resolve().parent, root)
            except FileNotFoundError:
                gone.add(name)
        files.difference_update(gone)
        deleted += len(gone)
    return deleted


def _remove_if_empty(folder: Path, root: Path) -> None:
    """Gradio keeps each file in a folder of its own, named by the file's hash, in its folder `root`,
    and leaves that folder when the file is deleted: an empty folder per image, for good. Removed
    once empty; not the previews' folder, which every preview is written into."""
    if folder.parent != root or folder.name == PREVIEWS_FOLDER:
        return
    try:
        folder.rmdir()
    except OSError:  # not empty (another file of the same content), or gone already
        pass


def _lora_picker(service: Service):
    """The LoRAs of --lora-dir for this browser session's images, and the scale they are used at."""
    import gradio as gr

    with gr.Accordion("LoRAs", open=False):
        names = gr.Dropdown(choices=service.loras.names(), multiselect=True, max_choices=settings.MAX_LORAS,
                            label="LoRAs", info=f"the .safetensors files in the server's {service.loras.folder.name}/",
                            elem_id="loras")
        scale = _slider("LoRA scale", settings.LORA_SCALE)
    return names, scale


def _edit_tab(image_format: str):
    """The Edit tab's components: ((editor, prompt, strength, seed, randomize, guidance, steps),
    run button, result, step line)."""
    import gradio as gr

    editor = gr.ImageEditor(label="Paint what to repaint, or nothing to rework it all",
                            type="filepath", sources=("upload", "clipboard"), layers=False, elem_id="editor",
                            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), transforms=())
    with gr.Row():
        prompt = gr.Text(label="Edit prompt", show_label=False, max_lines=1, placeholder="Describe the new image",
                         container=False, elem_id="edit-prompt")
        button = gr.Button("Edit", scale=0, elem_id="edit-run")
    strength = _slider("Strength (0 keeps the image, 1 repaints it all)", settings.STRENGTH)
    result = gr.Image(label="Edited", show_label=False, format=image_format, elem_id="edit-result",
                      interactive=False, type="filepath")
    line = gr.Markdown("", elem_id="edit-steps", elem_classes="step-line")
    with gr.Accordion("Advanced Settings", open=False):
        seed = _slider("Edit seed", settings.SEED)
        randomize = gr.Checkbox(label="Randomize edit seed", value=settings.RANDOMIZE_SEED_DEFAULT)
        with gr.Row():
            guidance = _slider("Edit guidance scale", settings.GUIDANCE_SCALE)
            steps = _slider("Edit steps", settings.NUM_INFERENCE_STEPS)
    return (editor, prompt, strength, seed, randomize, guidance, steps), button, result, line


def build_demo(service: Service, *, image_format: str = settings.DEFAULT_IMAGE_FORMAT):
    """The Space's Blocks page wired to `service`; nothing is launched (nor swept: see sweep_files)."""
    import gradio as gr

    if image_format not in settings.IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(settings.IMAGE_FORMATS)}, got {image_format!r}")
    steps_shown, loras_picked = PerSession(default=""), PerSession()
    infer = make_handler(service, steps_shown, loras_picked)

    with gr.Blocks(title="FLUX.1 [dev]") as demo:
        with gr.Column(elem_id="col-container"):
            gr.Markdown(f"# {settings.TITLE}\n{settings.DESCRIPTION}")
            with gr.Tabs():
                with gr.Tab("Generate"):
                    with gr.Row():
                        prompt = gr.Text(label="Prompt", show_label=False, max_lines=1, placeholder="Enter your prompt",
                                         container=False)
                        run_button = gr.Button("Run", scale=0)
                    result = gr.Image(label="Result", show_label=False, format=image_format, elem_id="result",
                                      interactive=False, type="filepath")  # as the gallery's input: its file
                    # Which step the previews are at. Gradio's progress text is hidden once a generator has
                    # yielded, so a timer polls it while a request runs (private events, not in the API).
                    step_line = gr.Markdown("", elem_id="steps", elem_classes="step-line")
                    with gr.Accordion("Advanced Settings", open=False):
                        seed = _slider("Seed", settings.SEED)
                        randomize_seed = gr.Checkbox(label="Randomize seed", value=settings.RANDOMIZE_SEED_DEFAULT)
                        with gr.Row():
                            width = _slider("Width", settings.WIDTH)
                            height = _slider("Height", settings.HEIGHT)
                        with gr.Row():
                            guidance_scale = _slider("Guidance Scale", settings.GUIDANCE_SCALE)
                            num_inference_steps = _slider("Number of inference steps", settings.NUM_INFERENCE_STEPS)
                    gr.Examples(
                        examples=list(settings.EXAMPLES),
                        fn=infer,
                        inputs=[prompt],
                        outputs=[result, seed],
                        cache_examples=True,
                        cache_mode="lazy",
                    )
                with gr.Tab("Edit"):
                    edit_inputs, edit_button, edit_result, edit_line = _edit_tab(image_format)
            step_timer = gr.Timer(settings.STEP_LINE_EVERY_S, active=False)
            if service.loras is not None:
                lora_names, lora_scale = _lora_picker(service)
            history = gr.State([])
            gallery = gr.Gallery(label="Recent images", columns=4, height=280, object_fit="cover", elem_id="history",
                                 show_label=True, interactive=False)
        def step_texts(caller: gr.Request):
            return (steps_shown.get(caller.session_hash),) * 2

        def stop_steps():
            return gr.Timer(active=False), ""

        private = dict(api_visibility="private", show_progress="hidden", queue=False)
        gr.on(triggers=[run_button.click, prompt.submit, edit_button.click], fn=lambda: gr.Timer(active=True),
              outputs=step_timer, **private)
        step_timer.tick(step_texts, outputs=[step_line, edit_line], **private)
        run = gr.on(
            triggers=[run_button.click, prompt.submit],
            fn=infer,
            inputs=[prompt, seed, randomize_seed, width, height, guidance_scale, num_inference_steps],
            outputs=[result, seed],
            api_name="infer",
            # The handler validates raw values itself: Gradio's own slider checks would answer a
            # wrong type with an unclear internal error instead of a message naming the argument.
            preprocess=False,
            # Gradio's full progress overlay would cover the previews; the step line says where it is.
            show_progress="minimal",
        )
        run.success(remember, inputs=[result, seed, history], outputs=[gallery, history], **private)
        run.then(stop_steps, outputs=[step_timer, step_line], **private)
        # The Edit tab: the same line, previews and step line, as a private event (programs use
        # /v1/images/edits), so the API still has /infer alone.
        editing = edit_button.click(make_edit_handler(service, steps_shown, loras_picked), inputs=list(edit_inputs),
                                    outputs=[edit_result, edit_inputs[3]], api_visibility="private",
                                    show_progress="minimal")
        editing.success(remember, inputs=[edit_result, edit_inputs[3], history], outputs=[gallery, history], **private)
        editing.then(stop_steps, outputs=[step_timer, edit_line], **private)
        if service.loras is not None:
            def pick(names, scale, caller: gr.Request):
                loras_picked.set(caller.session_hash, [{"name": name, "scale": scale} for name in names or ()])

            gr.on(triggers=[lora_names.change, lora_scale.release], fn=pick, inputs=[lora_names, lora_scale],
                  **private)
            demo.load(lambda: gr.Dropdown(choices=service.loras.names()), outputs=lora_names, **private)

        def forget(caller: gr.Request):
            steps_shown.clear(caller.session_hash)
            loras_picked.clear(caller.session_hash)

        demo.unload(forget)
    gradio_internals.check(demo)
    return demo
