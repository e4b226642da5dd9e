"""Memory and speed options on the tiny model: real diffusers, torchao, gguf and torch.compile on the CPU."""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import pytest
from conftest import ReplayedOnCPU

from flux_infer import tuning
from flux_infer.inference import FluxInference, GenerationCancelled, build_request
from flux_infer.loading import load_pipeline
from flux_infer.tuning import MemoryPlan, OptionError, Options, parse_cache, parse_sizes, plan_memory

SMALL = dict(width=256, height=256, num_inference_steps=6)
CUDA_CONTEXT_GIB = 0.6  # what a CUDA context takes before anything is loaded


def generate(tiny_dir, options=None, prompt="a lighthouse at dusk", seed=7, model=None, **size):
    base = str(tiny_dir) if model else None  # a single-file transformer's other components
    pipeline, _, _, runtime, _ = load_pipeline(model or str(tiny_dir), base_model=base, device="cpu",
                                            options=options or Options())
    inference = FluxInference(pipeline, runtime=runtime)
    return inference, inference.infer(prompt, seed=seed, randomize_seed=False, **{**SMALL, **size})


def pixels(result):
    return np.asarray(result.image).astype(np.int16)


@pytest.fixture(autouse=True)
def restored_recompile_limit():
    """torch.compile's recompile limit as it was before each test (tuning raises it for the process)."""
    import torch

    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):
        yield


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """No options at all: the plain pipeline's image."""
    return generate(tiny_dir, Options(fuse_qkv=False))[1]


# -- --memory auto ---------------------------------------------------------------------------------

@pytest.mark.parametrize("card_gib, expected", [
    (80, MemoryPlan("none", "none", False)),
    (40, MemoryPlan("none", "none", False)),
    (24, MemoryPlan("none", "fp8", True)),
    # The transformer stays on the GPU and T5 streams in (a fraction of a second per new prompt)
    # before model offload, which moves the transformer for every image (22 s of 30 on an H200).
    (16, MemoryPlan("t5", "fp8", False)),
    (12, MemoryPlan("t5", "nf4", False)),
    (10, MemoryPlan("model", "nf4", True)),
    # The transformer's blocks streamed in at every step: float8 storage copies half bf16's bytes.
    (8, MemoryPlan("group", "fp8-storage", False)),
])
def test_memory_auto_picks_the_fastest_that_fits(card_gib, expected):
    plan = plan_memory(card_gib - CUDA_CONTEXT_GIB, fp8=True, nf4=True, where="a test GPU")
    assert (plan.offload, plan.quantize, plan.quantize_text_encoder) == (
        expected.offload, expected.quantize, expected.quantize_text_encoder)
    needs = tuning.estimate_gib(plan.offload, plan.quantize, plan.quantize_text_encoder)
    assert needs + tuning.HEADROOM_GIB <= card_gib - CUDA_CONTEXT_GIB
    assert f"{card_gib - CUDA_CONTEXT_GIB:.1f} GiB free on a test GPU" in plan.reason
    if card_gib < 40:  # it says what the faster choices it passed over would need
        assert "faster choices need transformer unquantized, offload none ~" in plan.reason


def test_memory_auto_without_fp8_or_bitsandbytes():
    assert plan_memory(23.4, fp8=False).quantize == "int8"  # e.g. an RTX 3090: torchao int8 instead
    assert plan_memory(11.4, nf4=False).offload == "group"  # no bitsandbytes: stream the blocks
    # where fp8-storage cannot be used (--compile, LoRAs per request), they stream in bf16
    assert (plan_memory(7.4).quantize, plan_memory(7.4, storage=False).quantize) == ("fp8-storage", "none")
    assert (plan_memory(13.8, nf4=False).offload, plan_memory(13.8, nf4=False).quantize) == ("model", "fp8")
    lean = plan_memory(2.0)
    assert lean.offload == "sequential" and "may not fit" in lean.reason


