"""Faults, fuzzing, soak and security against live servers on the tiny model."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Server, files_under, wait_for
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from flux_infer import settings
from flux_infer.inference import InvalidRequest, build_request

# -- validation properties (hypothesis) ------------------------------------------------------------

ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=30), st.lists(st.integers(), max_size=3),
                      st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@hypothesis_settings(max_examples=400, deadline=None)
@given(prompt=ANY_VALUE, seed=ANY_VALUE, randomize=ANY_VALUE, width=ANY_VALUE, height=ANY_VALUE,
       guidance=ANY_VALUE, steps=ANY_VALUE)
def test_validation_accepts_in_range_values_or_says_what_is_wrong(prompt, seed, randomize, width, height, guidance,
                                                                  steps):
    try:
        request = build_request(prompt, seed=seed, randomize_seed=randomize, width=width, height=height,
                                guidance_scale=guidance, num_inference_steps=steps)
    except InvalidRequest as err:
        message = str(err)
        assert message and "Traceback" not in message and len(message) < 400
        assert any(name in message for name in ("prompt", "seed", "randomize_seed", "width", "height",
                                                "guidance_scale", "num_inference_steps")), message
        return
    assert isinstance(request.prompt, str) and request.prompt.strip()
    assert 0 <= request.seed <= settings.MAX_SEED
    for size in (request.width, request.height):
        assert settings.WIDTH.minimum <= size <= settings.WIDTH.maximum and size % settings.SIZE_MULTIPLE == 0
    assert settings.GUIDANCE_SCALE.minimum <= request.guidance_scale <= settings.GUIDANCE_SCALE.maximum
    assert settings.NUM_INFERENCE_STEPS.minimum <= request.num_inference_steps <= settings.NUM_INFERENCE_STEPS.maximum


@hypothesis_settings(max_examples=200, deadline=None)
@given(width=st.integers(256, 2048), height=st.integers(256, 2048), steps=st.integers(1, 50),
       guidance=st.floats(1, 15), seed=st.integers(0, settings.MAX_SEED))
def test_valid_values_pass_through_exactly(width, height, steps, guidance, seed):
    request = build_request("a", seed=seed, randomize_seed=False, width=width, height=height,
                            guidance_scale=guidance, num_inference_steps=steps)
    assert (request.seed, request.num_inference_steps, request.guidance_scale) == (seed, steps, guidance)
    assert (request.width, request.height) == (width - width % 16, height - height % 16)


# -- HTTP fuzzing ----------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=10), children,
                                                                                       max_size=6),
                    max_leaves=20)


@pytest.fixture(scope="module")
def fuzz_server(server):
    return server  # the session's server: fuzzing must leave it serving the modules after this one


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=JSON, route=st.sampled_from(["gradio_api/call/infer", "v1/images/generations", "gradio_api/queue/join",
                                          "gradio_api/run/predict"]))
@pytest.mark.e2e
def test_random_json_never_gets_a_500(fuzz_server, body, route):
    response = fuzz_server.http.post(route, json=body, timeout=60)
    assert response.status_code < 500, (route, body, response.status_code, response.text[:300])
    assert "Traceback" not in response.text


@pytest.mark.e2e
@pytest.mark.parametrize("content", [b"{", b"\xff\xfe\x00", b"null", b'{"data": ' + b"[" * 5000, b"0" * 10])
def test_malformed_bodies_never_get_a_500(fuzz_server, content):
    for route in ["gradio_api/call/infer", "v1/images/generations", "gradio_api/queue/join"]:
        response = fuzz_server.http.post(route, content=content, headers={"content-type": "application/json"})
        assert response.status_code < 500, (route, content[:20], response.status_code, response.text[:200])


@pytest.mark.e2e
def test_bodies_over_the_limit_are_refused(fuzz_server):
    from flux_infer.server import MAX_BODY_BYTES

    huge = json.dumps({"data": ["x" * (MAX_BODY_BYTES + 10), 0, False, 256, 256, 3.5, 1]})
    for route in ["gradio_api/call/infer", "gradio_api/queue/join", "v1/images/generations"]:
        response = fuzz_server.http.post(route, content=huge, headers={"content-type": "application/json"})
        assert response.status_code == 413, (route, response.status_code)
        assert response.json()["error"]["code"] == "body_too_large"
    # A prompt under the body limit but over the prompt limit is refused by validation, naming the limit.
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=f"the limit is {settings.MAX_PROMPT_CHARS}"):
        fuzz_server.client().predict("x" * (settings.MAX_PROMPT_CHARS + 1), 0, False, 256, 256, 3.5, 1,
                                     api_name="/infer")
    # After all of that the server still serves.
    assert fuzz_server.client().predict("still here", 1, False, 256, 256, 3.5, 1, api_name="/infer")[1] == 1


# -- security --------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_file_route_serves_only_generated_outputs(fuzz_server, tiny_dir):
    source = Path(__file__).resolve().parents[1] / "flux_infer" / "server.py"
    secrets = [tiny_dir / "model_index.json", tiny_dir / "transformer" / "config.json", Path.home() / ".bashrc",
               source, Path("/etc/passwd")]
    for path in secrets:
        for url in [f"gradio_api/file={path}", f"gradio_api/file={path}".replace("/", "%2F"),
                    f"gradio_api/file=../../../../../../..{path}", f"file={path}"]:
            response = fuzz_server.http.get(url)
            assert response.status_code in (403, 404, 405), (url, response.status_code)
            if path.is_file():
                assert path.read_bytes()[:40] not in response.content or not path.read_bytes()[:40]
    # What it made, it serves.
    made, _ = fuzz_server.client().predict("served", 2, False, 256, 256, 3.5, 1, api_name="/infer")
    assert Path(made).is_file()


def test_binds_to_loopback_by_default(monkeypatch):
    from flux_infer.cli import _parser

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert settings.DEFAULT_HOST == "127.0.0.1"
    assert _parser().parse_args(["serve"]).host == "127.0.0.1"


@pytest.mark.parametrize("name", ["flux1-dev.ckpt", "flux1-dev.pt", "pytorch_model.bin", "lora.pth"])
def test_pickle_checkpoints_are_refused(tmp_path, tiny_dir, name):
    from flux_infer.loading import ModelLoadError, load_pipeline, resolve_source

    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="is a pickle-based checkpoint, which can run code when loaded"):
        resolve_source(str(path))
    with pytest.raises(ModelLoadError, match="pickle-based"):
        load_pipeline(str(tiny_dir), device="cpu", loras=((str(path), 1.0),))


def test_a_folder_of_pickled_weights_is_refused(tmp_path, tiny_dir):
    import shutil

    from flux_infer.loading import ModelLoadError, resolve_source

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match="transformer is a pickle-based checkpoint"):
        resolve_source(str(folder))


def test_a_gradio_without_the_internals_we_read_stops_the_server_at_start_up():
    import types

    import gradio as gr

    from flux_infer import gradio_internals

    with gr.Blocks() as demo:
        gr.Markdown("x")
    gradio_internals.check(demo)  # the Gradio this project is tested with
    changed = types.SimpleNamespace(blocks=demo.blocks)  # a release that renamed temp_file_sets
    with pytest.raises(gradio_internals.GradioMismatch,
                       match=r"this server needs gradio>=6\.31,<6\.32; gradio .* lacks Blocks.temp_file_sets: "
                             r"pip install 'gradio>=6\.31,<6\.32'"):
        gradio_internals.check(changed)
    # Mounted, the app has the stop event that ends the page and gradio_client heartbeat streams.
    from fastapi import FastAPI

    mounted = gr.mount_gradio_app(FastAPI(), demo, path="/")
    gradio_internals.check_mounted(mounted)
    with pytest.raises(gradio_internals.GradioMismatch, match=r"lacks App\.stop_event"):
        gradio_internals.check_mounted(FastAPI())


def test_the_file_sweep_goes_on_while_requests_add_files(tmp_path):
    # Gradio's own sweep dies for good when a request adds a file while it walks the set; ours must not.
    import gradio as gr

    from flux_infer.web import sweep_files

    with gr.Blocks() as demo:
        gr.Markdown("x")
    files = demo.temp_file_sets[0]
    old = [tmp_path / f"old-{index}.png" for index in range(3000)]
    for path in old:
        path.touch()
    files.update(str(path) for path in old)
    while time.time() - old[-1].stat().st_ctime <= 0.02:  # until every old file is older than the sweep's age
        pass
    stop = threading.Event()

    def add_files():
        index = 0
        while not stop.is_set():
            path = tmp_path / f"new-{index}.png"
            path.touch()
            files.add(str(path))
            index += 1

    adder = threading.Thread(target=add_files)
    adder.start()
    try:
        deleted = sweep_files(demo, age=0.02)
    finally:
        stop.set()
        adder.join()
    assert deleted >= len(old)
    assert not any(path.exists() for path in old)
    assert all(Path(name).exists() for name in files)
    left = len(files)
    assert left > 0 and sweep_files(demo, age=None) == left
    assert not files and not list(tmp_path.iterdir())


# -- soak, then SIGTERM: one server, which the last test of this module stops ---------------------

KEEP_S = 3


@pytest.fixture(scope="module")
def soak_server(tiny_dir, tmp_path_factory):
    """A server whose temporary images live KEEP_S seconds, saving every image to `saved`, with its
    temporary folders (Gradio's and the system's) in its workdir: the soak runs on it, then the
    SIGTERM test drains and ends it."""
    from dockerfile_parse import DockerfileParser

    workdir = tmp_path_factory.mktemp("soak")
    temp, scratch, saved = workdir / "gradio-tmp", workdir / "tmp", workdir / "saved"
    scratch.mkdir()
    # glibc's malloc arenas as the Docker image sets them: with its default (up to eight per core) the
    # RSS of a server that holds no more memory still creeps up in bursts of tens of MiB.
    arenas = DockerfileParser(str(Path(__file__).parents[1] / "Dockerfile")).envs["MALLOC_ARENA_MAX"]
    srv = Server(["--model", str(tiny_dir), "--preview", "none", "--keep-outputs", str(KEEP_S),
                  "--output-dir", str(saved)], workdir,
                 env={"GRADIO_TEMP_DIR": str(temp), "TMPDIR": str(scratch), "MALLOC_ARENA_MAX": arenas})
    srv.saved, srv.scratch = saved, scratch
    srv.temporary_files = lambda: files_under(temp, scratch)
    yield srv
    srv.stop()


@pytest.mark.e2e
def test_soak_300_requests_memory_and_temp_files_stay_bounded(soak_server):
    import psutil
    from openai import OpenAI

    srv, keep = soak_server, KEEP_S
    def one(index, client, api):
        if index % 10 == 9:  # every tenth through the OpenAI route, as a url file
            response = api.images.generate(prompt=f"soak {index}", size="256x256", response_format="url",
                                           extra_body={"seed": index, "num_inference_steps": 1})
            assert response.data[0].model_extra["seed"] == index and response.data[0].url
        else:
            _, seed = client.predict(f"soak {index}", index, False, 256, 256, 3.5, 1, api_name="/infer")
            assert seed == index

    process = psutil.Process(srv.process.pid)
    rss, files, finished = [], [], []
    started = time.monotonic()
    # Three callers at once, each with its own clients, so the server always has the next
    # request waiting while it generates (a soak of the queue too).
    callers = [(srv.client(), OpenAI(base_url=srv.url + "v1", api_key="not-needed", max_retries=0))
               for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(callers)) as pool:
        jobs = [pool.submit(one, index, *callers[index % len(callers)]) for index in range(300)]
        for count, job in enumerate(concurrent.futures.as_completed(jobs), 1):
            job.result()
            finished.append(time.monotonic())
            if count == 60:  # warmed up: three sessions, their threads and buffers
                baseline = process.memory_info().rss
            if count % 30 == 0:
                rss.append(process.memory_info().rss)
                # Each request leaves one temporary file, deleted `keep` s later by a sweep every `keep` s:
                # at most the requests of the last 2 * keep s (and some slack for a slow sweep) are there.
                recent = sum(1 for at in finished if at > time.monotonic() - 2 * keep - 3)
                files.append((len(srv.temporary_files()), recent))
    growth = process.memory_info().rss - baseline
    seconds = time.monotonic() - started
    print(f"soak: 300 requests in {seconds:.0f} s, RSS {baseline / 2**20:.0f} -> "
          f"{process.memory_info().rss / 2**20:.0f} MiB, (temporary files, requests in the last "
          f"{2 * keep + 3} s) per 30 requests {files}")
    assert growth < 50 * 2**20, [r // 2**20 for r in rss]
    assert all(count <= recent + 2 for count, recent in files), files
    # --output-dir keeps exactly what was asked for: an image and its settings per request, nothing else
    # (the last ones are written just after their callers got them).
    wait_for(lambda: srv.log().count(" saved ") == 300, "the last images' --output-dir files")
    assert sorted({path.suffix for path in srv.saved.iterdir()}) == [".json", ".png"]
    assert len(list(srv.saved.glob("*.png"))) == len(list(srv.saved.glob("*.json"))) == 300
    # Once requests stop, every temporary file goes within a few sweeps.
    wait_for(lambda: not srv.temporary_files(), f"the temporary files to go after the soak; {files}", timeout=30)


@pytest.mark.e2e
def test_sigterm_drains_what_runs_and_waits_at_every_door_refuses_what_comes_after_and_exits_0(soak_server):
    import openai
    from gradio_client.exceptions import AppError

    srv = soak_server  # it ends here: this test comes last in the module
    api = openai.OpenAI(base_url=srv.url + "v1", api_key="-", max_retries=0, timeout=300)
    running = srv.client().submit("running", 1, False, 1024, 1024, 3.5, 20, api_name="/infer")
    wait_for(lambda: "gradio request: 'running'" in srv.log(), "the first generation to start")
    page = srv.client().submit("waiting page", 2, False, 256, 256, 3.5, 1, api_name="/infer")
    wait_for(lambda: srv.scheduler_depth() == 1, "the page request to join the line")
    answers = {}
    waiter = threading.Thread(target=lambda: answers.update(v1=api.images.generate(
        prompt="waiting /v1", size="256x256", extra_body={"seed": 3, "num_inference_steps": 1})))
    waiter.start()
    wait_for(lambda: srv.scheduler_depth() == 2, "the /v1 request to join the line")
    srv.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "shutting down: draining" in srv.log(), "the drain to begin")
    assert "shutting down: draining 1 running and 2 waiting" in srv.log()
    # New requests at either door are refused, clearly, while the admitted ones are still served.
    refused = srv.http.post("v1/images/generations", json={"prompt": "too late", "size": "256x256"})
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    with pytest.raises(AppError, match="shutting down: try again when it is back"):
        srv.client().predict("too late", 4, False, 256, 256, 3.5, 1, api_name="/infer")
    path, seed = running.result(timeout=300)  # the generation in flight is delivered
    assert seed == 1 and Path(path).is_file()
    assert page.result(timeout=300)[1] == 2
    waiter.join(timeout=300)
    assert answers["v1"].data[0].model_extra["seed"] == 3
    assert srv.process.wait(timeout=90) == 0
    log = srv.log()
    assert "generated 1024x1024" in log and "Traceback" not in log
    assert not srv.temporary_files()  # the server's temporary images go with it,
    assert not list(srv.scratch.iterdir())  # and the folders it made for them
