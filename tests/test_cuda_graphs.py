"""flux_infer.cuda_graphs around a small module, on a CPU stand-in for the CUDA graph itself
(conftest.ReplayedOnCPU); the tiny pipeline replayed so is in test_tuning.py."""

from __future__ import annotations

import logging

import pytest

from conftest import ReplayedOnCPU


@pytest.fixture()
def module():
    import torch

    class Denoiser(torch.nn.Module):  # called as diffusers' pipelines call the transformer
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, hidden_states, timestep, guidance=None, joint_attention_kwargs=None, return_dict=True):
            out = self.proj(hidden_states) * timestep[:, None, None]
            if guidance is not None:
                out = out + guidance[:, None, None]
            scale = (joint_attention_kwargs or {}).get("scale", 1.0)
            return (out * scale,) if not return_dict else {"sample": out * scale}

    torch.manual_seed(0)
    return Denoiser().eval()


def test_a_call_replays_its_shapes_graph_on_its_own_inputs(module, caplog):
    import torch

    graphed = ReplayedOnCPU(module.forward)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="flux_infer.cuda_graphs"):
        results = []
        for step in range(3):  # new values, keyword and positional, every call: each is the call's own
            x, t, g = torch.randn(1, 16, 4), torch.rand(1), torch.rand(1)
            got = graphed(x, timestep=t, guidance=g, return_dict=False)
            torch.testing.assert_close(got[0], module(x, t, guidance=g, return_dict=False)[0], rtol=0, atol=0)
            results.append((got[0], got[0].clone()))
        assert graphed.recorded == 1
        # What a call returns is its own: the next replay writes the graph's outputs, not it.
        for returned, as_returned in results:
            assert torch.equal(returned, as_returned)
        assert len({id(returned) for returned, _ in results}) == 3

        graphed(torch.randn(1, 32, 4), timestep=torch.rand(1), guidance=torch.rand(1), return_dict=False)
        assert graphed.recorded == 2  # a new shape, a new graph
        graphed(torch.randn(1, 16, 4), timestep=torch.rand(1), guidance=torch.rand(1), return_dict=False)
        assert graphed.recorded == 2  # the first shape's graph again
        # Anything but a tensor is part of the graph: another value, or a missing argument, is another one.
        x, t = torch.randn(1, 16, 4), torch.rand(1)
        scaled = graphed(x, timestep=t, joint_attention_kwargs={"scale": 0.5}, return_dict=False)
        torch.testing.assert_close(scaled[0], module(x, t, joint_attention_kwargs={"scale": 0.5}, return_dict=False)[0])
        assert graphed.recorded == 3
        as_dict = graphed(x, timestep=t, joint_attention_kwargs={"scale": 0.5})
        torch.testing.assert_close(as_dict["sample"], scaled[0], rtol=0, atol=0)
        assert graphed.recorded == 4
    assert caplog.text.count("recorded the transformer's CUDA graph for inputs of ") == 4
    assert "for inputs of 1x32x4 in " in caplog.text and "(2 recorded)" in caplog.text


def test_graphs_are_only_recorded_on_a_cuda_gpu_and_for_a_graph_mode(tiny_dir, monkeypatch, caplog):
    import torch

    from flux_infer.cuda_graphs import GraphedForward
    from flux_infer.loading import load_pipeline
    from flux_infer.tuning import MemoryPlan, Options, Runtime

    monkeypatch.setattr(torch, "compile", lambda model=None, **_: model)  # the wiring, not the compiler
    pipe = load_pipeline(str(tiny_dir), device="cpu", options=Options()).pipeline
    forward = pipe.transformer.forward
    # On a CUDA device (named only: nothing runs here) the forward is wrapped, and only in a graph mode.
    Runtime(pipe, Options(compile=True, compile_mode="max-autotune-no-cudagraphs"), MemoryPlan(), "cuda")._compile()
    assert pipe.transformer.forward == forward
    runtime = Runtime(pipe, Options(compile=True, compile_mode="reduce-overhead"), MemoryPlan(), "cuda")
    runtime._compile()
    assert isinstance(pipe.transformer.forward, GraphedForward) and pipe.transformer.forward.recorded == 0
    assert runtime.graphs is pipe.transformer.forward and runtime.graphs.pool_bytes == 0  # its pool, for tiling
    del pipe.transformer.forward
    with caplog.at_level(logging.INFO, logger="flux_infer.tuning"):
        Runtime(pipe, Options(compile=True, compile_mode="max-autotune"), MemoryPlan(), "cpu")._compile()
    assert pipe.transformer.forward == forward
    assert ("--compile-mode max-autotune: CUDA graphs need a CUDA GPU; on cpu the compiled transformer runs without"
            in caplog.text)


def test_a_forward_that_cannot_be_captured_says_which_mode_to_use_and_is_tried_again(module, tiny_dir, monkeypatch):
    import torch

    from flux_infer.cuda_graphs import GraphCaptureError
    from flux_infer.inference import FluxInference
    from flux_infer.loading import InferenceSpec, load_inference
    from flux_infer.tuning import OptionError, Options

    class Refused(ReplayedOnCPU):  # as CUDA refuses a copy from the CPU, or a wait, inside a capture
        failures = 1

        def _capture(self, run):
            if Refused.failures:
                Refused.failures -= 1
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCompile with "
                                   "`TORCH_USE_CUDA_DSA` to enable device-side assertions.")
            return super()._capture(run)

    graphed, x, t = Refused(module.forward), torch.randn(1, 16, 4), torch.rand(1)
    with torch.no_grad(), pytest.raises(GraphCaptureError, match=(
            r"^could not record the transformer as a CUDA graph: CUDA error: operation not permitted when stream "
            r"is capturing \(the log has torch's account\); use --compile-mode default or "
            r"max-autotune-no-cudagraphs$")) as refused:
        graphed(x, timestep=t, return_dict=False)
    assert graphed.recorded == 0
    with torch.no_grad():  # nothing half-recorded is kept: the next call records
        torch.testing.assert_close(graphed(x, timestep=t, return_dict=False)[0], module(x, t, return_dict=False)[0])
    assert graphed.recorded == 1

    class OutOfMemory(ReplayedOnCPU):  # left as it is, for the generation's own out-of-memory message
        def _capture(self, run):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError, match="^CUDA out of memory"):
        OutOfMemory(module.forward)(x, timestep=t, return_dict=False)

    # At start-up (the warm-up records every --compile-sizes graph) the server does not start, and says why.
    def warm_up(self, *_):
        raise refused.value

    monkeypatch.setattr(FluxInference, "warm_up", warm_up)
    spec = InferenceSpec(model=str(tiny_dir), device="cpu",
                         options=Options(compile=True, compile_mode="reduce-overhead"))
    with pytest.raises(OptionError, match="^could not record the transformer as a CUDA graph: .* use --compile-mode"):
        load_inference(spec)
