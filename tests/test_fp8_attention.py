"""Float8 attention (`--attention cudnn-fp8`): what a CPU can check of it.

cuDNN's kernel runs on Hopper or newer GPUs only (bench/gpu.py measures it there). Here a CPU kernel
registered for the custom op computes what cuDNN's float8 attention computes by its documented
scales: Q, K and V times their descales, the softmax's probabilities rounded to float8 at
PROBABILITY_SCALE, the output times scale_o rounded to float8. Everything around the kernel then
runs for real: the scaling into float8 and back, the op's fake for torch.compile, the processor in
the tiny transformer and the start-up checks.
"""

from __future__ import annotations

import numpy as np
import pytest

from flux_infer import fp8_attention
from flux_infer.inference import FluxInference
from flux_infer.loading import load_pipeline
from flux_infer.tuning import FLOAT8_ATTENTION, OptionError, Options

SMALL = dict(width=256, height=256, num_inference_steps=4)


def sdpa(query, key, value):
    """torch's SDPA on (batch, sequence, heads, head_dim) tensors, as diffusers' native backend runs it."""
    import torch

    out = torch.nn.functional.scaled_dot_product_attention(*(t.permute(0, 2, 1, 3) for t in (query, key, value)))
    return out.permute(0, 2, 1, 3)


@pytest.fixture(scope="module")
def emulated_kernel():
    """cuDNN's float8 attention, as the CPU kernel of `flux_infer::cudnn_fp8_attention`, for this module's tests."""
    import torch

    def kernel(q, k, v, descale_q, descale_k, descale_v, scale_o):
        q, k, v = (t.float().transpose(1, 2) * descale for t, descale in ((q, descale_q), (k, descale_k),
                                                                           (v, descale_v)))
        probabilities = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        probabilities = (probabilities * fp8_attention.PROBABILITY_SCALE).to(torch.float8_e4m3fn).float()
        out = (probabilities / fp8_attention.PROBABILITY_SCALE @ v).transpose(1, 2) * scale_o
        limit = fp8_attention.FLOAT8_MAX
        return torch.empty_like(q.transpose(1, 2), dtype=torch.float8_e4m3fn).copy_(out.clamp(-limit, limit))

    library = torch.library.Library("flux_infer", "FRAGMENT")
    torch.library.register_kernel(fp8_attention.register(), "cpu", kernel, lib=library)
    yield
    library._destroy()


def relative(got, want) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_the_processor_is_diffusers_own_with_the_attention_swapped(tiny_dir):
    """Given torch's SDPA, the float8 processor's steps give diffusers' FluxAttnProcessor's output
    exactly, with Q, K and V projected apart or fused."""
    import torch
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, config.in_channels, generator=generator),
                  encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=generator),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0),
                                                     indexing="ij"), -1).reshape(64, 3),
                  txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        want = transformer(**inputs)[0]
        for fused in (False, True):
            if fused:
                transformer.fuse_qkv_projections()
            transformer.set_attn_processor(fp8_attention.processor(sdpa))
            assert torch.equal(transformer(**inputs)[0], want), f"fused QKV {fused}"
        # The float8 processor's own attention, for contrast: close, not the same.
        transformer.set_attn_processor(fp8_attention.processor())
        with pytest.raises(NotImplementedError):  # no CPU kernel outside `emulated_kernel`
            transformer(**inputs)


def test_float8_attention_is_within_its_tolerance_of_sdpa(emulated_kernel):
    import torch

    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 320, 3, 64, generator=generator, dtype=torch.bfloat16) for _ in range(3))
    error = relative(fp8_attention.attention(q, k, v), sdpa(q, k, v))
    assert 0.002 < error < fp8_attention.TOLERANCE / 2  # float8's rounding: more than bf16's, a few percent
    # The start-up test, at FLUX.1-dev's 24 heads of 128
    assert 0.002 < fp8_attention.relative_error("cpu", torch.bfloat16, heads=24, head_dim=128) < \
        fp8_attention.TOLERANCE / 2
    # One scale per tensor follows the values' size: a thousand times larger or smaller, the same rounding.
    for factor in (1e3, 1e-3):
        scaled = relative(fp8_attention.attention(q, k, v * factor), sdpa(q, k, v * factor))
        assert scaled == pytest.approx(error, rel=0.2), factor
    # Zeros stay zeros, not NaN (the scale of an all-zero tensor is finite).
    zeros = torch.zeros_like(q)
    assert torch.equal(fp8_attention.attention(q, k, zeros), zeros)


