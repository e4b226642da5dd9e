"""Beyond the Space, through real clients against a live server: the OpenAI images API (openai),
MCP (mcp), health/readiness/metrics and request ids (httpx), saved outputs and their retention."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from conftest import Server, files_under, wait_for
from PIL import Image

pytestmark = pytest.mark.e2e  # starts servers

KEEP_S = 4
TINY_ARGS = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def extras_server(tiny_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("extras")
    srv = Server(["--model", str(tiny_dir), "--mcp", "--output-dir", str(workdir / "outputs"),
                  "--keep-outputs", str(KEEP_S), "--preview", "none", "--model-alias", "dall-e-3",
                  "--model-alias", "gpt-image-1"], workdir,
                 env={"GRADIO_TEMP_DIR": str(workdir / "gradio-tmp")})
    srv.workdir = workdir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def openai_client(extras_server):
    from openai import OpenAI

    return OpenAI(base_url=extras_server.url + "v1", api_key="not-needed", max_retries=0)


def decode(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_openai_client_generates_with_seeds_matching_infer(extras_server, openai_client):
    response = openai_client.images.generate(model="flux.1-dev", prompt="a red kite", n=2, size="256x256",
                                             response_format="b64_json",
                                             extra_body={"seed": 41, "guidance_scale": 3.5, **TINY_ARGS})
    assert response.model_extra["seeds"] == [41, 42]
    assert [item.model_extra["seed"] for item in response.data] == [41, 42]
    images = [decode(item) for item in response.data]
    assert all(image.size == (256, 256) for image in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    # The same request through the Space's /infer gives the same pixels.
    path, seed = extras_server.client().predict("a red kite", 41, False, 256, 256, 3.5, 2, api_name="/infer")
    assert seed == 41
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(images[0].convert("RGB")))


def test_openai_url_format_and_models(extras_server, openai_client):
    response = openai_client.images.generate(prompt="a blue boat", size="256x256", response_format="url",
                                             extra_body=TINY_ARGS)
    url = response.data[0].url
    assert url.startswith(extras_server.url + "v1/files/")
    image = Image.open(io.BytesIO(extras_server.http.get(url).raise_for_status().content))
    assert image.size == (256, 256)
    assert [model.id for model in openai_client.models.list()] == [
        "flux.1-dev", "black-forest-labs/FLUX.1-dev", "dall-e-3", "gpt-image-1"]  # with the --model-alias names
    # Kept for --keep-outputs seconds, then gone.
    made = time.monotonic()
    while (gone := extras_server.http.get(url)).status_code == 200:
        assert time.monotonic() - made < KEEP_S + 60, "the url file outlived --keep-outputs by a minute"
        time.sleep(0.1)
    assert time.monotonic() - made >= KEEP_S - 1  # not before its time
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    # A name the server did not hand out never reaches the disk.
    for name in ["..%2F..%2Fpyproject.toml", "model_index.json", "%2Fetc%2Fpasswd"]:
        assert extras_server.http.get("v1/files/" + name).status_code == 404


@pytest.mark.parametrize("fields, param, message", [
    ({"model": "sdxl"}, "model", "unknown model 'sdxl': this server serves flux.1-dev, black-forest-labs/FLUX.1-dev, "
                                 "dall-e-3, gpt-image-1"),
    ({"size": "big"}, "size", '`size` must be "auto" or "WIDTHxHEIGHT"'),
    ({"size": "100x100"}, "width", "width must be a number between 256 and 2048, got 100"),
    ({"n": 5}, "n", "`n` must be a whole number from 1 to 4"),
    ({"response_format": "jpeg"}, "response_format", "must be 'b64_json' or 'url'"),
    ({"quality": "ultra"}, "quality", "`quality` must be 'low', 'medium', 'auto', 'standard', 'high', 'hd'"),
    ({"background": "transparent"}, "background", 'cannot be honoured: FLUX.1-dev makes opaque images'),
    ({"output_format": "gif"}, "output_format", "cannot be honoured: FLUX.1-dev makes still raster images"),
    ({"output_format": "bmp"}, "output_format", "`output_format` must be png, jpeg, webp, got 'bmp'"),
    ({"output_compression": 101}, "output_compression", "from 0 to 100, got 101"),
    ({"stream": True}, "stream", "`stream: true` is not supported"),
    ({"colour": "red"}, "colour", "unsupported field(s) colour"),
    ({"seed": -3}, "seed", "seed must be a whole number between 0 and 2147483647"),
    ({"num_inference_steps": 500}, "num_inference_steps", "num_inference_steps must be a whole number between 1 and 50"),
])
def test_openai_bad_fields_get_a_400_naming_them(openai_client, fields, param, message):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.images.generate(prompt="x", **{k: v for k, v in fields.items() if k in ("model", "size", "n",
                                                                                                "response_format")},
                                      extra_body={k: v for k, v in fields.items()
                                                  if k not in ("model", "size", "n", "response_format")})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and message in error["message"], error


def test_openai_fields_as_image_clients_send_them(extras_server, openai_client):
    # The official client, as a gpt-image app calls it: a model name, quality, format, compression.
    response = openai_client.images.generate(
        model="gpt-image-1", prompt="a green vase", size="256x256", quality="low", output_format="jpeg",
        output_compression=60, background="opaque", moderation="low", safety_identifier="user-7",
        extra_body={"seed": 12})
    image = decode(response.data[0])
    assert image.format == "JPEG" and image.size == (256, 256)
    # The response's own fields, as the openai package reads them.
    assert (response.output_format, response.quality, response.size, response.background) == (
        "jpeg", "low", "256x256", "opaque")
    # output_compression is the JPEG quality: the same image at 5 is far smaller.
    rough = openai_client.images.generate(model="gpt-image-1", prompt="a green vase", size="256x256", quality="low",
                                          output_format="jpeg", output_compression=5, extra_body={"seed": 12})
    assert len(base64.b64decode(rough.data[0].b64_json)) < len(base64.b64decode(response.data[0].b64_json)) / 2
    log = extras_server.log()
    assert "openai request: 'a green vase', 256x256, 12 steps, seed 12" in log  # quality low: 12 steps
    assert "accepted without effect on the image: moderation='low', safety_identifier='user-7'" in log
    # A raw body as other clients send it: dall-e-3's fields, nulls for defaults, an explicit step count.
    body = {"prompt": "a red door", "model": "dall-e-3", "quality": "hd", "style": "vivid", "size": "256x256",
            "n": None, "response_format": "url", "output_format": "webp", "user": None, "num_inference_steps": 2,
            "seed": 13}
    answer = extras_server.http.post("v1/images/generations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["quality"] == "hd" and answer.json()["seeds"] == [13]
    assert "openai request: 'a red door', 256x256, 2 steps, seed 13" in extras_server.log()  # the steps given win
    file = extras_server.http.get(answer.json()["data"][0]["url"])
    assert file.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(file.content)).format == "WEBP"
    # size "auto" is the Space's default size; png is the default format.
    auto = extras_server.http.post("v1/images/generations", timeout=120,
                      json={"prompt": "a wide field", "size": "auto", "num_inference_steps": 1, "seed": 14}).json()
    image = Image.open(io.BytesIO(base64.b64decode(auto["data"][0]["b64_json"])))
    assert (image.format, image.size, auto["size"], auto["output_format"]) == ("PNG", (1024, 1024), "1024x1024", "png")


def test_openai_malformed_bodies(extras_server):
    url = extras_server.url + "v1/images/generations"
    for body, status, message in [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON object"),
                                  (b"{}", 400, "`prompt` is required"),
                                  (json.dumps({"prompt": "x" * 70000}).encode(), 413, "the limit is 65536")]:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status and message in response.json()["error"]["message"]


def sample(server, name: str, **labels) -> float | None:
    """One sample of the server's /metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.http.get("metrics").text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return None


