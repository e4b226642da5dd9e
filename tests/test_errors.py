"""A pipeline that fails: the caller gets one clear line, the server log the details, and the next
request is served. A fake pipeline stands in, since a real one does not fail on demand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import InProcessServer


class FailsOnExplode:
    """Fails on the prompt "explode", makes a red image otherwise."""

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, **kwargs):
        if kwargs["prompt"] == "explode":
            raise RuntimeError("internal detail: tensor shapes (3, 4) and (5, 6)")
        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]), "red")])


@pytest.fixture(scope="module")
def failing_server():
    from gradio_client import Client

    from flux_infer.inference import FluxInference
    from flux_infer.server import ServerConfig, build_app
    from flux_infer.service import Service
    from flux_infer.web import build_demo

    service = Service(FluxInference(FailsOnExplode()))
    server = InProcessServer(build_app(service, build_demo(service), ServerConfig()))
    yield Client(server.url, verbose=False)
    server.stop()


def test_a_pipeline_error_is_one_line_and_the_server_goes_on(failing_server, caplog):
    with pytest.raises(AppError) as caught:
        failing_server.predict("explode", 1, False, 256, 256, 3.5, 2, api_name="/infer")
    message = str(caught.value)
    assert "generation failed (RuntimeError); the server log has the details" in message
    assert "tensor shapes" not in message and "Traceback" not in message
    assert any("tensor shapes" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    path, seed = failing_server.predict("fine", 2, False, 256, 256, 3.5, 2, api_name="/infer")
    assert seed == 2 and Image.open(path).size == (256, 256)
