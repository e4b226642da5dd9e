"""The `flux-infer` command: make-tiny, generate, and the messages when weights or devices are missing.

Most run `flux-infer` in a child process, as a user would (marked e2e); the rest call its `main()`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TELEMETRY_OFF
from PIL import Image

from flux_infer.images import parameters_of, settings_of

e2e = pytest.mark.e2e  # runs `flux-infer` in a child process


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, **TELEMETRY_OFF, "XDG_CACHE_HOME": str(cwd / "cache"), "HF_HOME": str(cwd / "hf")}
    environment.pop("FLUX_MODEL", None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "flux_infer", *args], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=timeout,
    )


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_make_tiny_is_deterministic_for_a_seed(tmp_path, tiny_dir, capsys):
    from flux_infer.cli import main

    assert main(["make-tiny", str(tmp_path / "a"), "--seed", "0"]) == 0
    assert "wrote a tiny" in capsys.readouterr().out
    again = _digests(tmp_path / "a")
    assert set(again) == {
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert again == _digests(tiny_dir)  # the session's copy was made with seed 0 too

    from flux_infer.tiny import make_tiny

    other = _digests(make_tiny(tmp_path / "b", seed=1))
    assert other["transformer/diffusion_pytorch_model.safetensors"] != again["transformer/diffusion_pytorch_model.safetensors"]


def test_tiny_has_flux_dev_topology(tiny_dir):
    config = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    assert config["in_channels"] == 64 and config["guidance_embeds"] is True
    vae = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "T5EncoderModel"


@e2e
def test_generate_writes_the_image_and_prints_the_seed(tmp_path, tiny_dir):
    out = tmp_path / "out" / "cat.png"
    done = run_cli(
        "generate", "a cat", "--model", str(tiny_dir), "--seed", "42", "--width", "256", "--height", "320",
        "--steps", "3", "--guidance", "4", "-o", str(out), cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 42" in done.stdout
    assert "3/3" in done.stderr  # the progress bar reached the last step
    image = Image.open(out)
    assert image.size == (256, 320)
    saved = json.loads(image.text["flux_infer"])
    assert saved == {"prompt": "a cat", "seed": 42, "width": 256, "height": 320, "guidance_scale": 4.0,
                     "num_inference_steps": 3, "loras": []}


def test_generate_without_seed_draws_one(tmp_path, tiny_dir, capsys):
    from flux_infer.cli import main

    assert main(["generate", "a cat", "--model", str(tiny_dir), "--width", "256", "--height", "256",
                 "--steps", "1", "-o", str(tmp_path / "x.webp")]) == 0
    seed = int(capsys.readouterr().out.split("seed ")[1].split()[0])
    assert 0 <= seed <= 2147483647
    image = Image.open(tmp_path / "x.webp")
    # lossless, its settings in EXIF
    assert image.format == "WEBP" and settings_of(image)["seed"] == seed and f"Seed: {seed}" in parameters_of(image)


def test_generate_rejects_bad_values_before_loading(tmp_path, capsys):
    from flux_infer.cli import main

    assert main(["generate", "a cat", "--model", "/nowhere/FLUX", "--steps", "0"]) == 2
    assert "num_inference_steps must be a whole number between 1 and 50, got 0" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", "/nowhere/FLUX", "-o", str(tmp_path / "cat.jpg")]) == 2
    assert "-o must end in .png or .webp, got cat.jpg" in capsys.readouterr().err


def test_out_of_gpu_memory_is_said_with_what_to_do_not_a_traceback(tmp_path, tiny_dir, monkeypatch, capsys):
    import torch
    from diffusers import FluxPipeline

    from flux_infer.cli import main

    def too_big(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 90.00 MiB")

    common = ["--model", str(tiny_dir), "--width", "256", "--height", "256", "--steps", "1",
              "-o", str(tmp_path / "x.png")]
    # While generating (also where --compile warms up at start-up): exit 1, advice, no image.
    monkeypatch.setattr(FluxPipeline, "__call__", too_big)
    assert main(["generate", "a cat", *common]) == 1
    err = capsys.readouterr().err
    assert "flux-infer: error: out of GPU memory at 256x256: try a smaller size" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
    # While loading.
    monkeypatch.setattr(FluxPipeline, "from_pretrained", too_big)
    assert main(["generate", "a cat", *common, "--memory", "off"]) == 2
    err = capsys.readouterr().err
    assert ("flux-infer: error: out of GPU memory while loading the model onto cpu with transformer unquantized, "
            "offload none (--memory off); ") in err
    assert "GiB free now: leave the memory options out: --memory auto then plans" in err


@e2e
def test_compile_that_cannot_build_kernels_here_is_a_clear_error(tmp_path, tiny_dir):
    # torch.compile on a CPU needs a C++ compiler (on a GPU, Triton): without one it fails at the first
    # compiled call, which is --compile's warm-up at start-up.
    done = run_cli("generate", "a cat", "--model", str(tiny_dir), "--compile", "--compile-sizes", "256x256",
                   "--width", "256", "--height", "256", "--steps", "1", "-o", str(tmp_path / "x.png"), cwd=tmp_path,
                   env={"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("flux-infer: error: --compile could not compile the model here: InvalidCxxCompiler")
    assert last.endswith("leave --compile out to run it uncompiled")
    assert "--compile: torch.compile failed" in done.stderr  # the operator's log keeps torch's account
    assert not (tmp_path / "x.png").exists()


@e2e
def test_ctrl_c_stops_the_denoising_at_the_end_of_its_step_and_exits_130(tmp_path, tiny_dir):
    import re
    import signal

    environment = {**os.environ, **TELEMETRY_OFF, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # 2048x2048: about a second a step here, 50 of them, so the interrupt comes long before the end.
    child = subprocess.Popen([sys.executable, "-m", "flux_infer", "generate", "a cat", "--model", str(tiny_dir),
                              "--width", "2048", "--height", "2048", "--steps", "50", "-o", str(tmp_path / "x.png")],
                             cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shown = b""
    while b" 1/50 [" not in shown:  # the progress bar has counted the first step
        chunk = child.stderr.read1(65536)
        assert chunk, f"the command ended before its first step: {shown.decode(errors='replace')[-2000:]}"
        shown += chunk
    child.send_signal(signal.SIGINT)
    rest, _ = child.stderr.read(), child.wait()
    shown += rest
    assert child.returncode == 130
    assert not (tmp_path / "x.png").exists()
    assert b"Traceback" not in shown
    counted = [int(n) for n in re.findall(rb" (\d+)/50 \[", shown)]
    assert max(counted) < 50  # it stopped, rather than denoise to the end while the process exits


HINT = "hf download black-forest-labs/FLUX.1-dev --local-dir weights/FLUX.1-dev"


@e2e
@pytest.mark.parametrize(
    "model, expected",
    [
        ("/nowhere/FLUX.1-dev", "model folder /nowhere/FLUX.1-dev does not exist"),
        ("black-forest-labs/FLUX.1-dev", "not in the local Hugging Face cache and downloading is off"),
        (None, "not in the local Hugging Face cache"),  # the default, with no weights/ folder
        ("/nowhere/flux1-dev.safetensors", "transformer checkpoint /nowhere/flux1-dev.safetensors does not exist"),
    ],
)
def test_missing_weights_say_what_to_download(tmp_path, model, expected):
    args = ["generate", "a cat", "--steps", "1"] + (["--model", model] if model else [])
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr
    assert HINT in done.stderr and "HF_TOKEN" in done.stderr and "--model tiny" in done.stderr
    assert "Traceback" not in done.stderr


@e2e
def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "weights" / "FLUX.1-dev").mkdir(parents=True)
    done = run_cli("serve", cwd=tmp_path)  # default model: the weights/ folder, here empty
    assert done.returncode == 2
    assert "weights/FLUX.1-dev is not a diffusers pipeline folder (no model_index.json)" in done.stderr
    assert "Traceback" not in done.stderr


@e2e
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--min-replicas", "3", "--max-replicas", "2"], "0 <= --min-replicas <= --max-replicas"),
        (["--max-replicas", "2"], "--min-replicas and --max-replicas go together"),
        (["--min-replicas", "1"], "--min-replicas and --max-replicas go together"),
        (["--replicas", "0"], "--replicas must be at least 1, got 0"),
        (["--replicas", "2", "--max-replicas", "3", "--min-replicas", "1"], "--replicas is a fixed count"),
        (["--replicas", "2", "--upscale-delay", "5"], "--upscale-delay applies when autoscaling"),
        (["--replicas", "2", "--device", "cuda:1"],
         "--device cuda:1 picks one GPU, and each replica is given a GPU of its own"),
    ],
)
def test_bad_replica_bounds_are_refused_before_ray_starts(tmp_path, tiny_dir, flags, expected):
    done = run_cli("serve", "--model", str(tiny_dir), *flags, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert "Ray" not in done.stderr  # refused before a cluster was started


@e2e
def test_cuda_on_a_cpu_machine_is_a_clear_error(tmp_path, tiny_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = run_cli("serve", "--model", str(tiny_dir), "--device", "cuda", cwd=tmp_path)
    assert done.returncode == 2
    assert "--device cuda was asked for" in done.stderr and "--device cpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_reads_gradio_server_name_and_port(monkeypatch):
    from flux_infer.cli import _parser

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = _parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_queue, args.preview, args.image_format) == (
        "127.0.0.1", 7860, 16, "auto", "webp")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9001")
    args = _parser().parse_args(["serve"])
    assert (args.host, args.port) == ("0.0.0.0", 9001)
    assert _parser().parse_args(["serve", "--port", "9002"]).port == 9002


def test_serve_says_a_port_in_use_a_foreign_address_or_an_unwritable_folder_before_loading(monkeypatch, capsys,
                                                                                           tmp_path):
    import socket

    from flux_infer import cli
    from flux_infer.launcher import free_port

    loads = []
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: loads.append(args))
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):  # another server holds the port
        assert cli.main(["serve", "--model", "tiny", "--port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    # 192.0.2.1 is a documentation address (RFC 5737): on no machine's interfaces, and no DNS asked.
    assert cli.main(["serve", "--model", "tiny", "--host", "192.0.2.1", "--port", str(port)]) == 2
    assert "--host 192.0.2.1 is not an address of this machine" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "tiny", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli.main(["serve", "--model", "tiny", "--output-dir", str(tmp_path / "a-file" / "out")]) == 2
    assert f"--output-dir {tmp_path / 'a-file' / 'out'} cannot be written" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "tiny", "--model-alias", ""]) == 2
    assert "--model-alias needs a name" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "tiny", "--upscale-delay", "5"]) == 2  # not ignored without autoscaling
    assert "--upscale-delay applies when autoscaling" in capsys.readouterr().err
    assert loads == []  # each said before any model was loaded


def test_the_claimed_port_refuses_connections_until_the_server_listens():
    import socket

    from flux_infer.server import claim_address

    with claim_address("127.0.0.1", 0) as sock:  # port 0: any free one
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(ConnectionRefusedError):  # loading: nothing answers, as if nothing were there
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        sock.listen()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_an_empty_api_key_or_auth_variable_means_none(monkeypatch):
    """`FLUX_API_KEY=` (a variable passed through unset) leaves /v1 open, as unset, rather than
    demanding an empty Bearer token; the same for FLUX_AUTH."""
    from flux_infer import cli, server, web

    served = []
    monkeypatch.setenv("FLUX_API_KEY", "")
    monkeypatch.setenv("FLUX_AUTH", "")
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: object())
    monkeypatch.setattr(web, "build_demo", lambda service, **kwargs: None)
    monkeypatch.setattr(server, "serve", lambda service, demo, config, sock: served.append(config) or sock.close())
    assert cli.main(["serve", "--model", "tiny", "--port", "0"]) == 0
    assert (served[0].api_key, served[0].auth) == (None, None)
    monkeypatch.setenv("FLUX_API_KEY", "sk-local")
    assert cli.main(["serve", "--model", "tiny", "--port", "0"]) == 0
    assert served[1].api_key == "sk-local"