def test_health_readiness_metrics_and_request_ids(extras_server, openai_client):
    assert extras_server.http.get("healthz").json() == {"status": "ok"}
    ready = extras_server.http.get("readyz").json()
    assert ready["ready"] and ready["model_loaded"] and ready["queue_depth"] == 0 and ready["max_queue"] == 16
    raw = openai_client.images.with_raw_response.generate(prompt="a lamp", size="256x256",
                                                          extra_body={"seed": 3, **TINY_ARGS})
    request_id = raw.headers["x-request-id"]
    assert f"[{request_id}]" in extras_server.log() and "openai request: 'a lamp'" in extras_server.log()
    refused = extras_server.http.post("v1/images/generations", json={"prompt": "a lamp", "n": 99})
    assert refused.status_code == 400  # counted as invalid
    metrics = extras_server.http.get("metrics").text
    assert 'flux_requests_total{outcome="ok",route="openai"}' in metrics
    assert 'flux_requests_total{outcome="invalid",route="openai"}' in metrics
    assert "flux_generation_seconds_count" in metrics and "flux_queue_depth 0.0" in metrics
    assert "flux_steps_per_second" in metrics
    # The wait in line and the generation are measured apart.
    assert sample(extras_server, "flux_queue_wait_seconds_count", route="openai") >= 1
    assert 0 <= sample(extras_server, "flux_queue_wait_seconds_sum", route="openai") < sample(
        extras_server, "flux_generation_seconds_sum") + 1