def test_a_scale_taken_the_wrong_way_round_fails_the_start_up_test(emulated_kernel, monkeypatch):
    import torch

    honest = fp8_attention.to_float8

    def swapped(x):
        scaled, scale, descale = honest(x)
        return scaled, descale, scale

    monkeypatch.setattr(fp8_attention, "to_float8", swapped)
    assert fp8_attention.relative_error("cpu", torch.float32, heads=2, head_dim=64) > fp8_attention.TOLERANCE


def test_cudnns_own_error_in_the_start_up_test_is_said_in_one_line(monkeypatch):
    import torch

    def fails(*_):
        raise RuntimeError("\nCUDNN_STATUS_EXECUTION_FAILED\ncudnn_frontend detail")

    monkeypatch.setattr(fp8_attention, "attention", fails)
    with pytest.raises(fp8_attention.Float8AttentionUnavailable, match="^cuDNN said CUDNN_STATUS_EXECUTION_FAILED$"):
        fp8_attention.relative_error("cpu", torch.bfloat16, heads=2, head_dim=64)


def test_a_shape_cudnn_has_no_graph_for_is_served_by_sdpa_and_said_once(monkeypatch, caplog):
    """A size whose attention cuDNN cannot build is served in bf16 (torch's SDPA on the float8 inputs,
    same contract: float8 out, scaled by scale_o), with one warning; start-up's strict build raises."""
    import logging

    import torch

    class NoEngine:
        def __init__(self, *args):
            raise RuntimeError("cudnnGraphNotSupportedError: no engine for this graph\nmore detail")

    monkeypatch.setattr(fp8_attention, "_Graph", NoEngine)
    monkeypatch.setattr(fp8_attention, "_GRAPHS", {})
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, 200, 2, 64, generator=generator, dtype=torch.bfloat16) for _ in range(3))
    (q, _, descale_q), (k, _, descale_k), (v, scale_v, descale_v) = map(fp8_attention.to_float8, (query, key, value))
    with caplog.at_level(logging.WARNING, logger="flux_infer.fp8_attention"):
        for _ in range(2):
            out = fp8_attention.run(q, k, v, descale_q, descale_k, descale_v, scale_v)
            assert out.dtype == torch.float8_e4m3fn and out.shape == q.shape
            assert relative(out.float() * descale_v, sdpa(query, key, value)) < fp8_attention.TOLERANCE / 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["cuDNN has no float8 attention for 1x200x2x64 (cudnnGraphNotSupportedError: no engine for "
                        "this graph): attention at this size runs in bf16"]
    with pytest.raises(RuntimeError, match="no engine"):
        fp8_attention._graph(tuple(q.shape), *(q.stride(),) * 4, q.device, strict=True)


def test_the_tiny_pipeline_generates_with_float8_attention(tiny_dir, emulated_kernel):
    pipeline, _, _, runtime, _ = load_pipeline(str(tiny_dir), device="cpu", options=Options())
    inference = FluxInference(pipeline, runtime=runtime)
    reference = np.asarray(inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL).image)
    pipeline.transformer.set_attn_processor(fp8_attention.processor())
    image = np.asarray(inference.infer("a lighthouse at dusk", seed=7, randomize_seed=False, **SMALL).image)
    difference = np.abs(image.astype(np.int16) - reference.astype(np.int16))
    assert 0 < difference.mean() < 4  # of 255: float8's rounding changes the pixels a little


@pytest.mark.e2e  # compiles a double and a single block of the tiny transformer
def test_compiled_blocks_trace_the_op_whole_and_agree_with_eager(tiny_dir, emulated_kernel):
    import torch
    from diffusers import FluxTransformer2DModel

    torch._dynamo.reset()
    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    transformer.set_attn_processor(fp8_attention.processor())
    width = transformer.inner_dim
    generator = torch.Generator().manual_seed(2)
    image, text = torch.randn(1, 64, width, generator=generator), torch.randn(1, 8, width, generator=generator)
    temb = torch.randn(1, width, generator=generator)
    rotary = transformer.pos_embed(torch.cat([torch.zeros(8, 3), torch.rand(64, 3, generator=generator)]))
    with torch.no_grad():
        for block, args in ((transformer.transformer_blocks[0], (image, text, temb, rotary)),
                            (transformer.single_transformer_blocks[0], (image, text, temb, rotary))):
            eager = block(*args)
            compiled = torch.compile(block, fullgraph=True)(*args)  # a graph break would raise
            for got, want in zip(compiled, eager):
                assert relative(got, want) < 0.01, type(block).__name__


def test_float8_attention_is_refused_where_it_cannot_run(tiny_dir):
    with pytest.raises(OptionError, match=f"--attention {FLOAT8_ATTENTION} cannot run on cpu in float32: it needs a "
                                          "CUDA GPU of compute capability 9.0 or newer .*leave --attention out"):
        load_pipeline(str(tiny_dir), device="cpu", options=Options(attention=FLOAT8_ATTENTION))
