"""Per-request LoRAs from --lora-dir (flux_infer.loras): the folder, validation, and switching through
diffusers' and PEFT's own adapters on the tiny pipeline, eager and compiled."""

from __future__ import annotations

import os
import shutil
from unittest.mock import Mock

import numpy as np
import psutil
import pytest
from conftest import LORAS, make_lora

from flux_infer import settings
from flux_infer.inference import FluxInference, InvalidRequest, LoraChoice, build_request
from flux_infer.loading import load_pipeline
from flux_infer.loras import LoraFolder, LoraLibrary, parse_loras
from flux_infer.tuning import Options


def pixels(inference, loras=(), seed=5):
    request = build_request("a lora fox", seed=seed, randomize_seed=False, width=256, height=256,
                            num_inference_steps=3)
    from dataclasses import replace

    result = inference.run(replace(request, loras=tuple(loras)))
    return np.asarray(result.image).astype(np.int16), result


def fused(tiny_dir, lora_dir, *loras):
    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu",
                                 loras=tuple((str(lora_dir / f"{name}.safetensors"), scale) for name, scale in loras))
    return pixels(FluxInference(pipeline))[0]


def test_the_folder_is_listed_from_headers_and_relisted_when_it_changes(lora_dir, tmp_path):
    folder = tmp_path / "loras"
    shutil.copytree(lora_dir, folder)
    (folder / "notes.txt").write_text("not a LoRA")
    (folder / "old.ckpt").write_bytes(b"pickle")  # pickles are never listed
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    os.symlink(lora_dir / "film.safetensors", folder / "link.safetensors")  # nothing outside the folder
    library = LoraLibrary(folder)
    assert library.names() == ["broken", "clay", "film", "ink", "neon", "pixel"]
    film = library.info("film")
    assert film.rank == 2 and len(film.layers) == 4  # the 4 attention projections of the one double block
    assert film.layers[0].startswith("transformer.transformer_blocks.0.attn.")
    listed = {item["name"]: item for item in library.describe()}
    assert listed["pixel"]["rank"] == 6 and listed["pixel"]["targets"] == [
        "transformer_blocks.attn.to_k", "transformer_blocks.attn.to_out", "transformer_blocks.attn.to_q",
        "transformer_blocks.attn.to_v"]
    assert "not a readable safetensors file" in listed["broken"]["error"]
    shutil.copy(lora_dir / "ink.safetensors", folder / "new-style.safetensors")
    assert "new-style" in library.names()  # a new file is usable at once
    (folder / "clay.safetensors").unlink()
    with pytest.raises(InvalidRequest, match="unknown LoRA 'clay'; known LoRAs: broken, film, ink, neon, new-style, pixel$"):
        library.info("clay")


def test_compiled_slots_cover_the_folders_loras_and_leave_out_a_file_that_is_not_one(
        tiny_dir, lora_dir, tmp_path, monkeypatch, caplog):
    from flux_infer import loading
    from flux_infer.loras import LoraFileError

    folder = tmp_path / "loras"
    folder.mkdir()
    compiled = Options(compile=True, compile_sizes=((256, 256),))
    # An empty folder is said before the model is read (with --compile the slots need the LoRAs' layers).
    with monkeypatch.context() as patched:
        patched.setattr(loading, "_read_pipeline", Mock(side_effect=AssertionError("the model was read")))
        with pytest.raises(LoraFileError, match="--compile with --lora-dir needs the LoRAs in .*loras at start-up"):
            load_pipeline(str(tiny_dir), device="cpu", options=compiled, lora_folder=LoraFolder(str(folder)))
    LoraFolder(str(folder)).check(compiled=False)  # without --compile, LoRAs may come later
    # A file that is not a LoRA is left out of the slots with a warning, not a start-up that fails.
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    shutil.copy(lora_dir / "film.safetensors", folder / "film.safetensors")
    pipeline, *_ = load_pipeline(str(tiny_dir), device="cpu")
    from flux_infer.loras import LoraAdapters

    LoraFolder(str(folder)).check(compiled=True)
    assert "LoRA hot-swap slots leave broken out: LoRA 'broken' (broken.safetensors) is not a readable" in caplog.text
    caplog.clear()
    adapters = LoraAdapters(pipeline, LoraLibrary(folder), cache_size=settings.DEFAULT_LORA_CACHE, hotswap_rank=8)
    adapters.prepare_slots()
    assert LoraLibrary(folder).slot_layers()[0] == list(LoraLibrary(lora_dir).info("film").layers)
    assert "leave broken out" not in caplog.text  # said once, by the check before the model loads
    assert len(pipeline.get_list_adapters()["transformer"]) == settings.MAX_LORAS


