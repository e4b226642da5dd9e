"""Live previews, progress and cancellation, through a live server and gradio_client."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from unittest.mock import Mock

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, wait_for
from PIL import Image

pytestmark = pytest.mark.e2e  # starts servers


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _stream(client, *args):
    job = client.submit(*args, api_name="/infer")
    outputs = list(job)
    return job, outputs


def test_submit_streams_a_preview_per_step_then_the_predict_image(client, server):
    args = ("a lighthouse at dusk", 77, False, 512, 384, 3.5, 5)
    job, outputs = _stream(client, *args)
    assert len(outputs) >= 5 + 1
    assert all(seed == 77 for _, seed in outputs)
    previews, final = outputs[:-1], outputs[-1]
    # The server's default --preview auto falls back to the latent map here (no TAEF1 offline):
    # one pixel per latent, 1/8 of the image's size.
    assert {Image.open(p).size for p, _ in previews} == {(64, 48)}
    frames = [_pixels(p) for p, _ in previews]
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:]))
    # Previews go as WebP, as the Space sent them (small, quick to encode at every step); the final
    # image in the page's format.
    assert {Image.open(p).format for p, _ in previews} == {"WEBP"}
    assert Image.open(final[0]).format == "WEBP" and Image.open(final[0]).size == (512, 384)
    predicted, seed = client.predict(*args, api_name="/infer")
    assert seed == 77
    np.testing.assert_array_equal(_pixels(final[0]), _pixels(predicted))
    assert "previews: latent (TAEF1 not found at" in server.log()


def test_preview_files_are_served_from_gradios_folder_and_swept_with_its_own(tiny_dir, tmp_path, monkeypatch):
    from conftest import InProcessServer
    from gradio_client import Client

    from flux_infer import web
    from flux_infer.inference import FluxInference
    from flux_infer.loading import load_pipeline
    from flux_infer.previews import LatentPreview
    from flux_infer.server import ServerConfig, build_app
    from flux_infer.service import Service

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    service = Service(FluxInference(pipeline, preview=LatentPreview()))
    demo = web.build_demo(service)
    server = InProcessServer(build_app(service, demo, ServerConfig()))
    try:
        job = Client(server.url, verbose=False).submit("a swept owl", 4, False, 256, 256, 3.5, 3, api_name="/infer")
        outputs = list(job)
        job.result()
        assert len(outputs) == 3 + 1 and {Image.open(p).format for p, _ in outputs[:-1]} == {"WEBP"}
        written = list((tmp_path / "gradio" / "flux-infer-previews").glob("*.webp"))
        assert len(written) == 3  # served as they were written, not copied
        # Gradio keeps the final image in a folder of its own, named by its hash.
        folders = {os.path.dirname(name) for files in demo.temp_file_sets for name in files}
        previews = str(tmp_path / "gradio" / web.PREVIEWS_FOLDER)
        assert len(folders - {previews}) == 1
        # Swept with Gradio's own files (the final image's), as the server's timer does; the final
        # image's folder goes with it, the previews' stays.
        assert web.sweep_files(demo, None) == 3 + 1
        assert not [path for path in (tmp_path / "gradio").rglob("*") if path.is_file()]
        assert [os.path.isdir(folder) for folder in sorted(folders - {previews})] == [False]
        assert os.path.isdir(previews)
    finally:
        server.stop()


def _browser_events(server, data):
    """What a browser tab does: join the queue, then read the event stream; yields each message."""
    config = server.http.get("config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "infer")
    session = uuid.uuid4().hex[:11]
    joined = server.http.post("gradio_api/queue/join", json={
        "data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
    assert joined.status_code == 200
    with httpx.stream("GET", server.url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                yield message
                if message.get("msg") == "process_completed":
                    return


def test_the_page_gets_step_progress(server):
    seen = []
    for message in _browser_events(server, ["steps", 1, False, 1024, 1024, 3.5, 6]):
        if message.get("msg") == "progress":
            seen += [(p["index"], p["length"], p["unit"]) for p in message["progress_data"]]
    assert seen, "no progress update reached the page"
    assert all(length == 6 and unit == "steps" for _, length, unit in seen)
    assert [index for index, _, _ in seen] == sorted(index for index, _, _ in seen)
    assert seen[-1][0] >= 5


def test_cancel_stops_the_denoising_and_frees_the_queue(server):
    client = server.client()
    slow = client.submit("a slow one", 5, False, 1024, 1024, 3.5, 28, api_name="/infer")
    deadline = time.monotonic() + 120
    while len(slow.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(slow.outputs()) >= 2, "no previews arrived"
    # The next in line is another user's: Gradio's cancel takes every running event of the
    # cancelling client's session with it (see below).
    waiting = server.client().submit("next in line", 6, False, 256, 256, 3.5, 2, api_name="/infer")
    same_session = client.submit("same client, waiting", 7, False, 256, 256, 3.5, 2, api_name="/infer")
    wait_for(lambda: server.scheduler_depth() == 2, "both jobs to join the line")
    slow.cancel()
    # A job of the same session that was waiting is told so at once, never left hanging.
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="cancelled while waiting in line"):
        same_session.result(timeout=120)
    path, seed = waiting.result(timeout=120)
    assert seed == 6
    stopped = re.findall(r"cancelled after step (\d+) of 28", server.log())
    assert stopped, server.log()[-2000:]
    # It stopped early (a few steps after the previews we saw), not after all 28 steps.
    assert int(stopped[-1]) < 20


def test_a_closed_page_stops_the_denoising(server):
    before = server.log().count("cancelled after step")
    generating = 0
    for message in _browser_events(server, ["a closed tab", 3, False, 1024, 1024, 3.5, 28]):
        if message.get("msg") == "process_generating":
            generating += 1
            if generating == 2:
                break  # closes the stream, as a closed tab does
    wait_for(lambda: server.log().count("cancelled after step") > before, "the generation to stop")
    stopped = re.findall(r"cancelled after step (\d+) of 28", server.log())
    assert len(stopped) > before and int(stopped[-1]) < 20


@pytest.fixture(scope="module")
def taef1_server(tiny_dir, tmp_path_factory):
    from flux_infer.tiny import make_tiny_taef1

    workdir = tmp_path_factory.mktemp("taef1")
    taef1 = make_tiny_taef1(workdir / "taef1")
    srv = Server(["--model", str(tiny_dir), "--preview", "taef1", "--taef1", str(taef1), "--preview-every", "2",
                  "--image-format", "webp"], workdir)
    yield srv
    srv.stop()


def test_taef1_previews_every_other_step(taef1_server):
    client = taef1_server.client()
    _, outputs = _stream(client, "a harbour", 11, False, 1024, 768, 3.5, 5)
    previews = outputs[:-1]
    # Steps 2 and 4, and the last step (5), then the final image.
    assert len(previews) == 3
    # Decoded at full size by TAEF1, then scaled to at most 512 px on the long side.
    assert {Image.open(p).size for p, _ in previews} == {(512, 384)}
    final = Image.open(outputs[-1][0])
    assert final.size == (1024, 768)
    assert final.format == "WEBP"  # --image-format webp: the Space's format
    assert "previews: taef1 from" in taef1_server.log()


def test_latent_preview_maps_channels_to_colour():
    from flux_infer.previews import (
        FLUX_LATENT_RGB_BIAS,
        FLUX_LATENT_RGB_FACTORS,
        LatentPreview,
    )

    latents = torch.zeros(16, 3, 5)
    latents[4, 0, 0] = 4.0  # channel 4 pushes all three colours up
    image = np.asarray(LatentPreview()(latents).image())
    assert image.shape == (3, 5, 3)
    expected = (np.array(FLUX_LATENT_RGB_BIAS) + 4.0 * np.array(FLUX_LATENT_RGB_FACTORS[4]) + 1) * 127.5
    np.testing.assert_allclose(image[0, 0], np.round(expected), atol=1)
    np.testing.assert_allclose(image[1, 1], np.round((np.array(FLUX_LATENT_RGB_BIAS) + 1) * 127.5), atol=1)


def test_decoder_choice(tmp_path, monkeypatch):
    from flux_infer import loading
    from flux_infer.previews import LatentPreview, Taef1Preview, load_preview_decoder
    from flux_infer.tiny import make_tiny_taef1

    assert load_preview_decoder("none", device="cpu", dtype=torch.float32) is None
    assert isinstance(load_preview_decoder("latent", device="cpu", dtype=torch.float32), LatentPreview)
    missing = str(tmp_path / "no-taef1")
    assert isinstance(load_preview_decoder("auto", taef1=missing, device="cpu", dtype=torch.float32), LatentPreview)
    with pytest.raises(ValueError, match="could not load TAEF1 from .*no-taef1.*hf download madebyollin/taef1"):
        load_preview_decoder("taef1", taef1=missing, device="cpu", dtype=torch.float32)
    # A server loads the decoder first: one that cannot load is said before the model's minute of loading.
    with monkeypatch.context() as patched:
        patched.setattr(loading, "load_pipeline", Mock(side_effect=AssertionError("the model was read")))
        with pytest.raises(ValueError, match="could not load TAEF1 from .*no-taef1"):
            loading.load_inference(loading.InferenceSpec(model="tiny", device="cpu", preview="taef1", taef1=missing))
    found = make_tiny_taef1(tmp_path / "taef1")
    taef1 = load_preview_decoder("auto", taef1=str(found), device="cpu", dtype=torch.float32)
    assert isinstance(taef1, Taef1Preview)
    # Its convolutions' weights in channels_last, their fastest layout (see load_taef1).
    convolutions = [m.weight for m in taef1.vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    assert not all(w.is_contiguous() for w in convolutions)  # not a layout both readings accept (1x1 kernels)
    with pytest.raises(ValueError, match="--preview must be one of auto, taef1, latent, none"):
        load_preview_decoder("fast", device="cpu", dtype=torch.float32)