def test_memory_auto_with_a_gguf_transformer():
    q4 = 6.8  # flux1-dev-Q4_K_S.gguf
    plans = {free: plan_memory(free, gguf_gib=q4) for free in (23.4, 17.4, 12.4, 10.0, 7.4)}
    summary = {free: (p.offload, p.quantize, p.quantize_text_encoder) for free, p in plans.items()}
    assert summary == {23.4: ("none", "none", False),  # the GGUF transformer and T5 both resident
                       17.4: ("none", "fp8", True),  # T5 quantized to make room
                       12.4: ("t5", "none", False),  # T5 streamed in
                       10.0: ("model", "none", False),
                       7.4: ("group", "none", False)}


def test_memory_auto_on_a_cpu_changes_nothing():
    from flux_infer.loading import resolve_placement

    plan = tuning.resolve_plan(Options(), resolve_placement("cpu"))
    assert (plan.offload, plan.quantize) == ("none", "none")
    assert "nothing is offloaded or quantized" in plan.reason


@pytest.mark.parametrize("options, message", [
    (Options(offload="model"), "--offload model moves weights between a GPU and the CPU: it needs a CUDA GPU"),
    (Options(offload="group"), "needs a CUDA GPU"),
    (Options(offload="sequential"), "needs a CUDA GPU"),
    (Options(offload="t5"), "needs a CUDA GPU"),
    (Options(quantize="nf4"), "--quantize nf4 (bitsandbytes) needs a CUDA GPU; on a CPU use int8"),
])
def test_cuda_only_options_fail_clearly_on_a_cpu(options, message):
    from flux_infer.loading import resolve_placement

    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tuning.resolve_plan(options, resolve_placement("cpu"))


def test_option_values_are_checked():
    with pytest.raises(OptionError,
                       match="--quantize must be one of none, fp8-storage, int8, fp8, fp8-row, nf4, got 'q3'"):
        Options(quantize="q3")
    assert parse_cache("fbcache") == tuning.CacheSpec("fbcache", 0.05)
    assert parse_cache("magcache:0.1") == tuning.CacheSpec("magcache", 0.1)
    assert parse_cache("taylorseer:3") == tuning.CacheSpec("taylorseer", 3)
    assert parse_cache("none") is None
    with pytest.raises(OptionError, match="--compile-mode must be one of default, max-autotune-no-cudagraphs, "
                       "max-autotune, reduce-overhead, got 'fastest'"):
        Options(compile=True, compile_mode="fastest")
    with pytest.raises(OptionError, match="--compile-mode reduce-overhead says how to compile: add --compile"):
        Options(compile_mode="reduce-overhead")
    assert parse_sizes("1024x1024, 768X1344") == ((1024, 1024), (768, 1344))
    with pytest.raises(OptionError, match="--compile-sizes takes WIDTHxHEIGHT.*got '1024'"):
        parse_sizes("1024x1024,1024")
    # A size no request may ask for would fail the warm-up after the weights load, in build_request's words.
    with pytest.raises(OptionError, match="--compile-sizes 3x3: a width between 256 and 2048, as requests may ask for"):
        parse_sizes("3x3")
    with pytest.raises(OptionError, match="--compile-sizes 1024x4096: a height between 256 and 2048"):
        parse_sizes("1024x1024,1024x4096")
    with pytest.raises(OptionError, match="--compile-sizes says which sizes --compile warms up: add --compile"):
        Options(compile_sizes=((768, 768),))
    # Combinations that broke on the first image (found on the tiny model) are refused at start-up.
    with pytest.raises(OptionError, match="--compile cannot trace fp8-storage's per-layer casts: use --quantize fp8"):
        Options(compile=True, quantize="fp8-storage")
    with pytest.raises(OptionError, match="--compile-mode reduce-overhead replays the transformer from CUDA graphs"
                                          ".*with --cache, use --compile-mode default or max-autotune-no"):
        Options(compile=True, compile_mode="reduce-overhead", cache=parse_cache("fbcache"))
    from flux_infer.loading import Placement, resolve_placement

    with pytest.raises(OptionError, match=r"--compile-mode max-autotune records CUDA graphs over weights that stay "
                                          r"on the GPU, and this plan offloads them \(offload model: as asked\)"):
        tuning.resolve_plan(Options(offload="model", compile=True, compile_mode="max-autotune"),
                            Placement("cuda", "bfloat16", "a test GPU"))
    # The transformer stays on the GPU with T5 streamed in: CUDA graphs keep their weights' addresses.
    cuda_graphs_t5 = Options(offload="t5", compile=True, compile_mode="reduce-overhead")
    assert tuning.resolve_plan(cuda_graphs_t5, Placement("cuda", "bfloat16", "a test GPU")).offload == "t5"
    with pytest.raises(OptionError, match=r"--offload t5 streams T5's bf16 weights to the GPU as it runs: leave "
                                          "--quantize-text-encoder out"):
        tuning.resolve_plan(Options(offload="t5", quantize="fp8", quantize_text_encoder=True),
                            Placement("cuda", "bfloat16", "a test GPU"))
    with pytest.raises(OptionError, match=r"--quantize-text-encoder cannot store T5 in float8 \(fp8-storage\).*use "
                                          "--quantize fp8 or int8"):
        tuning.resolve_plan(Options(quantize="fp8-storage", quantize_text_encoder=True), resolve_placement("cpu"))
    for bad, message in [("teacache", "--cache must be none or one of fbcache, taylorseer, magcache"),
                         ("fbcache:x", "needs a number after the colon"), ("fbcache:-1", "must be 0 or more"),
                         ("taylorseer:0.5", "whole refresh interval")]:
        with pytest.raises(OptionError, match=message):
            parse_cache(bad)


