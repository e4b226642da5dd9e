"""Request validation and seed handling of the core infer(), without a server."""

from __future__ import annotations

import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from conftest import FakePipeline

from flux_infer import settings
from flux_infer.inference import InvalidRequest, build_request


def test_floats_are_converted_and_sizes_floored():
    request = build_request("a", seed=12.0, randomize_seed=False, width=1000.0, height="1023",
                            guidance_scale="3", num_inference_steps=28.0)
    assert (request.seed, request.width, request.height, request.num_inference_steps) == (12, 992, 1008, 28)
    assert request.guidance_scale == 3.0 and isinstance(request.guidance_scale, float)


def test_defaults_are_the_spaces():
    request = build_request("a", randomize_seed=False)
    assert (request.seed, request.width, request.height, request.guidance_scale, request.num_inference_steps) == (
        0, 1024, 1024, 3.5, 28)


def test_randomized_seeds_cover_the_range():
    seeds = [build_request("a", seed=0, randomize_seed=True).seed for _ in range(200)]
    assert all(0 <= s <= settings.MAX_SEED for s in seeds)
    assert len(set(seeds)) == 200
    assert max(seeds) > settings.MAX_SEED // 2  # drawn from the whole range, not a small one


def test_extremes_are_accepted():
    low = build_request("a", seed=0, randomize_seed=False, width=256, height=256, guidance_scale=1,
                        num_inference_steps=1)
    high = build_request("a", seed=settings.MAX_SEED, randomize_seed=False, width=2048, height=2048,
                         guidance_scale=15, num_inference_steps=50)
    assert (low.width, high.width, high.seed) == (256, 2048, settings.MAX_SEED)


@pytest.mark.parametrize("value", [True, float("inf"), float("nan"), [3], {"v": 3}])
def test_non_numbers_are_refused(value):
    with pytest.raises(InvalidRequest, match="guidance_scale must be a number between 1 and 15"):
        build_request("a", guidance_scale=value)


def test_importing_loads_no_framework():
    code = ("import sys; import app, flux_infer, flux_infer.cli, flux_infer.web, flux_infer.loading, "
            "flux_infer.inference, flux_infer.tiny, flux_infer.images, flux_infer.previews; "
            "print(sorted(m for m in ('torch', 'gradio', 'diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert done.stdout.strip() == "[]"


def test_out_of_memory_is_a_clear_error_and_the_next_request_runs(monkeypatch):
    # A fake pipeline is enough here: what is tested is the error translation and the lock.
    import torch

    from flux_infer.inference import FluxInference, GenerationFailed

    activations = []  # a weak reference to what the failed call held when it ran out of memory

    def forward():
        hidden = torch.ones(1024)
        activations.append(weakref.ref(hidden))
        raise torch.OutOfMemoryError("CUDA out of memory")

    class Pipeline(FakePipeline):
        calls = 0

        def __call__(self, **kwargs):
            Pipeline.calls += 1
            if Pipeline.calls == 1:
                forward()
            return super().__call__(**kwargs)

    # What the allocator could give back: only blocks no tensor holds any more.
    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(activations[0]() is None))
    inference = FluxInference(Pipeline())
    with pytest.raises(GenerationFailed, match=r"out of GPU memory at 2048x2048: try a smaller size, or restart .*--memory auto"):
        inference.infer("a", width=2048, height=2048)
    # The failed call's activations were gone when the cache was emptied, though the error (and the
    # log record, with its traceback) is still held here.
    assert released == [True]
    assert inference.infer("a", width=256, height=256).image.size == (256, 256)


