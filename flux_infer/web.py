"""The Gradio front end: the Space's page and its one API endpoint, `/infer`.

The layout, labels, ranges and defaults are the Space's, so `gradio_client` scripts written for
`black-forest-labs/FLUX.1-dev` run unchanged against this server. The handler only translates:
raw values in, `FluxInference.infer()`, (image, seed) out, core errors to `gr.Error`.
"""

from __future__ import annotations

import logging

from flux_infer import settings
from flux_infer.inference import FluxInference, GenerationFailed, InvalidRequest

log = logging.getLogger(__name__)

CSS = """
#col-container {
    margin: 0 auto;
    max-width: 520px;
}
"""


def _slider(label: str, limits: settings.Range):
    import gradio as gr

    return gr.Slider(
        label=label, minimum=limits.minimum, maximum=limits.maximum, step=limits.step, value=limits.default
    )


def make_handler(inference: FluxInference):
    """The function behind `/infer`, with the Space's signature and (image, seed) result.

    Its own defaults are the Space's infer() defaults (seed 42, fixed), which the lazily cached
    examples use; API callers get the components' defaults instead (seed 0, randomized).
    """
    import gradio as gr

    def infer(
        prompt,
        seed=settings.EXAMPLE_SEED,
        randomize_seed=False,
        width=settings.WIDTH.default,
        height=settings.HEIGHT.default,
        guidance_scale=settings.GUIDANCE_SCALE.default,
        num_inference_steps=settings.NUM_INFERENCE_STEPS.default,
    ):
        try:
            result = inference.infer(
                prompt,
                seed=seed,
                randomize_seed=randomize_seed,
                width=width,
                height=height,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
            )
        except InvalidRequest as err:
            raise gr.Error(str(err), title="Invalid input") from None
        except GenerationFailed as err:
            raise gr.Error(str(err), title="Generation failed") from None
        except Exception as err:
            # Logged in full here; the caller gets one line, never a stack trace.
            log.exception("generation failed")
            raise gr.Error(
                f"generation failed ({type(err).__name__}); the server log has the details", title="Generation failed"
            ) from None
        return result.image, result.seed

    return infer


def build_demo(inference: FluxInference, *, image_format: str = settings.DEFAULT_IMAGE_FORMAT):
    """The Space's Blocks page wired to `inference`; nothing is launched."""
    import gradio as gr

    if image_format not in settings.IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(settings.IMAGE_FORMATS)}, got {image_format!r}")
    infer = make_handler(inference)

    with gr.Blocks(title="FLUX.1 [dev]") as demo:
        with gr.Column(elem_id="col-container"):
            gr.Markdown(f"# {settings.TITLE}\n{settings.DESCRIPTION}")
            with gr.Row():
                prompt = gr.Text(
                    label="Prompt", show_label=False, max_lines=1, placeholder="Enter your prompt", container=False
                )
                run_button = gr.Button("Run", scale=0)
            result = gr.Image(label="Result", show_label=False, format=image_format)
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
        gr.on(
            triggers=[run_button.click, prompt.submit],
            fn=infer,
            inputs=[prompt, seed, randomize_seed, width, height, guidance_scale, num_inference_steps],
            outputs=[result, seed],
            api_name="infer",
            # The handler validates raw values itself: Gradio's own slider checks would answer a
            # wrong type with an unclear internal error instead of a message naming the argument.
            preprocess=False,
        )
    return demo


def launch(
    demo,
    *,
    host: str = settings.DEFAULT_HOST,
    port: int = settings.DEFAULT_PORT,
    max_queue: int = settings.DEFAULT_MAX_QUEUE,
    block: bool = True,
):
    """Queue (one generation at a time, at most `max_queue` waiting) and serve `demo`."""
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo.launch(
        server_name=host,
        server_port=port,
        css=CSS,
        prevent_thread_lock=not block,
        # Our own errors are gr.Error already; this lets Gradio's own checks (a raw HTTP call with
        # too few values, say) reach the caller as their message instead of a bare "error".
        show_error=True,
        quiet=True,
    )