def test_what_is_generated_at_start_up():
    # Served on a GPU that keeps the transformer, one short image takes the first request's one-time
    # costs; with --compile, every graph is compiled first (on a CPU too); nothing else.
    def runtime(plan=MemoryPlan(), device="cuda", **options):
        return tuning.Runtime(None, Options(**options), plan, device)

    default_size = (((1024, 1024),), 2, 1)
    assert runtime().start_up_images(serving=True) == default_size
    assert runtime(MemoryPlan(offload="t5", quantize="nf4")).start_up_images(serving=True) == default_size
    assert runtime().start_up_images(serving=False) is None  # `generate`: its one image pays them anyway
    assert runtime(MemoryPlan(offload="model")).start_up_images(serving=True) is None  # would move the weights
    assert runtime(device="cpu").start_up_images(serving=True) is None
    compiled = runtime(device="cpu", compile=True, compile_sizes=((512, 512),))
    assert compiled.start_up_images(serving=False) == (((512, 512),), 2, 1)


# -- speed: fused QKV, caches, compile, attention --------------------------------------------------

def test_fused_qkv_is_lossless(tiny_dir, reference):
    inference, result = generate(tiny_dir, Options(fuse_qkv=True))
    assert inference.pipeline.transformer.transformer_blocks[0].attn.fused_projections
    np.testing.assert_array_equal(pixels(result), pixels(reference))


def test_cache_with_threshold_zero_equals_no_cache(tiny_dir, reference):
    _, result = generate(tiny_dir, Options(cache=parse_cache("fbcache:0")))
    np.testing.assert_array_equal(pixels(result), pixels(reference))
    assert result.cached_steps == 0


@pytest.mark.parametrize("spec", ["fbcache:1.0", "taylorseer:3", "magcache:0.5"])
def test_a_cache_skips_transformer_passes_and_says_how_many(tiny_dir, reference, spec, caplog):
    # A random tiny model's first block changes 0.2-0.6 per step: only a high threshold skips.
    with caplog.at_level(logging.INFO, logger="flux_infer.tuning"):
        inference, result = generate(tiny_dir, Options(cache=parse_cache(spec)))
    steps = SMALL["num_inference_steps"]
    assert 0 < result.cached_steps < steps
    assert f"ran the full transformer on {steps - result.cached_steps} of {steps} steps, " \
           f"skipped {result.cached_steps}" in caplog.text
    # Same seed, same options, same image: the cache's state starts afresh with every image, also
    # after one cancelled half way (diffusers resets it at the end of a finished call only).
    cancel = threading.Event()
    with pytest.raises(GenerationCancelled):
        inference.run(build_request("a storm at sea", seed=9, randomize_seed=False, **SMALL),
                      on_step=lambda step: step.index >= 3 and cancel.set(), cancel=cancel)
    again = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
    np.testing.assert_array_equal(pixels(again), pixels(result))
    assert again.cached_steps == result.cached_steps
    # The counter counts real passes: without the cache the same model runs all of them.
    inference.pipeline.transformer.disable_cache()
    plain = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
    assert plain.cached_steps == 0
    assert np.abs(pixels(result) - pixels(reference)).max() > 0  # skipping changes the pixels a little


