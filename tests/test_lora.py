"""--lora: a tiny LoRA made for the tiny transformer, loaded and fused through diffusers."""

from __future__ import annotations

import warnings
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from conftest import make_lora

from flux_infer.inference import FluxInference
from flux_infer.loading import ModelLoadError, load_pipeline, parse_lora



def image(tiny_dir, loras=()):
    pipeline, _, _, runtime, _ = load_pipeline(str(tiny_dir), device="cpu", loras=tuple(loras))
    result = FluxInference(pipeline, runtime=runtime).infer("a lora fox", seed=5, randomize_seed=False, width=256,
                                                              height=256, num_inference_steps=3)
    return np.asarray(result.image).astype(np.int16), pipeline


def test_lora_is_fused_at_its_scale(tmp_path, tiny_dir):
    lora = str(make_lora(tiny_dir, tmp_path / "tiny-style.safetensors"))
    base, _ = image(tiny_dir)
    styled, pipeline = image(tiny_dir, [(lora, 1.0)])
    half, _ = image(tiny_dir, [(lora, 0.5)])
    off, _ = image(tiny_dir, [(lora, 0.0)])
    assert np.abs(styled - base).mean() > 1  # the LoRA changes the picture
    assert 0 < np.abs(half - base).mean() < np.abs(styled - base).mean()  # less at half scale
    np.testing.assert_array_equal(off, base)  # and not at all at scale 0
    # Fused and unloaded: no adapter layers are left to slow each step.
    assert not any("lora" in name for name, _ in pipeline.transformer.named_modules())
    again, _ = image(tiny_dir, [(lora, 1.0)])
    np.testing.assert_array_equal(again, styled)


def test_two_loras_stack(tmp_path, tiny_dir):
    first = str(make_lora(tiny_dir, tmp_path / "a.safetensors", seed=1))
    second = str(make_lora(tiny_dir, tmp_path / "b.safetensors", seed=2))
    one, _ = image(tiny_dir, [(first, 1.0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both, _ = image(tiny_dir, [(first, 1.0), (second, 1.0)])
    assert np.abs(both - one).mean() > 0
    # PEFT's "multiple adapters in the model" warning is the intended use here: not shown.
    assert not [w for w in caught if "peft_config" in str(w.message)]


def test_lora_errors_and_parsing(tmp_path, tiny_dir, monkeypatch):
    from flux_infer import loading

    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert parse_lora("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    # A LoRA that is not there, or a pickle, is said before the model is read.
    with monkeypatch.context() as patched:
        patched.setattr(loading, "_read_pipeline", Mock(side_effect=AssertionError("the model was read")))
        with pytest.raises(ModelLoadError, match="LoRA file .*missing.safetensors does not exist"):
            load_pipeline(str(tiny_dir), device="cpu", loras=((str(tmp_path / "missing.safetensors"), 1.0),))
        with pytest.raises(ModelLoadError, match="style.ckpt is a pickle-based checkpoint"):
            load_pipeline(str(tiny_dir), device="cpu", loras=((str(tmp_path / "style.ckpt"), 1.0),))
        (tmp_path / "style.safetensors").write_bytes(b"")
        with pytest.raises(ModelLoadError, match="style.safetensors:loud: the scale after the colon must be a number, "
                                                 "got 'loud'"):
            load_pipeline(str(tiny_dir), device="cpu", loras=(parse_lora(f"{tmp_path / 'style.safetensors'}:loud"),))
    from safetensors.torch import save_file

    save_file({"unrelated.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="could not load .*other.safetensors as a FLUX LoRA"):
        load_pipeline(str(tiny_dir), device="cpu", loras=((str(tmp_path / "other.safetensors"), 1.0),))


def test_cli_generate_with_a_lora(tmp_path, tiny_dir, capsys):
    from flux_infer.cli import main

    lora = make_lora(tiny_dir, tmp_path / "style.safetensors")
    output = tmp_path / "out.png"
    assert main(["generate", "a fox", "--model", str(tiny_dir), "--lora", f"{lora}:0.8", "--seed", "1",
                 "--width", "256", "--height", "256", "--steps", "2", "-o", str(output)]) == 0
    assert output.is_file() and "seed 1" in capsys.readouterr().out