def test_every_generation_runs_on_one_thread_whoever_asks(caplog):
    # torch keeps some state per thread (the current CUDA device): the warm-up's thread must be every
    # request's. A fake pipeline is enough: what is tested is where it is called.
    import logging
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from flux_infer.inference import FluxInference
    from flux_infer.service import REQUEST_ID, RequestIdFilter

    class Pipeline(FakePipeline):
        threads = []

        def __call__(self, **kwargs):
            Pipeline.threads.append(threading.get_ident())
            return super().__call__(**kwargs)

    inference = FluxInference(Pipeline())
    inference.warm_up(((256, 256),), steps=2)

    def request_from_a_worker(number):
        REQUEST_ID.set(f"req-{number}")
        return inference.infer("a", width=256, height=256).image.size

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="flux_infer.inference"), ThreadPoolExecutor(3) as callers:
        assert list(callers.map(request_from_a_worker, range(6))) == [(256, 256)] * 6
    assert len(Pipeline.threads) == 7 and len(set(Pipeline.threads)) == 1
    assert Pipeline.threads[0] != threading.get_ident()  # not the caller's
    # The caller's context goes with it: each "generated" line carries its request's id.
    ids = {record.request_id for record in caplog.records if record.getMessage().startswith("generated")}
    assert ids == {f"req-{number}" for number in range(6)}


def test_the_generation_thread_works_on_the_models_gpu(monkeypatch):
    # torch starts every thread on GPU 0; with --device cuda:1 the generation thread makes GPU 1
    # its current device before its first image (diffusers' group offload waits on the current
    # device's stream). Recorded, not run: this machine has no GPU.
    import contextlib
    import threading
    from types import SimpleNamespace

    import torch

    from flux_infer import tuning
    from flux_infer.inference import FluxInference

    current = []  # (thread, device) each time a thread's current device is set
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.append((threading.get_ident(), index)))

    class Pipeline(FakePipeline):
        def __call__(self, **kwargs):  # the devices this thread made current before this image
            seen.append([index for thread, index in current if thread == threading.get_ident()])
            return super().__call__(**kwargs)

    runtime = SimpleNamespace(device="cuda:1", before=lambda request: None, after=lambda request: {},
                              call_context=lambda request: contextlib.nullcontext())
    inference = FluxInference(Pipeline(), runtime=runtime)
    inference.infer("a", width=256, height=256)
    inference.infer("b", width=256, height=256)
    assert seen == [[1], [1]]  # set once, as the thread started, on the thread that generates
    assert len(current) == 1 and current[0][0] != threading.get_ident()
    # The loading thread does the same; `cuda` is GPU 0 already, and a CPU run has no GPU to choose.
    current.clear()
    for device in ("cuda:2", "cuda", "cpu"):
        tuning.use_device(device)
    assert current == [(threading.get_ident(), 2)]


def test_a_flux_inference_let_go_ends_its_generation_thread():
    # The thread must not keep its FluxInference (and so the pipeline) alive: a script or a test that
    # makes several would hold every model until exit, and their threads would all end at once there.
    import gc
    import threading
    import weakref
    from types import SimpleNamespace

    from flux_infer.inference import FluxInference

    inference = FluxInference(FakePipeline(), runtime=SimpleNamespace(device="cpu"))
    thread = inference.on_generation_thread(threading.current_thread)
    gone = weakref.ref(inference)
    del inference
    gc.collect()
    assert gone() is None
    thread.join(timeout=60)  # the executor's thread ends once its executor is collected
    assert not thread.is_alive()


def test_each_image_says_the_most_gpu_memory_it_held(monkeypatch, caplog):
    # On a GPU each image's allocator peak (reset as it starts; the weights included) is in its result,
    # its log line and /metrics: what a user sizes --gpu-memory by. A fake allocator stands for the GPU's.
    import logging
    from types import SimpleNamespace

    import torch
    from prometheus_client.parser import text_string_to_metric_families

    from flux_infer import tuning
    from flux_infer.inference import FluxInference, build_request
    from flux_infer.service import Service

    gib = 1024**3
    allocator = SimpleNamespace(held=20 * gib, peak=0, devices=set())  # 20 GiB of weights

    def reset_peak(device):
        allocator.devices.add(device)
        allocator.peak = allocator.held

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator.peak)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)

    class Pipeline(FakePipeline):
        vae = SimpleNamespace(enable_tiling=lambda: None, disable_tiling=lambda: None)

        def __call__(self, **kwargs):  # activations of 4 KiB a pixel while it runs
            allocator.peak = max(allocator.peak, allocator.held + kwargs["width"] * kwargs["height"] * 4096)
            return super().__call__(**kwargs)

    pipeline = Pipeline()
    runtime = tuning.Runtime(pipeline, tuning.Options(vae_tiling="off"), tuning.MemoryPlan(), "cuda:1")
    service = Service(FluxInference(pipeline, runtime=runtime))
    with caplog.at_level(logging.INFO, logger="flux_infer.inference"):
        large = service.run(build_request("a", width=2048, height=2048), route="test")
        small = service.run(build_request("b", width=512, height=512), route="test")
    assert (large.gpu_peak_bytes, small.gpu_peak_bytes) == (36 * gib, 21 * gib)  # the second's own, not the first's
    assert allocator.devices == {"cuda:1"}
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("generated")]
    assert [line.split(", GPU memory peak ")[1] for line in lines] == ["36.0 GiB", "21.0 GiB"]
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(service.metrics.render()[0].decode())
               for sample in family.samples}
    assert samples["flux_gpu_memory_peak_bytes"] == 21 * gib