def test_magcache_follows_the_step_count(tiny_dir):
    inference, first = generate(tiny_dir, Options(cache=parse_cache("magcache:0.5")))
    again = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, width=256, height=256,
                            num_inference_steps=12)
    assert 0 < again.cached_steps < 12


@pytest.mark.e2e  # compiles the tiny transformer (about 10 s on 2 cores)
def test_compile_equals_eager_and_does_not_recompile_for_new_prompts_or_seeds(tiny_dir, reference):
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # blocks compiled by earlier tests share these code objects
    before = counters["stats"]["unique_graphs"]
    # Each kind of block compiles once: the single blocks after the first get inputs sliced from one
    # tensor, whose strides would otherwise differ from the first's and compile the block again.
    with torch._dynamo.config.patch(error_on_recompile=True):
        inference, compiled = generate(tiny_dir, Options(compile=True, fuse_qkv=False))
    assert np.abs(pixels(compiled) - pixels(reference)).max() <= 2  # of 255: float rounding only
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 3  # the double block, the single block and the VAE decoder
    inference.infer("a different prompt entirely", seed=99, randomize_seed=False, guidance_scale=5, **SMALL)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.e2e  # compiles the tiny transformer's blocks
def test_a_cuda_graph_mode_replays_the_compiled_blocks_from_one_graph_per_size(tiny_dir, reference):
    # The blocks compile as in the default mode (inductor's own CUDA graphs cannot chain them), and
    # the whole forward is one CUDA graph per size: here a CPU stand-in with a graph's contract (a
    # replay reads the tensors captured, and writes the same outputs), so that an input not copied
    # in, or an output handed out and overwritten at the next step, shows in the image.
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    pipeline, _, _, runtime, _ = load_pipeline(str(tiny_dir), device="cpu", options=Options(
        compile=True, compile_mode="reduce-overhead", fuse_qkv=False))
    transformer = pipeline.transformer
    transformer.forward = graphed = ReplayedOnCPU(transformer.forward)
    inference = FluxInference(pipeline, runtime=runtime)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
        assert np.abs(pixels(compiled) - pixels(reference)).max() <= 2  # of 255: float rounding only
        assert counters["stats"]["unique_graphs"] - before == 3  # the double block, the single block, the decoder
        assert graphed.recorded == 1
        # An edit of the same size runs the same graph; a new size records its own.
        request = build_request("a different prompt entirely", seed=99, randomize_seed=False, guidance_scale=5,
                                **SMALL)
        inference.run(dataclasses.replace(request, image=compiled.image, strength=0.5))
        assert graphed.recorded == 1
    inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, width=320, height=256,
                    num_inference_steps=2)
    assert graphed.recorded == 2
    # Warmed up so that the first request records nothing: the first step records, the second replays.
    assert Options(compile=True, compile_mode="reduce-overhead").warm_up_runs() == (2, 1)


@pytest.mark.e2e  # compiles the tiny transformer, at three sizes
def test_compile_with_taylorseer_stays_compiled_at_new_sizes(tiny_dir):
    # TaylorSeer hooks every attention layer; diffusers' hook functions are shared by all of them and
    # recompile per kind of layer and per size: torch's limit of 8 was reached at the first new size,
    # after which they ran uncompiled.
    import torch

    options = Options(compile=True, cache=parse_cache("taylorseer:3"), fuse_qkv=False)
    inference, _ = generate(tiny_dir, options, width=256, height=256, num_inference_steps=6)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for width, height in ((320, 256), (256, 320)):
            result = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, width=width, height=height,
                                     num_inference_steps=6)
            assert 0 < result.cached_steps < 6


