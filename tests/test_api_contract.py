"""The Space's API contract (shared/seed/space-api.txt), checked through gradio_client on a live server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, InProcessServer
from PIL import ExifTags, Image

from flux_infer.images import encode, parameters_of, settings_of

pytestmark = pytest.mark.e2e  # starts servers

CONTRACT = [
    # name, component, python type, default
    ("prompt", "Textbox", "str", None),
    ("seed", "Slider", "float", 0),
    ("randomize_seed", "Checkbox", "bool", True),
    ("width", "Slider", "float", 1024),
    ("height", "Slider", "float", 1024),
    ("guidance_scale", "Slider", "float", 3.5),
    ("num_inference_steps", "Slider", "float", 28),
]


def test_view_api_matches_the_contract(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/infer"]
    assert api["unnamed_endpoints"] == {}
    endpoint = api["named_endpoints"]["/infer"]
    got = [
        (p["parameter_name"], p["component"], p["python_type"]["type"], p["parameter_default"])
        for p in endpoint["parameters"]
    ]
    assert got == CONTRACT
    assert endpoint["parameters"][0]["parameter_has_default"] is False
    assert all(p["parameter_has_default"] for p in endpoint["parameters"][1:])
    returns = endpoint["returns"]
    assert [r["component"] for r in returns] == ["Image", "Slider"]
    assert {"path", "url", "size", "orig_name", "mime_type", "is_stream", "meta"} <= set(
        returns[0]["type"]["properties"]
    )


def test_the_contract_snippet_runs_against_the_local_url(server):
    # The contract document's snippet, with only the URL changed (and a small size so it is quick).
    from gradio_client import Client

    client = Client(server.url)
    result = client.predict(
        prompt="Hello!!",
        seed=0,
        randomize_seed=True,
        width=SMALL["width"],
        height=SMALL["height"],
        guidance_scale=3.5,
        num_inference_steps=SMALL["num_inference_steps"],
        api_name="/infer",
    )
    path, seed = result
    assert isinstance(seed, (int, float)) and 0 <= seed <= 2147483647 and float(seed).is_integer()
    image = Image.open(path)
    # The Space's format, WebP: here lossless, with its settings (the seed used among them) in its EXIF,
    # the `parameters` text in UserComment as other Stable Diffusion tools write it.
    assert image.format == "WEBP" and path.endswith(".webp")
    assert image.size == (256, 256)
    settings = settings_of(image)
    assert settings["seed"] == seed and settings["prompt"] == "Hello!!"
    assert parameters_of(image).startswith("Hello!!\nSteps: ") and f"Seed: {int(seed)}" in parameters_of(image)
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    assert comment == b"UNICODE\0" + parameters_of(image).encode("utf-16-be")


def test_randomize_seed_draws_a_new_seed_each_time(client):
    seeds = {client.predict("a", 7, True, 256, 256, 3.5, 1, api_name="/infer")[1] for _ in range(2)}
    assert len(seeds) == 2
    assert 7 not in seeds


def test_same_seed_gives_the_pixels_of_a_direct_pipeline_call(client, tiny_dir):
    from diffusers import FluxPipeline

    prompt, seed = "a cat holding a sign that says hello world", 1234
    path, used = client.predict(prompt, seed, False, 256, 256, 3.5, 4, api_name="/infer")
    assert used == seed
    served = np.asarray(Image.open(path).convert("RGB"))
    # Gradio wrote it as every door writes a lossless WebP (images.LOSSLESS_WEBP), its settings in EXIF.
    assert Path(path).read_bytes() == encode(Image.open(path), "webp")

    pipe = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    direct = pipe(
        prompt,
        width=256,
        height=256,
        guidance_scale=3.5,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    np.testing.assert_array_equal(served, np.asarray(direct))
    # And the seed matters: another seed gives other pixels.
    other, _ = client.predict(prompt, seed + 1, False, 256, 256, 3.5, 4, api_name="/infer")
    assert not np.array_equal(served, np.asarray(Image.open(other).convert("RGB")))


def test_image_format_png_sends_a_png_written_as_every_door_writes_it(tiny_dir):
    from gradio_client import Client

    from flux_infer.inference import FluxInference, build_request
    from flux_infer.loading import load_pipeline
    from flux_infer.server import ServerConfig, build_app
    from flux_infer.service import Service
    from flux_infer.web import build_demo

    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    service = Service(FluxInference(pipeline))
    server = InProcessServer(build_app(service, build_demo(service, image_format="png"), ServerConfig()))
    try:
        path, seed = Client(server.url, verbose=False).predict("a png owl", 5, False, 256, 256, 3.5, 2,
                                                               api_name="/infer")
    finally:
        server.stop()
    image = Image.open(path)
    assert seed == 5 and image.format == "PNG"
    # The settings in text chunks of the same names as a WebP's
    assert json.loads(image.text["flux_infer"])["prompt"] == "a png owl" and "Seed: 5" in image.text["parameters"]
    made = service.run(build_request("a png owl", seed=5, randomize_seed=False, width=256, height=256,
                                     num_inference_steps=2), route="test")
    # Gradio wrote the file as encode() writes a PNG (images.SAVE_OPTIONS).
    assert Path(path).read_bytes() == encode(made.image, "png")


def test_float_sizes_are_floored_to_multiples_of_16(client):
    path, _ = client.predict("a", 3.0, False, 300.0, 257.9, 2.0, 1.0, api_name="/infer")
    assert Image.open(path).size == (288, 256)


@pytest.mark.parametrize("example", ["a tiny astronaut hatching from an egg on the moon"])
def test_the_page_serves_the_space_layout(server, example):

    config = server.http.get("config").json()
    by_label = {c["props"].get("label"): c for c in config["components"] if c["props"].get("label")}
    for label, limits in {
        "Seed": (0, 2147483647, 1, 0),
        "Width": (256, 2048, 32, 1024),
        "Height": (256, 2048, 32, 1024),
        "Guidance Scale": (1, 15, 0.1, 3.5),
        "Number of inference steps": (1, 50, 1, 28),
    }.items():
        props = by_label[label]["props"]
        assert (props["minimum"], props["maximum"], props["step"], props["value"]) == limits
    assert by_label["Randomize seed"]["props"]["value"] is True
    assert by_label["Advanced Settings"]["props"]["open"] is False
    assert by_label["Prompt"]["props"]["placeholder"] == "Enter your prompt"
    assert any(c["props"].get("value") == "Run" for c in config["components"])
    assert example in json.dumps(config)
    # Run and Enter both trigger the one /infer dependency.
    infer = [d for d in config["dependencies"] if d.get("api_name") == "infer"]
    assert len(infer) == 1
    assert {t[1] for t in infer[0]["targets"]} == {"click", "submit"}
