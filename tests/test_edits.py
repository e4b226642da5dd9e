"""Image to image and inpainting with the loaded components: the same pixels as diffusers' own
pipelines, no second copy of any weight, and /v1/images/edits through the openai client."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from flux_infer.inference import FluxInference, build_request
from flux_infer.loading import load_pipeline

SIZE = (320, 256)  # width, height


def picture(seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.BILINEAR)


def left_half_mask(size=SIZE):
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, : size[0] // 2] = 255
    return Image.fromarray(mask, "L")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inference(tiny_dir):
    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    return FluxInference(pipeline)


def edit(inference, image, mask=None, strength=0.6, seed=3, steps=4):
    request = build_request("a reworked fox", seed=seed, randomize_seed=False, width=image.size[0],
                            height=image.size[1], num_inference_steps=steps)
    return inference.run(replace(request, image=image, mask=mask, strength=strength))


def direct(pipeline_class, inference, image, mask=None, strength=0.6, seed=3, steps=4, **extra):
    """diffusers' own pipeline, built from the same components and called as its docs show."""
    pipeline = pipeline_class(**inference.pipeline.components)
    masked = {} if mask is None else {"mask_image": mask}
    return pipeline(prompt="a reworked fox", image=image, strength=strength, width=image.size[0],
                    height=image.size[1], guidance_scale=3.5, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), **masked, **extra)


def test_image_to_image_and_inpainting_give_diffusers_own_pixels(inference):
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    image, mask = picture(), left_half_mask()
    result = edit(inference, image)
    assert result.image.size == SIZE
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(direct(FluxImg2ImgPipeline, inference,
                                                                             image).images[0]))
    assert "Strength: 0.6, Mode: image-to-image" in result.image.info["parameters"]
    inpainted = edit(inference, image, left_half_mask())
    np.testing.assert_array_equal(np.asarray(inpainted.image), np.asarray(direct(FluxInpaintPipeline, inference,
                                                                                 image, mask).images[0]))
    assert not np.array_equal(np.asarray(inpainted.image), np.asarray(result.image))
    # What the PNG's flux_infer chunk and the --output-dir sidecar record: the edit, not its pixels.
    import json

    recorded = json.loads(inpainted.image.info["flux_infer"])
    assert (recorded["kind"], recorded["strength"], recorded["image_size"], recorded["mask_size"]) == (
        "inpaint", 0.6, list(SIZE), list(SIZE))