@pytest.mark.e2e  # compiles the tiny transformer (about 10 s on 2 cores)
def test_compile_with_a_cache_counts_skips_without_recompiling(tiny_dir):
    from torch._dynamo.utils import counters

    size = dict(width=256, height=256, num_inference_steps=12)
    options = Options(compile=True, cache=parse_cache("fbcache:0.5"))
    inference, first = generate(tiny_dir, options, **size)
    steps, images = options.warm_up_runs()
    inference.warm_up([(size["width"], size["height"])], steps=steps, images=images)
    graphs = counters["stats"]["unique_graphs"]
    results = [inference.infer(f"prompt {seed}", seed=seed, randomize_seed=False, **size) for seed in range(3)]
    assert counters["stats"]["unique_graphs"] == graphs
    # Every image runs the full transformer on some steps and skips others, and the count says so
    # (a counter that compiled code never called would report all 12 as skipped).
    assert all(0 < result.cached_steps < size["num_inference_steps"] for result in [first, *results]), [
        result.cached_steps for result in [first, *results]]


def test_attention_backend_choice(tiny_dir, reference):
    _, result = generate(tiny_dir, Options(attention="native", fuse_qkv=False))
    np.testing.assert_array_equal(pixels(result), pixels(reference))
    with pytest.raises(OptionError, match="attention backend flash cannot run on cpu in float32: .*flash-attn"):
        generate(tiny_dir, Options(attention="flash"))
    # Installed (it is torch's) but not for a CPU: refused at start-up, not at every request.
    with pytest.raises(OptionError, match="attention backend _native_cudnn cannot run on cpu in float32: "
                                          ".*leave --attention out"):
        generate(tiny_dir, Options(attention="_native_cudnn"))
    # ...and the refusal leaves the process's attention as it was (diffusers keeps a process-wide one).
    _, result = generate(tiny_dir, Options(fuse_qkv=False))
    np.testing.assert_array_equal(pixels(result), pixels(reference))
    with pytest.raises(OptionError, match="--attention must be one of .*native.*or cudnn-fp8, got 'fastest'"):
        Options(attention="fastest")


# -- memory: quantization, GGUF, VAE tiling --------------------------------------------------------

@pytest.mark.parametrize("quantize", ["int8", "fp8", "fp8-row", "fp8-storage"])
def test_quantized_transformer_generates_close_to_full_precision(tiny_dir, reference, quantize):
    import torch._inductor.config as inductor

    with inductor.patch(coordinate_descent_tuning=False):
        inference, result = generate(tiny_dir, Options(quantize=quantize))
        # torchao's quantize_ would switch on kernel tuning for every later compile in the process:
        # --compile-mode decides that (tests/test_tuning.py::test_the_compile_mode_reaches_every_compiled_part).
        assert not inductor.coordinate_descent_tuning
    difference = np.abs(pixels(result) - pixels(reference))
    assert result.image.size == (256, 256)
    assert 0 < difference.mean() < 12, f"{quantize}: mean difference {difference.mean():.2f} of 255"
    if quantize != "fp8-storage":  # torchao swapped the weights for quantized tensors
        from torchao.utils import TorchAOBaseTensor

        weight = inference.pipeline.transformer.transformer_blocks[0].ff.net[2].weight
        assert isinstance(weight, TorchAOBaseTensor), type(weight)


def test_fp8_scales_activations_per_tensor_or_per_row_where_float8_matmuls_run(monkeypatch):
    # On a GPU with float8 matmuls (compute capability 8.9+), fp8 and fp8-row quantize activations as
    # well as weights, with one scale per tensor or one per row; elsewhere (a CPU) both store float8
    # weights and compute in the dtype.
    import torch
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow,
                                      PerTensor)

    from flux_infer.loading import Placement, resolve_placement

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = Placement("cuda", "bfloat16", "a test GPU")
    for quantize, granularity in (("fp8", PerTensor()), ("fp8-row", PerRow())):
        config = tuning.torchao_config(quantize, gpu)
        assert isinstance(config, Float8DynamicActivationFloat8WeightConfig)
        assert config.granularity == [granularity, granularity]
        assert type(tuning.torchao_config(quantize, resolve_placement("cpu"))) is Float8WeightOnlyConfig
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert type(tuning.torchao_config("fp8-row", gpu)) is Float8WeightOnlyConfig