def test_a_requests_loras_are_validated_with_messages_that_say_what_to_fix(lora_dir):
    library = LoraLibrary(lora_dir)
    assert parse_loras([{"name": "film", "scale": 0.8}, "ink:0.5", {"name": "neon"}], library) == (
        LoraChoice("film", 0.8), LoraChoice("ink", 0.5), LoraChoice("neon", 1.0))
    assert parse_loras(None, library) == () and parse_loras([], library) == ()
    for value, message in [
        ([{"name": "film", "scale": 9}], "scale of LoRA 'film' must be a number between -2 and 2, got 9"),
        ([{"name": "film", "scale": "loud"}], "scale of LoRA 'film' must be a number between -2 and 2, got the text"),
        ([{"name": "sepia"}], "unknown LoRA 'sepia'; known LoRAs: clay, film, ink, neon, pixel"),
        ([{"name": "../film"}], "unknown LoRA '../film'"),
        (["film", "ink", "neon", "clay", "pixel"], f"at most {settings.MAX_LORAS} LoRAs per image, got 5"),
        (["film", "film:0.5"], "LoRA 'film' is listed twice"),
        ([{"name": "film", "weight": 1}], "unknown key"),
        ("film", None),
        (42, "loras must be a list"),
    ]:
        if message is None:
            assert parse_loras(value, library) == (LoraChoice("film", 1.0),)
            continue
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_loras(value, library)
    with pytest.raises(InvalidRequest, match="start it with --lora-dir"):
        parse_loras(["film"], None)


def test_switching_loras_per_request_matches_fusing_them(tiny_dir, lora_dir):
    pipeline, _, _, runtime, adapters = load_pipeline(str(tiny_dir), device="cpu", lora_folder=LoraFolder(str(lora_dir)))
    inference = FluxInference(pipeline, runtime=runtime, adapters=adapters)
    base = fused(tiny_dir, lora_dir)
    np.testing.assert_array_equal(pixels(inference)[0], base)  # nothing loaded yet
    film, result = pixels(inference, [LoraChoice("film", 0.8)])
    assert "Lora: film:0.8" in result.image.info["parameters"]
    both, _ = pixels(inference, [LoraChoice("ink", 1.0), LoraChoice("neon", -0.5)])
    assert np.abs(film - base).mean() > 1 and np.abs(both - film).mean() > 1
    # Within a step of rounding of the server started with each fused.
    assert np.abs(film - fused(tiny_dir, lora_dir, ("film", 0.8))).max() <= 2
    assert np.abs(both - fused(tiny_dir, lora_dir, ("ink", 1.0), ("neon", -0.5))).max() <= 2
    # Afterwards, no LoRA is the base model's pixels exactly, and a LoRA comes back the same.
    np.testing.assert_array_equal(pixels(inference)[0], base)
    np.testing.assert_array_equal(pixels(inference, [LoraChoice("film", 0.8)])[0], film)


def test_a_request_with_loras_encodes_its_prompt_afresh(tiny_dir, lora_dir):
    # A LoRA may change CLIP's layers, so the prompt embeddings kept for the base model are not its.
    pipeline, _, _, runtime, adapters = load_pipeline(str(tiny_dir), device="cpu", lora_folder=LoraFolder(str(lora_dir)))
    encoded = []
    pipeline.text_encoder.register_forward_hook(lambda *_: encoded.append("clip"))
    inference = FluxInference(pipeline, runtime=runtime, adapters=adapters)
    base = pixels(inference, seed=5)[0]
    pixels(inference, seed=6)
    assert len(encoded) == 1  # the base model's embeddings, kept
    pixels(inference, [LoraChoice("film", 0.8)])
    pixels(inference, [LoraChoice("film", 0.8)])
    assert len(encoded) == 3  # each LoRA request its own
    np.testing.assert_array_equal(pixels(inference, seed=5)[0], base)
    assert len(encoded) == 3  # back to the base model's kept embeddings, and its pixels


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_loras_switch_per_request_on_quantized_weights(tiny_dir, lora_dir, quantize):
    pipeline, _, _, runtime, adapters = load_pipeline(str(tiny_dir), device="cpu", options=Options(quantize=quantize),
                                                      lora_folder=LoraFolder(str(lora_dir)))
    inference = FluxInference(pipeline, runtime=runtime, adapters=adapters)
    base = pixels(inference)[0]
    film = pixels(inference, [LoraChoice("film", 0.8)])[0]
    assert np.abs(film - base).mean() > 1
    np.testing.assert_array_equal(pixels(inference)[0], base)