def test_a_caller_that_hangs_up_stops_its_generation(extras_server, openai_client):
    import openai

    steps = 28
    with pytest.raises(openai.APITimeoutError):
        openai_client.with_options(timeout=1.0).images.generate(
            prompt="nobody waits for this", size="1024x1024", n=4, extra_headers={"x-request-id": "hung-up"},
            extra_body={"seed": 11, "num_inference_steps": steps})
    deadline = time.monotonic() + 30
    while "[hung-up]" not in extras_server.log() or "closed the connection" not in extras_server.log():
        assert time.monotonic() < deadline, extras_server.log()[-2000:]
        time.sleep(0.2)
    lines = [line for line in extras_server.log().splitlines() if "[hung-up]" in line]
    # Stopped within the first of its four images: nothing was generated for a caller who left.
    assert not [line for line in lines if "generated" in line], lines
    assert any(f"of {steps}" in line for line in lines), lines
    metrics = extras_server.http.get("metrics").text
    assert 'flux_requests_total{outcome="cancelled",route="openai"} 1.0' in metrics
    response = openai_client.images.generate(prompt="still here", size="256x256", extra_body={"seed": 2, **TINY_ARGS})
    assert response.data[0].model_extra["seed"] == 2


def test_output_dir_keeps_every_image_with_its_settings(extras_server):
    extras_server.client().predict("a saved owl", 77, False, 256, 256, 3.5, 2, api_name="/infer")
    # The file is written beside the next requests, after the caller has the image: its log line.
    wait_for(lambda: "-77-" in "".join(line for line in extras_server.log().splitlines() if " saved " in line),
             "the saved image's log line")
    saved = sorted((extras_server.workdir / "outputs").glob("*-77-*.png"))
    assert saved, list((extras_server.workdir / "outputs").iterdir())
    sidecar = json.loads(saved[-1].with_suffix(".json").read_text())
    assert (sidecar["prompt"], sidecar["seed"], sidecar["width"], sidecar["num_inference_steps"]) == (
        "a saved owl", 77, 256, 2)
    assert "Seed: 77" in Image.open(saved[-1]).info["parameters"]


def test_gradio_temporary_files_are_deleted_after_keep_outputs(extras_server):
    extras_server.client().predict("a fleeting cat", 5, False, 256, 256, 3.5, 2, api_name="/infer")
    temp = extras_server.workdir / "gradio-tmp"

    def images():  # the image and its previews
        return [path for path in files_under(temp) if path.suffix == ".webp"]

    assert images()
    wait_for(lambda: not images(), "the image to be deleted after --keep-outputs", timeout=3 * KEEP_S + 10)