def test_t5_is_quantized_when_asked(tiny_dir, reference):
    inference, result = generate(tiny_dir, Options(quantize="int8", quantize_text_encoder=True))
    from torchao.utils import TorchAOBaseTensor

    weight = inference.pipeline.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight
    assert isinstance(weight, TorchAOBaseTensor), type(weight)
    assert np.abs(pixels(result) - pixels(reference)).mean() < 12


def write_gguf(tiny_dir, path):
    """The tiny transformer as a GGUF file: Q8_0 where a row fills whole 32-value blocks, F32 elsewhere."""
    import gguf
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    writer = gguf.GGUFWriter(str(path), arch="flux")
    quantized = 0
    for name, tensor in transformer.state_dict().items():
        array = tensor.float().numpy()
        if array.ndim == 2 and array.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def test_gguf_transformer_loads_and_generates(tmp_path, tiny_dir, reference):
    checkpoint = tmp_path / "flux1-tiny-Q8_0.gguf"
    assert write_gguf(tiny_dir, checkpoint) > 10
    inference, result = generate(tiny_dir, model=str(checkpoint))
    weight = inference.pipeline.transformer.transformer_blocks[0].ff.net[2].weight
    assert type(weight).__name__ == "GGUFParameter" and weight.quant_type.name == "Q8_0"
    assert 0 < np.abs(pixels(result) - pixels(reference)).mean() < 12


def test_vae_tiling_auto_follows_free_memory(tiny_dir, reference, monkeypatch, caplog):
    inference, untiled = generate(tiny_dir)
    assert not inference.pipeline.vae.use_tiling
    np.testing.assert_array_equal(pixels(untiled), pixels(reference))
    # 1 MiB free: the decode cannot fit
    monkeypatch.setattr(tuning, "free_bytes", lambda device, gpu_memory=None, kept=0: 1024**2)
    with caplog.at_level(logging.INFO, logger="flux_infer.tuning"):
        tiled = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
    assert inference.pipeline.vae.use_tiling
    assert "VAE tiling on for 256x256" in caplog.text
    # The tiny VAE's 32 px tiles over noise-like latents differ pixel by pixel; the picture overall does not.
    assert tiled.image.size == (256, 256)
    assert np.abs(pixels(tiled) - pixels(reference)).max() > 0
    assert abs(pixels(tiled).mean() - pixels(reference).mean()) < 8


@pytest.fixture
def offload_on_the_cpu(monkeypatch):
    """Group offloading with the CPU standing in for the GPU: Runtime's offloading without a copy
    stream, which a CPU has not."""
    import functools

    monkeypatch.setattr(tuning, "group_offload", functools.partial(tuning.group_offload, use_stream=False))


def _offload_groups(model) -> list[list]:
    """The module groups diffusers' group offloading moves together, read from its hooks."""
    from diffusers.hooks import HookRegistry

    groups = {}
    for module in model.modules():
        hook = HookRegistry.check_if_exists_or_initialize(module).get_hook("group_offloading")
        if hook is not None:
            groups[id(hook.group)] = hook.group.modules
    return list(groups.values())


def test_group_offload_moves_t5_one_block_at_a_time(tiny_dir, reference):
    # diffusers groups a component's ModuleList children; T5's blocks are one level down, and
    # without being told, all of T5 (9 GB in FLUX.1-dev) was one group: out of memory at 8 GiB.
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    tuning.group_offload(pipe, torch.device("cpu"), use_stream=False)  # the CPU stands in for the GPU
    t5 = pipe.text_encoder_2
    groups = _offload_groups(t5)
    assert all([block] in groups for block in t5.encoder.block)
    total = sum(p.numel() for p in t5.parameters())
    largest = max(sum(p.numel() for m in group for p in m.parameters()) for group in groups)
    assert largest < total / 2
    assert all([block] in _offload_groups(pipe.transformer) for block in pipe.transformer.transformer_blocks)
    offloaded = FluxInference(pipe).infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
    np.testing.assert_array_equal(pixels(offloaded), pixels(reference))


class _NoStream:
    """A copy stream that does nothing, standing in for CUDA's."""

    def synchronize(self):
        pass


