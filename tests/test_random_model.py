"""`--model random`: FLUX.1-dev's real architecture with random weights, and the `--gpu-memory` cap."""

from __future__ import annotations

import types

import numpy as np
import psutil
import pytest
import torch
from conftest import SMALL, Server
from PIL import Image

from flux_infer import random_weights, settings, tuning
from flux_infer.inference import FluxInference
from flux_infer.loading import ModelLoadError, Placement, load_pipeline, resolve_source

GIB = 1024**3


def test_full_architecture_has_flux_dev_parameter_counts_without_allocating():
    rss = psutil.Process().memory_info().rss
    models = random_weights.empty_models(random_weights.architecture("random"))
    # FLUX.1-dev's published component sizes (12B transformer, T5-XXL, CLIP-L, VAE).
    counts = {name: random_weights.count_parameters(model) for name, model in models.items()}
    assert counts == {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656,
                      "text_encoder": 123_060_480, "vae": 83_819_683}
    assert counts == random_weights.PARAMETERS
    assert all(p.is_meta for model in models.values() for p in model.parameters())
    assert psutil.Process().memory_info().rss - rss < 2 * GIB  # 16.9 billion parameters, none of them made
    sizes = random_weights.weight_bytes(models, dtype=torch.bfloat16, quantized={})
    assert sum(sizes.values()) / GIB == pytest.approx(31.4, abs=0.05)  # FLUX-GPU.md: 31.4 GiB in all
    eight_bit = random_weights.weight_bytes(models, dtype=torch.bfloat16, quantized={"transformer": "fp8"})
    assert eight_bit["transformer"] / GIB == pytest.approx(11.1, abs=0.1)  # nearly all of it in Linear layers


def test_sources_name_the_random_architectures():
    assert resolve_source("random") == resolve_source(settings.RANDOM_MODEL_NAME)
    assert resolve_source("random").kind == "random"
    assert resolve_source("random-small").location == "random-small"
    with pytest.raises(ValueError, match="use random or random-small"):
        random_weights.architecture("random-huge")


def _small(options=None, **kwargs):
    loaded = load_pipeline("random-small", device="cpu", options=options or tuning.Options(), **kwargs)
    return loaded, FluxInference(loaded.pipeline, runtime=loaded.runtime)


def _image(inference, seed=5):
    result = inference.infer("a red fox in snow", seed=seed, randomize_seed=False, width=256, height=256,
                             num_inference_steps=2)
    return np.asarray(result.image)


def test_small_build_generates_the_same_noise_every_time(caplog):
    loaded, inference = _small()
    pipeline = loaded.pipeline
    assert "random-small: a scaled-down FLUX.1-dev with RANDOM weights. Its images are noise" in caplog.text
    # The same code path as the full size: FLUX.1-dev's head size, rope axes, vocabularies, scheduler.
    assert pipeline.transformer.config.attention_head_dim == 128
    assert tuple(pipeline.transformer.config.axes_dims_rope) == (16, 56, 56)
    assert pipeline.text_encoder_2.config.vocab_size == 32128
    assert pipeline.scheduler.config.max_shift == 1.15
    t5 = pipeline.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied, as in the checkpoint
    params = [p for m in ("transformer", "text_encoder", "text_encoder_2", "vae")
              for p in getattr(pipeline, m).parameters()]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    weight = pipeline.transformer.transformer_blocks[0].ff.net[2].weight
    assert weight.std().item() == pytest.approx(random_weights.INIT_STD, rel=0.05)
    first = _image(inference)
    assert first.shape == (256, 256, 3) and first.std() > 0
    np.testing.assert_array_equal(first, _image(inference))
    _, again = _small()  # weights drawn from a fixed seed: a second build is the same model
    np.testing.assert_array_equal(first, _image(again))
    assert np.abs(first.astype(int) - _image(inference, seed=6)).mean() > 1