def test_outside_the_mask_the_latents_are_the_images(inference):
    image, mask = picture(1), left_half_mask()
    pipeline = inference.pipeline_for("inpaint")
    latents = pipeline(prompt="a reworked fox", image=image, mask_image=mask, strength=0.8, width=SIZE[0],
                       height=SIZE[1], num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                       output_type="latent").images
    # The image's latents as the pipeline makes them: the generator's first draw samples the VAE's.
    processed = pipeline.image_processor.preprocess(image, height=SIZE[1], width=SIZE[0])
    encoded = pipeline._encode_vae_image(processed, generator=torch.Generator().manual_seed(3))
    unpacked = pipeline._unpack_latents(latents, SIZE[1], SIZE[0], pipeline.vae_scale_factor)
    right = slice(SIZE[0] // 16, None)  # latents are 1/8 of the image; the mask's right half kept
    torch.testing.assert_close(unpacked[..., right], encoded[..., right], rtol=0, atol=1e-5)
    assert (unpacked[..., : SIZE[0] // 16] - encoded[..., : SIZE[0] // 16]).abs().mean() > 0.1


def test_strength_zero_returns_the_image_and_one_repaints_it(inference):
    image = picture(2)
    kept = edit(inference, image, strength=0.0)
    np.testing.assert_array_equal(np.asarray(kept.image), np.asarray(image))
    repainted = edit(inference, image, strength=1.0)
    assert np.abs(np.asarray(repainted.image).astype(int) - np.asarray(image)).mean() > 10


def test_the_edit_pipelines_share_every_weight(inference):
    def storage(pipeline):
        return {parameter.data_ptr() for component in pipeline.components.values()
                if isinstance(component, torch.nn.Module) for parameter in component.parameters()}

    base = storage(inference.pipeline)
    for kind in ("image-to-image", "inpaint"):
        assert storage(inference.pipeline_for(kind)) == base, kind
        assert inference.pipeline_for(kind).transformer is inference.pipeline.transformer


def test_an_edit_leaves_the_shared_weights_as_they_were(tiny_dir):
    """In bfloat16 (as on a GPU): diffusers' from_pipe would cast the shared modules to float32."""
    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu", dtype="bfloat16")
    inference = FluxInference(pipeline)
    request = build_request("a fox", seed=2, randomize_seed=False, width=256, height=256, num_inference_steps=2)
    before = np.asarray(inference.run(request).image)
    edit(inference, picture(), left_half_mask())
    edit(inference, picture())
    assert {module.dtype for module in (pipeline.transformer, pipeline.text_encoder_2, pipeline.vae)} == {
        torch.bfloat16}
    np.testing.assert_array_equal(np.asarray(inference.run(request).image), before)


def test_model_offload_frees_the_gpu_after_an_edit_or_a_cancelled_image(tiny_dir, monkeypatch):
    """diffusers gives every model-offloaded module back to the CPU at the end of a finished
    FluxPipeline call only: an edit pipeline made from the components frees its own offload hooks
    (none), and a cancelled call frees nothing, so the VAE or the transformer would stay on the GPU.
    The runtime frees them after every call. On a CPU nothing moves: what is seen is diffusers' call
    that moves them (bench/gpu.py reads the GPU memory left allocated)."""
    import threading

    from flux_infer.inference import GenerationCancelled
    from flux_infer.tuning import MemoryPlan, Options, Runtime

    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    pipeline.enable_model_cpu_offload(device="cpu")  # what --offload model does on a GPU
    inference = FluxInference(pipeline, runtime=Runtime(pipeline, Options(), MemoryPlan(offload="model"), "cpu"))
    freed = []
    free = pipeline.maybe_free_model_hooks
    monkeypatch.setattr(pipeline, "maybe_free_model_hooks", lambda: (freed.append("freed"), free()))
    assert edit(inference, picture(), left_half_mask()).image.size == SIZE
    assert len(freed) == 1
    inference.run(build_request("a fox", seed=2, randomize_seed=False, width=256, height=256, num_inference_steps=2))
    assert len(freed) == 2  # a finished text-to-image: diffusers' own call, not a second one
    cancel = threading.Event()
    request = build_request("a fox", seed=2, randomize_seed=False, width=256, height=256, num_inference_steps=4)
    with pytest.raises(GenerationCancelled):
        inference.run(request, on_step=lambda step: cancel.set(), cancel=cancel)
    assert len(freed) == 3


@pytest.mark.parametrize("flags", [dict(quantize="int8"), dict(cache="fbcache:0.5")])
def test_edits_run_on_quantized_weights_and_with_a_step_cache(tiny_dir, flags):
    from flux_infer.tuning import Options, parse_cache

    options = Options(quantize=flags.get("quantize"), cache=parse_cache(flags["cache"]) if "cache" in flags else None)
    loaded = load_pipeline(str(tiny_dir), device="cpu", options=options)
    inference = FluxInference(loaded.pipeline, runtime=loaded.runtime)
    image = picture()
    for mask in (None, left_half_mask()):
        result = edit(inference, image, mask, strength=0.75, steps=8)
        assert result.image.size == image.size
        # A cache counts what it skipped out of the steps the edit ran (6 of 8 at strength 0.75).
        assert 0 <= result.cached_steps < 6 if "cache" in flags else result.cached_steps == 0


def test_cli_edit(tmp_path, tiny_dir, capsys):
    from flux_infer.cli import main

    (tmp_path / "in.png").write_bytes(png(picture(4)))
    (tmp_path / "mask.png").write_bytes(png(left_half_mask()))
    out = tmp_path / "out.png"
    assert main(["edit", str(tmp_path / "in.png"), "a fox", "--mask", str(tmp_path / "mask.png"), "--strength",
                 "0.7", "--model", str(tiny_dir), "--seed", "2", "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size == SIZE and "seed 2" in capsys.readouterr().out
    assert main(["edit", str(tmp_path / "in.png"), "a fox", "--strength", "1.5", "--model", str(tiny_dir),
                 "-o", str(out)]) == 2
    assert "strength must be a number between 0 and 1, got 1.5" in capsys.readouterr().err


@pytest.mark.e2e  # the session server
def test_openai_edit_end_to_end_and_bad_uploads(server, inference):
    import openai
    from diffusers import FluxInpaintPipeline
    from test_uploads import png_header

    client = openai.OpenAI(base_url=server.url + "v1", api_key="unused")
    image = picture(5)
    alpha = np.full((SIZE[1], SIZE[0]), 255, dtype=np.uint8)
    alpha[:, : SIZE[0] // 2] = 0  # OpenAI's convention: the transparent half is repainted
    openai_mask = Image.fromarray(np.dstack([np.zeros((SIZE[1], SIZE[0], 3), np.uint8), alpha]), "RGBA")
    response = client.images.edit(image=("in.png", png(image), "image/png"), mask=("mask.png", png(openai_mask),
                                  "image/png"), prompt="a reworked fox", extra_body={
                                  "seed": 3, "num_inference_steps": 4, "strength": 0.6})
    import base64

    made = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB")
    assert made.size == SIZE and response.model_extra["seeds"] == [3]
    expected = direct(FluxInpaintPipeline, inference, image, left_half_mask()).images[0]
    np.testing.assert_array_equal(np.asarray(made), np.asarray(expected))

    url = server.url + "v1/images/edits"
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    good = png(image)
    for files, data, param, message in [
        ({"image": ("x.txt", b"hello", "text/plain")}, {}, "image", "not an image this server can read"),
        ({"image": ("x.png", good[: len(good) // 2], "image/png")}, {}, "image", "truncated or damaged"),
        ({"image": ("x.png", png_header(30000, 30000), "image/png")}, {}, "image", "far too many pixels"),
        ({"image": ("x.gif", gif.getvalue(), "image/gif")}, {}, "image", "animated (2 frames)"),
        ({"image": ("x.png", good, "image/png"), "mask": ("m.png", png(Image.new("L", (64, 64))), "image/png")}, {},
         "mask", "mask is 64x64 but the image is 320x256"),
        ({"image": ("x.png", good, "image/png")}, {"strength": "1.5"}, "strength",
         "strength must be a number between 0 and 1, got 1.5"),
        ({}, {}, "image", "`image` is required"),
        ({"image": ("x.png", good, "image/png")}, {"n": "lots"}, "n", "`n` must be a whole number"),
        ({"image": ("x.png", good, "image/png")}, {"colour": "red"}, "colour", "unsupported field(s) colour"),
    ]:
        answer = server.http.post(url, files=files, data={"prompt": "a fox", **data}, timeout=60)
        assert answer.status_code == 400, (message, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and message in error["message"], (message, error)
    broken = server.http.post(url, content=b"not a form", headers={"content-type": "multipart/form-data"}, timeout=60)
    assert broken.status_code == 400 and broken.json()["error"]["message"] == (
        "the body must be multipart/form-data with an `image` file and a `prompt` (Missing boundary in multipart.)")
    huge = server.http.post(url, files={"image": ("x.png", bytes(60 * 2**20), "image/png")}, data={"prompt": "a fox"},
                      timeout=60)
    assert huge.status_code == 413, huge.text
    # And it keeps serving.
    answer = server.http.post(url, files={"image": ("x.png", good, "image/png")}, timeout=120,
                        data={"prompt": "a fox", "num_inference_steps": "2", "size": "256x256", "seed": "1"})
    assert answer.status_code == 200 and answer.json()["size"] == "256x256", answer.text