@pytest.fixture
def streams_on_the_cpu(monkeypatch):
    """diffusers' group offloading with a copy stream, set up on a CPU: its GPU backend replaced by
    the CPU's with a stream that does nothing, pinning left out. Enough to set the hooks up as on a
    GPU (diffusers adds its prefetch hooks only with a stream); not to run them."""
    import torch
    from diffusers.hooks import group_offloading
    from diffusers.utils.torch_utils import TorchDeviceBackend

    class CpuBackend(TorchDeviceBackend):
        Stream = _NoStream

        def __init__(self, device=None):
            super().__init__("cpu")

        @staticmethod
        def current_stream():
            return _NoStream()

    monkeypatch.setattr(group_offloading, "TorchDeviceBackend", CpuBackend)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args, **kwargs: tensor)


def test_group_offload_with_a_copy_stream_sets_up_t5_and_the_transformer(tiny_dir, streams_on_the_cpu):
    # With a stream (on every GPU), diffusers adds a prefetch hook to each offloaded module; T5
    # offloaded with block_modules=["encoder"] got two, nested, which failed on the same blocks
    # ("Hook with name layer_execution_tracker already exists"): every --gpu-memory cap of 16 GiB
    # and under, on the first H100 run that reached them.
    import torch
    from diffusers import FluxPipeline
    from diffusers.hooks import HookRegistry

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    tuning.group_offload(pipe, torch.device("cuda"))
    t5 = pipe.text_encoder_2
    assert all([block] in _offload_groups(t5) for block in t5.encoder.block)
    assert all([block] in _offload_groups(pipe.transformer) for block in pipe.transformer.transformer_blocks)
    prefetching = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
                   and any(HookRegistry.check_if_exists_or_initialize(sub).get_hook("lazy_prefetch_group_offloading")
                           for sub in module.modules())]
    assert {"transformer", "text_encoder_2"} <= set(prefetching)


def test_group_offload_streams_fp8_storage_weights_as_they_are_stored(tiny_dir, offload_on_the_cpu):
    # --memory auto's plan for 8 GiB: the transformer's blocks, stored in float8, copied in as they
    # run and cast there; the same pixels as fp8-storage without offloading.
    import torch
    from diffusers import FluxPipeline

    from flux_infer.loading import resolve_placement

    images = {}
    for offload in ("none", "group"):
        pipe = FluxPipeline.from_pretrained(tiny_dir)
        runtime = tuning.Runtime(pipe, Options(fuse_qkv=False), MemoryPlan(offload, "fp8-storage"), "cpu")
        runtime.apply(resolve_placement("cpu"))
        images[offload] = FluxInference(pipe, runtime=runtime).infer("a lighthouse at dusk", seed=7,
                                                                     randomize_seed=False, **SMALL)
    blocks = pipe.transformer.transformer_blocks
    assert all([block] in _offload_groups(pipe.transformer) for block in blocks)
    assert blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn  # stored in float8 between its runs
    np.testing.assert_array_equal(pixels(images["group"]), pixels(images["none"]))


def test_offload_t5_streams_t5_alone_and_keeps_the_rest_in_place(tiny_dir, reference, offload_on_the_cpu):
    # --offload t5: T5 in groups of one block, the transformer, CLIP and the VAE with no offloading
    # hooks (placed once); the same pixels.
    from diffusers import FluxPipeline

    from flux_infer.loading import resolve_placement

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    runtime = tuning.Runtime(pipe, Options(fuse_qkv=False), MemoryPlan(offload="t5"), "cpu")
    runtime.apply(resolve_placement("cpu"))
    t5 = pipe.text_encoder_2
    assert all([block] in _offload_groups(t5) for block in t5.encoder.block)
    assert [_offload_groups(pipe.components[name]) for name in ("transformer", "text_encoder", "vae")] == [[], [], []]
    assert [tuning.in_ram(runtime.plan, name) for name in ("transformer", "text_encoder_2")] == [False, True]
    result = FluxInference(pipe, runtime=runtime).infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
    np.testing.assert_array_equal(pixels(result), pixels(reference))