def test_small_build_quantizes_block_by_block_and_generates():
    loaded, inference = _small(tuning.Options(quantize="int8", quantize_text_encoder=True))
    pipeline = loaded.pipeline

    def quantized(linear):
        return type(linear.weight) is not torch.nn.Parameter or type(linear.weight.data) is not torch.Tensor

    linears = {name: m for name, m in pipeline.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all(quantized(m) for m in linears.values())  # in the blocks and outside them
    assert quantized(pipeline.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo)
    assert not quantized(next(m for m in pipeline.text_encoder.modules() if isinstance(m, torch.nn.Linear)))  # CLIP stays as it is
    # Quantized weights are never concatenated into fused projections.
    assert not getattr(pipeline.transformer.transformer_blocks[0].attn, "fused_projections", False)
    assert _image(inference).std() > 0


def test_build_frees_each_blocks_unquantized_weights_once_it_is_quantized():
    # The peak of a quantized build is the final weights plus one block: on an H100 a build
    # within --gpu-memory 24 ran out of memory while every block's bfloat16 weights were still held.
    import gc
    import weakref

    model = random_weights.empty_models(random_weights.architecture("random-small"))["transformer"]
    int8 = random_weights.torchao_quantizer(tuning.torchao_config("int8", types.SimpleNamespace(device="cpu")))
    earlier = []  # the unquantized weights of the blocks quantized so far

    def quantize(unit, skip):
        gc.collect()
        assert [ref() for ref in earlier if ref() is not None] == []
        earlier.extend(weakref.ref(m.weight) for name, m in unit.named_modules()
                       if isinstance(m, torch.nn.Linear) and not name.startswith(skip))
        int8(unit, skip)

    with torch.no_grad():
        random_weights.materialize(model, stage="cpu", home="cpu", dtype=torch.float32, quantize=quantize)
    gc.collect()
    assert len(earlier) > 10 and all(ref() is None for ref in earlier)
    assert not any(p.is_meta for p in model.parameters())


def test_full_model_that_cannot_fit_fails_clearly_before_allocating(monkeypatch):
    monkeypatch.setattr(tuning, "free_bytes", lambda device, gpu_memory=None: 20 * GIB)
    rss = psutil.Process().memory_info().rss
    with pytest.raises(ModelLoadError) as error:
        load_pipeline("random", device="cpu", dtype="bfloat16")
    message = str(error.value)
    assert "--model random needs 31.4 GiB for its weights in bfloat16" in message
    assert "this machine's RAM has 20.0 GiB free" in message
    assert "use --model random-small to check the code path here, or run on a GPU" in message
    assert psutil.Process().memory_info().rss - rss < 2 * GIB


def test_cli_generates_with_random_small_and_refuses_the_full_model_on_this_cpu(tmp_path, capsys):
    from flux_infer.cli import main

    out = tmp_path / "noise.png"
    assert main(["generate", "noise", "--model", "random-small", "--seed", "3", "--width", "256", "--height", "256",
                 "--steps", "2", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and "seed 3" in capsys.readouterr().out
    needed = sum(random_weights.PARAMETERS.values()) * 4  # float32 on a CPU: 62.8 GiB
    if tuning.free_bytes("cpu") < needed:
        assert main(["generate", "x", "--model", "random"]) == 2
        err = capsys.readouterr().err
        assert f"flux-infer: error: --model random needs {needed / GIB:.1f} GiB for its weights in float32" in err


# -- --gpu-memory ----------------------------------------------------------------------------------

@pytest.fixture
def fake_h100(monkeypatch):
    """torch.cuda as an 80 GB H100 with 79.3 GiB free would answer; records the allocator cap set."""
    cuda = types.SimpleNamespace(fraction=None)
    total = 79.6 * GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (int(79.3 * GIB), int(total)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=0: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: types.SimpleNamespace(
        total_memory=int(total)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, index=0: setattr(cuda, "fraction", fraction))
    monkeypatch.setattr(tuning, "_bitsandbytes_installed", lambda: True)
    cuda.total = total
    return cuda


CUDA = Placement("cuda", "bfloat16", "a test GPU")


@pytest.mark.parametrize("cap, compile, expected", [
    (None, False, ("none", "none", False)),
    # 8 bits: torchao's int8 weight-only eager (faster than float8 there, measured on an H100), its
    # float8 under --compile on a card with float8 matmuls.
    (24, False, ("none", "int8", False)),
    (24, True, ("none", "fp8", False)),
    (16, False, ("t5", "int8", False)),
    (16, True, ("t5", "fp8", False)),
    (12, False, ("t5", "nf4", False)),
    (8, False, ("group", "fp8-storage", False)),
    (8, True, ("group", "none", False)),  # --compile cannot trace fp8-storage's casts
])
def test_gpu_memory_cap_plans_within_the_cap_and_sets_the_allocator_fraction(fake_h100, cap, compile, expected):
    options = tuning.Options(gpu_memory=cap, compile=compile)
    tuning.limit_gpu_memory(options.gpu_memory, CUDA.device)
    plan = tuning.resolve_plan(options, CUDA)
    assert (plan.offload, plan.quantize, plan.quantize_text_encoder) == expected
    if cap is None:
        assert fake_h100.fraction is None and "79.3 GiB free" in plan.reason
    else:
        assert fake_h100.fraction == pytest.approx(cap * GIB / fake_h100.total)
        assert f"{cap:.1f} GiB free on NVIDIA H100 80GB HBM3 (sm 9.0) within --gpu-memory {cap}" in plan.reason
        assert tuning.estimate_gib(*expected) + tuning.HEADROOM_GIB <= cap
        assert tuning.free_bytes("cuda", cap) == cap * GIB


def test_cuda_graphs_keep_the_denoisings_memory_so_a_cap_plans_for_it(fake_h100):
    # The graphs' pool holds the denoising's transient memory through the VAE decode: at 16 GiB the
    # float8 transformer fits without CUDA graphs and not with them.
    for plan in (("none", "none", False), ("t5", "fp8", False)):
        assert tuning.estimate_gib(*plan, graphs=True) == pytest.approx(tuning.estimate_gib(*plan) + tuning.DENOISE_GIB)
    tuning.limit_gpu_memory(16, CUDA.device)
    plans = {mode: tuning.resolve_plan(tuning.Options(gpu_memory=16, compile=True, compile_mode=mode), CUDA)
             for mode in ("default", "reduce-overhead")}
    assert (plans["default"].offload, plans["default"].quantize) == ("t5", "fp8")
    assert (plans["reduce-overhead"].offload, plans["reduce-overhead"].quantize) == ("t5", "nf4")
    assert plans["reduce-overhead"].reason.endswith("transformer fp8, offload t5 ~15.5 GiB")


def test_under_a_cap_the_cuda_graphs_pool_is_not_free_for_the_vae_decode(fake_h100, monkeypatch):
    # Between replays the graphs' pool is reserved and unallocated: the cap less what is allocated
    # would count it free, yet the decode (~3 GiB at 1024x1024 in bfloat16) cannot allocate from it.
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=0: 12 * GIB)
    assert tuning.free_bytes("cuda", 16) == 4 * GIB
    assert tuning.free_bytes("cuda", 16, kept=2 * GIB) == 2 * GIB
    assert tuning.free_bytes("cuda", None, kept=2 * GIB) == int(79.3 * GIB)  # the driver's figure leaves it out
    pipeline = types.SimpleNamespace(vae=types.SimpleNamespace(dtype=torch.bfloat16))
    runtime = tuning.Runtime(pipeline, tuning.Options(gpu_memory=16), tuning.MemoryPlan(), CUDA.device)
    assert not runtime.tile(1024, 1024)
    runtime.graphs = types.SimpleNamespace(pool_bytes=2 * GIB)
    assert runtime.tile(1024, 1024)
    assert not tuning.Runtime(pipeline, tuning.Options(), tuning.MemoryPlan(), CUDA.device,
                              graphs=runtime.graphs).tile(1024, 1024)  # no cap: 79.3 GiB free


def test_a_cap_with_loras_per_request_streams_the_blocks_in_bf16(fake_h100):
    # LoRAs loaded later would be stored in float8 too (check_plan refuses that): not fp8-storage
    tuning.limit_gpu_memory(8, CUDA.device)
    plan = tuning.resolve_plan(tuning.Options(gpu_memory=8), CUDA, switching_loras=True)
    assert (plan.offload, plan.quantize) == ("group", "none")


def test_offload_t5_sizes_t5_against_ram_and_the_rest_against_the_gpu(monkeypatch):
    # With --offload t5, T5 is built in RAM and everything else on the GPU: each checked against its
    # own free memory, before anything is allocated.
    free = {"cuda": 40 * GIB, "cpu": 5 * GIB}
    monkeypatch.setattr(tuning, "free_bytes", lambda device, gpu_memory=None: free[device])
    t5 = tuning.MemoryPlan(offload="t5")
    with pytest.raises(ModelLoadError) as error:
        random_weights.build_pipeline("random", placement=CUDA, plan=t5)
    message = str(error.value)
    assert "GiB for its weights in bfloat16 (text_encoder_2 " in message and "transformer" not in message
    assert "this machine's RAM has 5.0 GiB free" in message
    free.update(cuda=20 * GIB, cpu=100 * GIB)
    with pytest.raises(ModelLoadError) as error:
        random_weights.build_pipeline("random", placement=CUDA, plan=t5)
    message = str(error.value)
    assert "(transformer 22.2" in message and "text_encoder_2" not in message
    assert "cuda has 20.0 GiB free" in message


def test_gpu_memory_errors(fake_h100):
    with pytest.raises(tuning.OptionError, match="--gpu-memory 100 is more than this GPU has \\(79.6 GiB\\)"):
        tuning.limit_gpu_memory(100, "cuda")
    with pytest.raises(tuning.OptionError, match="--gpu-memory takes the GiB this server may use on the GPU"):
        tuning.Options(gpu_memory=0)
    with pytest.raises(tuning.OptionError, match="--gpu-memory caps a CUDA GPU's memory and this run is on cpu"):
        tuning.limit_gpu_memory(8, "cpu")


@pytest.mark.e2e
def test_server_serves_random_weights_through_the_space_api(tmp_path):
    server = Server(["--model", "random-small", "--preview", "none"], tmp_path)
    try:
        image, seed = server.client().predict("noise", 11, False, api_name="/infer", **SMALL)
        assert seed == 11
        assert Image.open(image).size == (SMALL["width"], SMALL["height"])
        assert "with RANDOM weights. Its images are noise" in server.log()
    finally:
        server.stop()