def test_a_lora_the_library_cannot_load_is_refused_with_its_reason_and_the_next_request_is_served(
        tiny_dir, lora_dir, monkeypatch):
    pipeline, _, _, runtime, adapters = load_pipeline(str(tiny_dir), device="cpu",
                                                      lora_folder=LoraFolder(str(lora_dir)))
    inference = FluxInference(pipeline, runtime=runtime, adapters=adapters)
    for error, reason in [(RuntimeError(), "RuntimeError"), (OSError("\n\n  disk read failed  \nat offset 7"),
                                                                  "disk read failed")]:
        monkeypatch.setattr(pipeline, "load_lora_weights", Mock(side_effect=error))
        with pytest.raises(InvalidRequest, match=f"^LoRA 'film' could not be loaded as a FLUX LoRA: {reason}$"):
            pixels(inference, [LoraChoice("film", 0.8)])
    monkeypatch.undo()  # diffusers' own loader again
    film, result = pixels(inference, [LoraChoice("film", 0.8)])
    assert "Lora: film:0.8" in result.image.info["parameters"]


def test_fused_qkv_refuses_switching_loras_and_applies_a_start_up_one_in_full(tiny_dir, lora_dir):
    from flux_infer.tuning import OptionError

    with pytest.raises(OptionError, match="--fuse-qkv with --lora-dir would skip the LoRAs' Q, K and V layers"):
        load_pipeline(str(tiny_dir), device="cpu", options=Options(fuse_qkv=True), lora_folder=LoraFolder(str(lora_dir)))
    start_up = ((str(lora_dir / "film.safetensors"), 0.8),)
    fused_qkv = load_pipeline(str(tiny_dir), device="cpu", options=Options(fuse_qkv=True), loras=start_up).pipeline
    assert np.abs(pixels(FluxInference(fused_qkv))[0] - fused(tiny_dir, lora_dir, ("film", 0.8))).max() <= 2


def test_fp8_storage_takes_a_start_up_lora_and_refuses_switching_ones(tiny_dir, lora_dir):
    from flux_infer.tuning import OptionError

    with pytest.raises(OptionError, match="--lora-dir cannot switch LoRAs on --quantize fp8-storage weights .*use "
                                          "--quantize fp8 or int8, or fuse one LoRA at start-up"):
        load_pipeline(str(tiny_dir), device="cpu", options=Options(quantize="fp8-storage"),
                      lora_folder=LoraFolder(str(lora_dir)))
    cast = Options(quantize="fp8-storage")
    plain = load_pipeline(str(tiny_dir), device="cpu", options=cast).pipeline
    with_film = load_pipeline(str(tiny_dir), device="cpu", options=cast,
                              loras=((str(lora_dir / "film.safetensors"), 0.8),)).pipeline
    assert np.abs(pixels(FluxInference(with_film))[0] - pixels(FluxInference(plain))[0]).mean() > 1


@pytest.mark.e2e  # a soak: 200 switches
def test_two_hundred_switches_keep_memory_bounded(tiny_dir, lora_dir):
    pipeline, *_, adapters = load_pipeline(str(tiny_dir), device="cpu",
                                           lora_folder=LoraFolder(str(lora_dir), cache=settings.MAX_LORAS))
    names = LoraLibrary(lora_dir).names()
    process = psutil.Process()

    def switch(index):
        adapters.use((LoraChoice(names[index % 5], 0.1 + (index % 7) / 10),
                      LoraChoice(names[(index + 2) % 5], 1.0)))

    for index in range(40):  # every LoRA loaded and dropped a few times
        switch(index)
    before = process.memory_info().rss
    for index in range(40, 200):
        switch(index)
    grown = process.memory_info().rss - before
    print(f"RSS after 40 switches {before / 2**20:.0f} MiB, grown {grown / 2**20:+.1f} MiB over 160 more")
    assert len(pipeline.get_list_adapters()["transformer"]) <= settings.MAX_LORAS  # the cache's bound
    assert grown < 32 * 2**20