def test_an_interrupted_caller_stops_the_generation_at_the_end_of_its_step(tiny_dir):
    # Ctrl-C reaches the main thread, which waits while the generation thread denoises: the
    # interrupt goes on up (the CLI exits with 130), and the generation stops after its step
    # instead of running on to its last one while the process tries to exit.
    import signal
    import threading

    from flux_infer.inference import FluxInference, GenerationCancelled
    from flux_infer.loading import load_pipeline

    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    inference = FluxInference(pipeline)
    cancel, interrupted = threading.Event(), threading.Event()
    steps = []

    def on_step(step):  # on the generation thread
        steps.append(step.index)
        if step.index == 1:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            interrupted.wait()  # the first step ends once the caller has had its interrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            inference.run(build_request("a", width=256, height=256, num_inference_steps=20), on_step=on_step,
                          cancel=cancel)
    finally:
        interrupted.set()  # whatever happened, the generation thread goes on
    assert cancel.is_set()
    # The interrupted generation ends as the next one waits its turn on the same thread.
    assert inference.infer("a", width=256, height=256, num_inference_steps=2).image.size == (256, 256)
    assert steps == [1]
    with pytest.raises(GenerationCancelled):  # the same stop, seen by a caller who waits
        inference.run(build_request("a", width=256, height=256, num_inference_steps=2), cancel=cancel)


def test_a_prompt_asked_again_skips_the_text_encoders_and_gives_the_same_pixels(tiny_dir):
    import numpy as np

    from flux_infer.inference import FluxInference
    from flux_infer.loading import load_pipeline

    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    encoded = []
    for name in ("text_encoder", "text_encoder_2"):  # CLIP, T5
        getattr(pipeline, name).register_forward_hook(lambda *_, name=name: encoded.append(name))
    inference = FluxInference(pipeline)
    small = dict(randomize_seed=False, width=256, height=256, num_inference_steps=2)

    first = inference.infer("a red fox", seed=1, **small)
    assert sorted(encoded) == ["text_encoder", "text_encoder_2"]
    again = inference.infer("a red fox", seed=2, **small)  # a new seed: the same prompt
    assert len(encoded) == 2
    inference.infer("a blue fox", seed=2, **small)
    assert len(encoded) == 4
    # The pixels of a cold start (the pipeline's own encoding), for both images.
    fresh, _ = load_pipeline(str(tiny_dir), device="cpu")[:2]
    for result, seed in ((first, 1), (again, 2)):
        direct = FluxInference(fresh).infer("a red fox", seed=seed, **small)
        np.testing.assert_array_equal(np.asarray(result.image), np.asarray(direct.image))
    # At most settings.PROMPT_CACHE_SIZE are kept, the least recently used dropped first.
    for number in range(settings.PROMPT_CACHE_SIZE):
        inference.infer(f"fox number {number}", seed=0, **small)
    encoded.clear()
    inference.infer(f"fox number {settings.PROMPT_CACHE_SIZE - 1}", seed=0, **small)
    assert encoded == []
    inference.infer("a red fox", seed=3, **small)
    assert len(encoded) == 2
