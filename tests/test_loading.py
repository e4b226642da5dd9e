"""Weights sources, device and dtype choice, and the loaders, on the tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_infer import settings
from flux_infer.inference import FluxInference
from flux_infer.loading import (
    DeviceError,
    ModelLoadError,
    load_pipeline,
    resolve_placement,
    resolve_source,
)


def test_sources_are_told_apart(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(settings.MODEL_ENV, raising=False)
    assert resolve_source(str(tiny_dir)).kind == "folder"
    assert resolve_source("black-forest-labs/FLUX.1-dev").kind == "repo"
    assert resolve_source("tiny").kind == "tiny"
    # Defaults: the hub repo id, then weights/FLUX.1-dev once it exists, and FLUX_MODEL above both.
    assert resolve_source(None).location == "black-forest-labs/FLUX.1-dev"
    (tmp_path / "weights" / "FLUX.1-dev").mkdir(parents=True)
    (tmp_path / "weights" / "FLUX.1-dev" / "model_index.json").write_text("{}")
    assert resolve_source(None) == resolve_source("weights/FLUX.1-dev")
    monkeypatch.setenv(settings.MODEL_ENV, str(tiny_dir))
    assert resolve_source(None).location == str(tiny_dir)
    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"")
    single = resolve_source(str(checkpoint), base_model=str(tiny_dir))
    assert single.kind == "single_file" and single.base.location == str(tiny_dir)
    with pytest.raises(ModelLoadError, match="must be a diffusers folder or repo id"):
        resolve_source(str(checkpoint), base_model=str(checkpoint))
    with pytest.raises(ModelLoadError, match="tiny is a whole pipeline already: leave --base-model out"):
        resolve_source("tiny", base_model=str(tiny_dir))


def test_placement_on_this_machine():
    placement = resolve_placement()
    if torch.cuda.is_available():
        assert (placement.device, placement.dtype) == ("cuda", torch.bfloat16)
    else:
        assert (placement.device, placement.dtype) == ("cpu", torch.float32)
        assert "no CUDA device found" in placement.reason
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16
    with pytest.raises(DeviceError, match="--dtype must be one of bfloat16, float16, float32, got 'int3'"):
        resolve_placement("cpu", "int3")
    # A numbered device is the same kind of device (float32 on a CPU, as unnumbered).
    assert (resolve_placement("cpu:0").device, resolve_placement("cpu:0").dtype) == ("cpu:0", torch.float32)
    for wrong in ("tpu", "meta", "cuda:first"):
        with pytest.raises(DeviceError, match=rf"--device must be one of cuda, mps, cpu, optionally numbered "
                                              rf"\(cuda:1\), got '{wrong}'"):
            resolve_placement(wrong)


def test_a_gpu_number_the_machine_lacks_is_a_clear_error(monkeypatch):
    # Without the check, the first CUDA call on the missing GPU fails deep in torch, as an uncaught
    # AssertionError ("Invalid device id") under --memory auto or CUDA's "invalid device ordinal".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_placement("cuda:1").device == "cuda:1"
    with pytest.raises(DeviceError, match=r"--device cuda:2: torch sees 2 CUDA GPUs here \(cuda:0, cuda:1; "
                                          r"CUDA_VISIBLE_DEVICES renumbers them\): pick one of those"):
        resolve_placement("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"torch sees 1 CUDA GPU here \(cuda:0; "):
        resolve_placement("cuda:1")


def _image(pipeline, seed=3):
    return np.asarray(FluxInference(pipeline).infer("a boat", seed=seed, randomize_seed=False, width=256,
                                                    height=256, num_inference_steps=2).image)


def test_single_file_transformer_with_folder_components(tmp_path, tiny_dir):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    folder_pipeline = load_pipeline(str(tiny_dir), device="cpu").pipeline
    checkpoint = tmp_path / "flux1-tiny.safetensors"
    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, checkpoint)

    single_pipeline, source, _, _, _ = load_pipeline(str(checkpoint), base_model=str(tiny_dir), device="cpu")
    assert source.kind == "single_file"
    np.testing.assert_array_equal(_image(single_pipeline), _image(folder_pipeline))
    # Read straight onto the device asked for, a numbered one too (diffusers' loader reads a single file
    # into RAM unless told the device; the map records the device it read onto).
    numbered = load_pipeline(str(checkpoint), base_model=str(tiny_dir), device="cpu:0").pipeline
    assert numbered.transformer.hf_device_map == {"": torch.device("cpu", 0)}
    np.testing.assert_array_equal(_image(numbered), _image(folder_pipeline))


def test_out_of_gpu_memory_while_loading_says_what_to_do(tmp_path, tiny_dir, monkeypatch):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    def too_big(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 MiB")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", too_big)
    # The plan --memory auto chose did not fit: something else holds memory, or a leaner plan is needed.
    with pytest.raises(ModelLoadError, match=r"out of GPU memory while loading the model onto cpu with transformer "
                                             r"unquantized, offload none \(.*\); [0-9.]+ GiB free now: another "
                                             r"program may be using the GPU"):
        load_pipeline(str(tiny_dir), device="cpu")
    # A single file's reader says the same, not that the file is no FLUX checkpoint.
    monkeypatch.setattr(FluxTransformer2DModel, "from_single_file", too_big)
    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"out of GPU memory while loading .*: another program"):
        load_pipeline(str(checkpoint), base_model=str(tiny_dir), device="cpu")


def test_single_file_that_is_not_a_transformer(tmp_path, tiny_dir):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelLoadError, match="could not read .*broken.safetensors as a FLUX transformer"):
        load_pipeline(str(broken), base_model=str(tiny_dir), device="cpu")


def test_tiny_is_made_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from flux_infer.tiny import VERSION

    pipeline, source, placement, _, _ = load_pipeline("tiny")
    folder = tmp_path / "flux-infer" / f"tiny-v{VERSION}-seed0"
    assert source.location == str(folder)
    made = (folder / "model_index.json").stat().st_mtime_ns
    load_pipeline("tiny")
    assert (folder / "model_index.json").stat().st_mtime_ns == made
    assert pipeline.transformer.config.in_channels == 64
    assert pipeline.transformer.dtype == placement.dtype


def test_weights_are_read_straight_onto_the_device_unless_offloaded_or_cast_after(tiny_dir):
    from diffusers import FluxPipeline

    from flux_infer.tuning import Options

    direct = load_pipeline(str(tiny_dir), device="cpu").pipeline
    assert direct.hf_device_map == "cpu"  # diffusers' device_map: each tensor read onto its device
    # The same weights as diffusers' default load (into RAM, then moved).
    plain = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    np.testing.assert_array_equal(_image(direct), _image(plain))
    # fp8-storage casts after reading: reading onto the GPU first would hold the full bf16 weights
    # there. It reads the transformer first and casts it before T5 is read, so RAM never holds both
    # models' bf16 weights; the same pixels as diffusers' load cast after.
    read = []

    def reading(cls, *args, **kwargs):
        transformer = kwargs.get("transformer")  # None: read by the pipeline, beside T5
        read.append(transformer and transformer.transformer_blocks[0].ff.net[2].weight.dtype)
        return from_pretrained.__func__(cls, *args, **kwargs)

    from_pretrained = FluxPipeline.from_pretrained
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxPipeline, "from_pretrained", classmethod(reading))
        cast = load_pipeline(str(tiny_dir), device="cpu", options=Options(quantize="fp8-storage")).pipeline
    assert read == [torch.float8_e4m3fn]
    assert cast.hf_device_map is None
    plain.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    np.testing.assert_array_equal(_image(cast), _image(plain))
    # With --fuse-qkv, Q, K and V are fused first, then stored in float8, still before T5 is read
    # (tuning.prepare_weights; Runtime.apply's second call changes nothing): the same pixels as
    # diffusers' load, fused and cast after.
    read.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxPipeline, "from_pretrained", classmethod(reading))
        fused = load_pipeline(str(tiny_dir), device="cpu", options=Options(quantize="fp8-storage", fuse_qkv=True))
    assert read == [torch.float8_e4m3fn]
    attention = fused.pipeline.transformer.transformer_blocks[0].attn
    assert attention.fused_projections and attention.to_qkv.weight.dtype == torch.float8_e4m3fn
    reference = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    reference.transformer.fuse_qkv_projections()
    reference.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    np.testing.assert_array_equal(_image(fused.pipeline), _image(reference))
    # A numbered device (`--device cuda:1` on a multi-GPU box) is one diffusers' pipeline device_map
    # refuses (it names device types): the transformer and T5 are read onto it each on its own (the
    # transformer's map records the number), the small components moved there; the same pixels.
    numbered = load_pipeline(str(tiny_dir), device="cpu:0").pipeline
    assert numbered.hf_device_map is None
    assert numbered.transformer.hf_device_map == {"": torch.device("cpu", 0)}
    np.testing.assert_array_equal(_image(numbered), _image(direct))
    # Quantized as they are read, with the configs the pipeline would have given them.
    quantized = load_pipeline(str(tiny_dir), device="cpu:0",
                              options=Options(quantize="int8", quantize_text_encoder=True)).pipeline
    assert type(quantized.transformer.transformer_blocks[0].ff.net[2].weight).__name__ == "Int8Tensor"
    assert type(quantized.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo.weight).__name__ == "Int8Tensor"
    assert quantized.transformer.hf_device_map == {"": torch.device("cpu", 0)}


def test_offload_t5_reads_t5_into_ram_and_the_rest_onto_the_device(tiny_dir, monkeypatch):
    # --offload t5 (which needs a GPU; the CPU stands in): T5 stays in RAM and is streamed in, so it
    # is read there, on its own; the rest is read straight onto the device (diffusers' device_map).
    from diffusers import FluxPipeline
    from transformers import T5EncoderModel

    from flux_infer import loading
    from flux_infer.tuning import MemoryPlan

    reads = []
    read = T5EncoderModel.from_pretrained.__func__

    def recording_read(cls, *args, **kwargs):
        reads.append(kwargs.get("device_map"))
        return read(cls, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(recording_read))
    pipe = loading._read_pipeline(resolve_source(str(tiny_dir)), tiny_dir, resolve_placement("cpu"),
                                  MemoryPlan(offload="t5"), gguf=False)
    assert reads == [None]  # T5 read once, into RAM
    assert pipe.hf_device_map == "cpu"
    plain = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    np.testing.assert_array_equal(_image(pipe), _image(plain))


def test_a_server_generates_at_start_up_what_its_runtime_says(tiny_dir, monkeypatch, caplog):
    # `serve` asks for the start-up image (Runtime.start_up_images: on a GPU, the first request's
    # one-time costs), `generate` does not.
    from flux_infer import cli, tuning
    from flux_infer.loading import load_inference

    asked = []

    def start_up_images(self, *, serving):
        asked.append(serving)
        return (((256, 256),), 1, 1) if serving else None

    monkeypatch.setattr(tuning.Runtime, "start_up_images", start_up_images)
    specs = []
    for command in (["serve"], ["generate", "a boat"]):
        args = cli._parser().parse_args([*command, "--model", str(tiny_dir), "--device", "cpu"])
        args.lora_folder = None
        specs.append(cli._spec(args))
    with caplog.at_level("INFO", logger="flux_infer.inference"):
        for spec in specs:
            load_inference(spec)
    assert asked == [True, False]
    warmed = [r.message for r in caplog.records if "warmed up" in r.message]
    assert len(warmed) == 1 and warmed[0].startswith("warmed up at 256x256 in ")