@pytest.mark.e2e  # compiles the tiny transformer (tens of seconds on 2 cores)
def test_compiled_switching_never_recompiles(tiny_dir, lora_dir):
    import torch._dynamo

    options = Options(compile=True, compile_sizes=((256, 256),))
    pipeline, _, _, runtime, adapters = load_pipeline(
        str(tiny_dir), device="cpu", options=options, lora_folder=LoraFolder(str(lora_dir), rank=8))
    inference = FluxInference(pipeline, runtime=runtime, adapters=adapters)
    base, _ = pixels(inference)  # compiles, with every slot empty

    def state():  # every weight's address, and the LoRA layers' scalings, which a CUDA graph replays as they were
        transformer = pipeline.transformer
        return ({name: tensor.data_ptr() for name, tensor in transformer.state_dict(keep_vars=True).items()},
                [repr(module.scaling) for module in transformer.modules() if hasattr(module, "scaling")])

    before = state()
    with torch._dynamo.config.patch(error_on_recompile=True):
        film, _ = pixels(inference, [LoraChoice("film", 0.8)])
        pixels(inference, [LoraChoice("pixel", 1.5), LoraChoice("ink", 0.3)])
        pixels(inference, [LoraChoice("film", -1.0)])
        again, _ = pixels(inference)
    # Switched in place: --compile-mode reduce-overhead's CUDA graphs read the new LoRAs.
    assert state() == before and before[1]
    assert np.abs(film - fused(tiny_dir, lora_dir, ("film", 0.8))).max() <= 2
    assert np.abs(film - base).mean() > 1
    np.testing.assert_array_equal(again, base)
    with pytest.raises(InvalidRequest, match="rank 9, above this server's hot-swap rank 8: restart with --lora-rank"):
        make_lora(tiny_dir, lora_dir / "wide.safetensors", rank=9)
        try:
            pixels(inference, [LoraChoice("wide", 1.0)])
        finally:
            (lora_dir / "wide.safetensors").unlink()


@pytest.mark.e2e  # the session server
def test_the_openai_route_lists_and_uses_loras_per_request(server, tiny_dir, lora_dir):
    import base64
    import io

    import openai
    from PIL import Image

    listed = server.http.get("v1/loras").json()
    assert [item["name"] for item in listed["data"]] == sorted(LORAS)
    assert {item["name"]: item["rank"] for item in listed["data"]}["pixel"] == 6

    client = openai.OpenAI(base_url=server.url + "v1", api_key="unused")

    def generate(**extra):
        response = client.images.generate(prompt="a lora fox", size="256x256", extra_body={
            "seed": 5, "num_inference_steps": 3, **extra})
        image = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
        return np.asarray(image.convert("RGB")).astype(np.int16), image.info["parameters"]

    film, parameters = generate(loras=[{"name": "film", "scale": 0.8}])
    assert "Lora: film:0.8" in parameters
    assert np.abs(film - fused(tiny_dir, lora_dir, ("film", 0.8))).max() <= 2
    both, _ = generate(loras=["ink:1", {"name": "neon", "scale": -0.5}])
    assert np.abs(both - fused(tiny_dir, lora_dir, ("ink", 1.0), ("neon", -0.5))).max() <= 2
    base, parameters = generate()
    assert "Lora" not in parameters
    np.testing.assert_array_equal(base, fused(tiny_dir, lora_dir))  # after LoRAs, none is the base model
    for loras, message in [([{"name": "sepia"}], "unknown LoRA 'sepia'; known LoRAs: clay, film, ink, neon, pixel"),
                           ([{"name": "film", "scale": 5}], "scale of LoRA 'film' must be a number between -2 and 2")]:
        with pytest.raises(openai.BadRequestError) as caught:
            generate(loras=loras)
        assert caught.value.body["param"] == "loras" and message in caught.value.body["message"], caught.value.body