def test_mcp_client_gets_the_image_its_seed_and_progress(extras_server):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    progress = []

    async def on_progress(done, total, message):
        progress.append((done, total, message))

    async def session():
        async with streamable_http_client(extras_server.url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as mcp:
                await mcp.initialize()
                tools = (await mcp.list_tools()).tools
                result = await mcp.call_tool("infer", {"prompt": "an mcp robot", "seed": 9, "randomize_seed": False,
                                                       "width": 256, "height": 320, "guidance_scale": 3.5,
                                                       "num_inference_steps": 2}, progress_callback=on_progress)
                bad = await mcp.call_tool("infer", {"prompt": "an mcp robot", "width": 100})
                return tools, result, bad

    tools, result, bad = asyncio.run(session())
    assert [tool.name for tool in tools] == ["infer"] and "FLUX.1 [dev]" in tools[0].description
    assert {"prompt", "seed", "randomize_seed", "width", "height", "guidance_scale",
            "num_inference_steps"} == set(tools[0].inputSchema["properties"])
    assert not result.isError, result
    image, text = result.content
    assert image.type == "image" and image.mimeType == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(image.data))).size == (256, 320)
    assert text.type == "text" and text.text == "seed 9, 256x320, 2 steps, guidance 3.5"
    assert progress == [(1, 2, "denoising step 1 of 2"), (2, 2, "denoising step 2 of 2")]
    # A bad value is a tool error that names the argument; the next call is served.
    assert bad.isError and "width must be a number between 256 and 2048, got 100" in bad.content[0].text
    # The same seed through /infer gives the same pixels; counted and logged as MCP, not as the page.
    path, _ = extras_server.client().predict("an mcp robot", 9, False, 256, 320, 3.5, 2, api_name="/infer")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")),
                                  np.asarray(Image.open(io.BytesIO(base64.b64decode(image.data))).convert("RGB")))
    assert sample(extras_server, "flux_requests_total", route="mcp", outcome="ok") == 1
    assert sample(extras_server, "flux_requests_total", route="mcp", outcome="invalid") == 1
    assert "mcp request: 'an mcp robot'" in extras_server.log()


# -- auth ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def locked_server(tiny_dir, tmp_path_factory):
    srv = Server(["--model", str(tiny_dir), "--auth", "ada:lovelace", "--api-key", "sekrit", "--preview", "none"],
                 tmp_path_factory.mktemp("locked"))
    yield srv
    srv.stop()


def test_auth_keeps_unauthenticated_callers_out(locked_server):
    import openai
    from openai import OpenAI

    for method, path in [("GET", "gradio_api/info"), ("POST", "gradio_api/call/infer"), ("GET", "config")]:
        response = httpx.request(method, locked_server.url + path, json={"data": ["x", 1, False, 256, 256, 3.5, 2]})
        assert response.status_code == 401, (path, response.status_code)
        assert not response.content.startswith(b"\x89PNG")
    assert locked_server.http.get("healthz").status_code == 200  # probes stay open
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=locked_server.url + "v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    assert locked_server.http.post("v1/images/generations", json={"prompt": "x"}).status_code == 401


def test_auth_lets_the_right_callers_in(locked_server):
    from openai import OpenAI

    path, seed = locked_server.client(auth=("ada", "lovelace")).predict("a key", 4, False, 256, 256, 3.5, 2,
                                                                        api_name="/infer")
    assert seed == 4 and Image.open(path).size == (256, 256)
    response = OpenAI(base_url=locked_server.url + "v1", api_key="sekrit", max_retries=0).images.generate(
        prompt="a key", size="256x256", extra_body={"seed": 4, **TINY_ARGS})
    np.testing.assert_array_equal(np.asarray(decode(response.data[0]).convert("RGB")),
                                  np.asarray(Image.open(path).convert("RGB")))


def test_binding_beyond_loopback_without_auth_is_warned_about():
    from flux_infer.server import ServerConfig, exposure_warnings

    assert exposure_warnings(ServerConfig(host="127.0.0.1")) == []
    warnings = exposure_warnings(ServerConfig(host="0.0.0.0"))
    assert len(warnings) == 2 and "without --auth" in warnings[0] and "no --api-key" in warnings[1]
    assert exposure_warnings(ServerConfig(host="0.0.0.0", auth=("a", "b"), api_key="k")) == []