@pytest.mark.e2e  # compiles the tiny transformer
def test_compile_runs_with_group_offloading(tiny_dir, reference, offload_on_the_cpu):
    # Group offloading onloads a block's weights in a hook inside the block, which torch.compile runs
    # outside its graph: compiled whole (fullgraph), the first image failed.
    import torch
    from diffusers import FluxPipeline

    from flux_infer.loading import resolve_placement

    torch._dynamo.reset()
    pipe = FluxPipeline.from_pretrained(tiny_dir)
    runtime = tuning.Runtime(pipe, Options(compile=True, fuse_qkv=False), MemoryPlan(offload="group"), "cpu")
    runtime.apply(resolve_placement("cpu"))
    assert all([block] in _offload_groups(pipe.transformer) for block in pipe.transformer.transformer_blocks)
    inference = FluxInference(pipe, runtime=runtime)
    compiled = inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL)
    assert np.abs(pixels(compiled) - pixels(reference)).max() <= 2
    # The offloading hooks' functions, shared by every kind of offloaded module, compile again for each
    # new size: within the limit set for them, where torch's own 8 was reached at the second size.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for width, height in ((320, 256), (256, 320), (384, 384)):
            inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, width=width, height=height,
                            num_inference_steps=2)


@pytest.mark.parametrize("mode, cache", [("max-autotune-no-cudagraphs", None),
                                         ("max-autotune-no-cudagraphs", "fbcache:0.5"), ("reduce-overhead", None)])
def test_the_compile_mode_reaches_every_compiled_part(tiny_dir, monkeypatch, mode, cache):
    import torch

    compiled = []

    def compile_spy(model=None, **kwargs):  # records the call; leaves the code eager (nothing compiled)
        compiled.append((getattr(model, "__self__", model), kwargs.get("mode")))
        return model

    monkeypatch.setattr(torch, "compile", compile_spy)
    options = Options(compile=True, compile_mode=mode, cache=parse_cache(cache) if cache else None)
    pipe = load_pipeline(str(tiny_dir), device="cpu", options=options).pipeline
    transformer = pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    # CUDA graph modes compile as the mode without inductor's CUDA graphs (the graphs are the project's).
    assert {mode_given for _, mode_given in compiled} == {None if mode == "reduce-overhead" else mode}
    # Every block (with a cache, all but the last, which holds the step counter's hook), and the decoder.
    assert [part for part, _ in compiled] == [*blocks[:len(blocks) - (cache is not None)], pipe.vae.decoder]


def test_cli_reports_option_errors(tiny_dir, capsys):
    from flux_infer.cli import main

    assert main(["generate", "x", "--model", str(tiny_dir), "--device", "cpu", "--offload", "model"]) == 2
    assert "flux-infer: error: --offload model moves weights between a GPU and the CPU" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tiny_dir), "--compile-mode", "max-autotune"]) == 2
    assert ("flux-infer: error: --compile-mode max-autotune says how to compile: add --compile"
            in capsys.readouterr().err)
    # A misspelt backend or an unusable size is said before the weights load (a model that is not
    # there would otherwise be the error), not after a minute of loading FLUX.1-dev.
    missing = str(tiny_dir / "not-a-model")
    assert main(["generate", "x", "--model", missing, "--attention", "flash3"]) == 2
    assert "flux-infer: error: --attention must be one of flash, " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", missing, "--compile", "--compile-sizes", "1024x100"])
    assert exit_info.value.code == 2
    assert "--compile-sizes 1024x100: a height between 256 and 2048" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--cache", "teacache"])
    assert exit_info.value.code == 2
    assert "--cache must be none or one of fbcache, taylorseer, magcache" in capsys.readouterr().err


def test_a_compile_failure_is_said_in_torchs_own_words():
    import torch
    import torch._dynamo.exc

    def no_triton(graph, inputs):
        raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or "
                           "it is too old.")

    try:
        torch.compile(lambda x: x * 2 + 1, backend=no_triton)(torch.ones(3))
    except torch._dynamo.exc.TorchDynamoException as err:
        message = str(tuning.compile_failure(err))
    assert message == ("--compile could not compile the model here: RuntimeError: Cannot find a working triton "
                       "installation. Either the package is not installed or it is too old. (the log has torch's "
                       "account); leave --compile out to run it uncompiled")
