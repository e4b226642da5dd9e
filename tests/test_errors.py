"""A pipeline that fails: the caller gets one clear line, the server log the details, and the next
request is served. A fake pipeline stands in, since a real one does not fail on demand."""

from __future__ import annotations

import os

import pytest
from conftest import FakePipeline, InProcessServer
from gradio_client.exceptions import AppError
from PIL import Image

pytestmark = pytest.mark.e2e  # starts servers


class FailsOnExplode(FakePipeline):
    """Fails on the prompt "explode", makes a red image otherwise."""

    color = "red"

    def __call__(self, **kwargs):
        if kwargs["prompt_embeds"] == "explode":
            raise RuntimeError("internal detail: tensor shapes (3, 4) and (5, 6)")
        if kwargs["prompt_embeds"] == "too big":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().__call__(**kwargs)


@pytest.fixture(scope="module")
def failing_app():
    """The server's app, with MCP, over a pipeline that fails on demand."""
    from flux_infer.inference import FluxInference
    from flux_infer.server import ServerConfig, build_app
    from flux_infer.service import Service
    from flux_infer.web import build_demo

    service = Service(FluxInference(FailsOnExplode()))
    server = InProcessServer(build_app(service, build_demo(service), ServerConfig(mcp=True)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def failing_server(failing_app):
    from gradio_client import Client

    return Client(failing_app.url, verbose=False)


def test_a_pipeline_error_is_one_line_and_the_server_goes_on(failing_server, caplog):
    with pytest.raises(AppError) as caught:
        failing_server.predict("explode", 1, False, 256, 256, 3.5, 2, api_name="/infer")
    message = str(caught.value)
    assert "generation failed (RuntimeError); the server log has the details" in message
    assert "tensor shapes" not in message and "Traceback" not in message
    assert any("tensor shapes" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    path, seed = failing_server.predict("fine", 2, False, 256, 256, 3.5, 2, api_name="/infer")
    assert seed == 2 and Image.open(path).size == (256, 256)


def test_out_of_memory_mid_generation_gives_advice_and_the_next_request_works(failing_server, monkeypatch):
    import torch

    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    with pytest.raises(AppError) as caught:
        failing_server.predict("too big", 1, False, 2048, 2048, 3.5, 2, api_name="/infer")
    message = str(caught.value)
    assert "out of GPU memory at 2048x2048: try a smaller size" in message and "--memory auto" in message
    assert "Tried to allocate" not in message
    assert released == [True]
    path, seed = failing_server.predict("fine", 3, False, 256, 256, 3.5, 2, api_name="/infer")
    assert seed == 3


def test_every_door_tells_a_pipeline_error_in_one_line_and_the_log_has_its_traceback(failing_app, caplog):
    """The OpenAI route and MCP tell an unexpected failure as /infer does: its type, not a library's
    text, with the traceback in the log; and a failure with advice (out of memory) as its advice."""
    import asyncio

    import openai
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    def tracebacks():
        return sum("tensor shapes" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)

    client = openai.OpenAI(base_url=failing_app.url + "v1", api_key="not-needed", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="explode", size="256x256")
    error = caught.value.body
    assert error["message"] == "generation failed (RuntimeError); the server log has the details", error
    assert tracebacks() == 1

    async def mcp_calls(*prompts):
        async with streamable_http_client(failing_app.url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as mcp:
                await mcp.initialize()
                return [await mcp.call_tool("infer", {"prompt": prompt, "seed": 4, "randomize_seed": False,
                                                      "width": 256, "height": 256, "num_inference_steps": 2})
                        for prompt in prompts]

    exploded, too_big, fine = asyncio.run(mcp_calls("explode", "too big", "fine"))
    told = exploded.content[0].text  # (after the SDK's "Error executing tool infer: ")
    assert exploded.isError and told.endswith(": generation failed (RuntimeError); the server log has the details")
    assert "tensor shapes" not in told
    assert tracebacks() == 2
    assert too_big.isError and "out of GPU memory at 256x256: try a smaller size" in too_big.content[0].text
    assert "Tried to allocate" not in too_big.content[0].text
    assert not fine.isError and fine.content[1].text == "seed 4, 256x256, 2 steps, guidance 3.5"


def test_no_log_prompts_keeps_prompts_out_of_the_log(caplog):
    import logging

    from flux_infer.inference import FluxInference, build_request
    from flux_infer.service import RequestIdFilter, Service

    service = Service(FluxInference(FailsOnExplode()), log_prompts=False)
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        service.run(build_request("my secret garden", seed=1, randomize_seed=False, width=256, height=256),
                    route="test", request_id="abc123")
    assert "my secret garden" not in caplog.text
    assert "test request: '<16 characters>'" in caplog.text
    assert {record.request_id for record in caplog.records if record.name.startswith("flux_infer")} == {"abc123"}
    assert service.metrics.requests.labels("test", "ok")._value.get() == 1


def test_an_image_that_cannot_be_saved_still_reaches_the_caller(tmp_path, caplog):
    from flux_infer.inference import FluxInference, build_request
    from flux_infer.service import Service

    folder = tmp_path / "outputs"
    service = Service(FluxInference(FailsOnExplode()), output_dir=folder)
    request = build_request("fine", seed=1, randomize_seed=False, width=256, height=256)
    service.run(request, route="test")
    service.saved()
    assert len(list(folder.glob("*.png"))) == 1
    for saved in folder.iterdir():
        saved.unlink()
    folder.rmdir()
    folder.write_text("a file where the folder was")  # --output-dir gone (a full disk fails the same way)
    result = service.run(request, route="test")
    assert result.image.size == (256, 256) and result.seed == 1
    service.saved()
    assert "could not save the image in --output-dir" in caplog.text
    assert service.metrics.requests.labels("test", "ok")._value.get() == 2


def test_the_caller_does_not_wait_for_output_dir_saving_and_the_file_keeps_its_request_id(tmp_path, caplog):
    import logging
    import threading

    from flux_infer.inference import FluxInference, build_request
    from flux_infer.service import REQUEST_ID, RequestIdFilter, Service

    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="flux_infer")
    folder = tmp_path / "outputs"
    service = Service(FluxInference(FailsOnExplode()), output_dir=folder)
    disk_free = threading.Event()  # a slow disk: a save beside the caller waits until the test lets it go on
    write = service.save

    handed, saving = [], threading.Event()

    def slow_save(result):
        handed.append(result.image)
        saving.set()
        if threading.current_thread() is not threading.main_thread():  # (in the caller's thread: not held)
            disk_free.wait()
        return write(result)

    service.save = slow_save
    request = build_request("fine", seed=3, randomize_seed=False, width=256, height=256)
    try:
        result = service.run(request, route="test", request_id="req42")
        assert result.seed == 3 and REQUEST_ID.get() == "-"
        assert not folder.exists() or not list(folder.iterdir())  # the image came back before its file
        # The saver writes a copy: Pillow images are not safe to save from two threads at once.
        assert saving.wait(60), "the save never started"
        assert handed[0] is not result.image and handed[0].info == result.image.info
    finally:
        disk_free.set()  # a failed assertion must not leave the saver's thread waiting for ever
    service.saved()
    saved = list(folder.glob("*-3-req42.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == (256, 256), list(folder.iterdir())
    assert [record.request_id for record in caplog.records if record.getMessage().startswith("saved ")] == ["req42"]


def test_the_gallery_keeps_the_newest_first_and_drops_deleted_files(tmp_path):
    from flux_infer import settings
    from flux_infer.web import remember

    history = []
    for seed in range(settings.HISTORY_SIZE + 3):
        (tmp_path / f"image-{seed}.webp").touch()
        shown, history = remember(str(tmp_path / f"image-{seed}.webp"), seed, history)
    assert len(history) == settings.HISTORY_SIZE
    newest = settings.HISTORY_SIZE + 2
    assert history[0] == (str(tmp_path / f"image-{newest}.webp"), f"seed {newest}")
    assert remember(None, 1, history) == (history, history)
    # Files deleted after --keep-outputs leave the gallery at the next image instead of showing broken.
    for _, caption in history[1:4]:
        (tmp_path / f"image-{caption.split()[1]}.webp").unlink()
    shown, history = remember(history[0][0], 99, history)
    assert [caption for _, caption in history][:3] == ["seed 99", f"seed {newest}", f"seed {newest - 4}"]
    assert all(os.path.exists(path) for path, _ in history)
