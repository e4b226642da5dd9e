"""The Docker image, as far as a machine without a Docker engine can check it: the Dockerfile parses
and follows good practice, the variables and paths it sets are the ones the app reads, and its
command starts the server, healthy by its own HEALTHCHECK, in a plain virtual environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import TELEMETRY_OFF, free_port

from flux_infer import settings

ROOT = Path(__file__).resolve().parents[1]
# The CUDA major version of PyPI's Linux build of each torch release the image may pin.
TORCH_CUDA_MAJOR = {"2.13.0": "13"}


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(ROOT / "Dockerfile"))


def instructions(dockerfile, name):
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def test_dockerfile_follows_good_practice(dockerfile):
    base = dockerfile.baseimage
    assert base.startswith("nvidia/cuda:") and base.endswith("-base-ubuntu24.04")  # torch brings CUDA's libraries
    runs = instructions(dockerfile, "RUN")
    apt = [r for r in runs if "apt-get install" in r]
    assert apt and all("--no-install-recommends" in r and "rm -rf /var/lib/apt/lists/*" in r for r in apt)
    assert all("apt-get update" in r for r in apt)  # update and install in one layer
    # --compile: Triton (3.7, torch 2.13's) compiles its launcher, which includes Python.h, with gcc or
    # clang at run time ("Failed to find C compiler" without one).
    assert all(package in apt[0].split() for package in ("gcc", "libc6-dev", "python3-dev"))
    assert any("torch==2.13.0" in r for r in runs)
    # The base image's CUDA is the one the pinned torch is built for (PyPI's torch 2.13.0 requires
    # cuda-toolkit 13.0.3), so the container toolkit checks the host driver for that CUDA.
    assert base.split(":")[1].split(".")[0] == TORCH_CUDA_MAJOR["2.13.0"]
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    assert instructions(dockerfile, "EXPOSE") == ["7860"]
    healthcheck = instructions(dockerfile, "HEALTHCHECK")
    assert len(healthcheck) == 1 and "/healthz" in healthcheck[0] and "--start-period" in healthcheck[0]
    cmd = instructions(dockerfile, "CMD")
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["flux-infer", "serve"]  # exec form: signals reach it
    assert json.loads(instructions(dockerfile, "VOLUME")[0]) == ["/app/weights", "/app/hf-cache"]
    assert not any(i["instruction"] == "ADD" for i in dockerfile.structure)


def test_the_variables_it_sets_are_the_ones_the_app_reads(dockerfile):
    env = dockerfile.envs
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0" and env["GRADIO_SERVER_PORT"] == "7860"
    assert env["FLUX_MODEL"].startswith("/app/weights/")
    assert settings.MODEL_ENV == "FLUX_MODEL"
    assert env["HF_HOME"] == "/app/hf-cache" and env["GRADIO_ANALYTICS_ENABLED"] == "False"
    # The CLI's defaults come from those variables...
    probe = ("from flux_infer.cli import _parser; from flux_infer.loading import default_model; "
             "a = _parser().parse_args(['serve']); print(a.host, a.port, default_model())")
    names = ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "FLUX_MODEL")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, **{k: env[k] for k in names}}).stdout.split()
    assert out == ["0.0.0.0", "7860", env["FLUX_MODEL"]]
    # ...and huggingface_hub keeps its cache (and reads HF_TOKEN) under HF_HOME.
    probe = "import huggingface_hub.constants as c; print(c.HF_HOME, c.HF_HUB_CACHE)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HOME": env["HF_HOME"]}).stdout.split()
    assert out == ["/app/hf-cache", "/app/hf-cache/hub"]


def test_compiled_kernels_are_kept_in_a_volume(dockerfile, tmp_path):
    """--compile's kernels go to TORCHINDUCTOR_CACHE_DIR, inside a volume, so a new container
    starts warm; torch takes both inductor's and Triton's folders from that one variable."""
    kept = dockerfile.envs["TORCHINDUCTOR_CACHE_DIR"]
    volumes = json.loads(instructions(dockerfile, "VOLUME")[0])
    assert any(kept.startswith(volume + "/") for volume in volumes), (kept, volumes)
    probe = ("from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir; "
             "print(cache_dir(), triton_cache_dir(0))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}).stdout.split()
    assert out == [str(tmp_path / "inductor"), str(tmp_path / "inductor" / "triton" / "0")]


def test_compose_reserves_a_gpu_and_mounts_the_weights():
    import yaml

    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flux-infer"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "7860:7860" in service["ports"] and "HF_TOKEN" in service["environment"]
    assert any(v.endswith(":/app/weights") for v in service["volumes"])


def test_dockerignore_keeps_weights_and_caches_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("weights/", "**/*.safetensors", "**/*.gguf", ".venv/", ".git/"):
        assert pattern in ignored


@pytest.mark.e2e
def test_its_command_serves_and_passes_its_healthcheck(dockerfile, tiny_dir, tmp_path):
    """CMD and HEALTHCHECK with the image's environment; the weights volume is the tiny model and the
    address stays on loopback here (the image itself binds 0.0.0.0)."""
    port = free_port()
    env = {**os.environ, **dockerfile.envs, **TELEMETRY_OFF, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "FLUX_MODEL": str(tiny_dir),
           "HF_HOME": str(tmp_path / "hf-cache"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "hf-cache" / "inductor"),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    env.pop("VIRTUAL_ENV", None)
    command = json.loads(instructions(dockerfile, "CMD")[0])
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    healthcheck = instructions(dockerfile, "HEALTHCHECK")[0].split("CMD", 1)[1].strip()
    try:
        deadline = time.monotonic() + 180
        status = 1
        while time.monotonic() < deadline and process.poll() is None:
            status = subprocess.run(["sh", "-c", healthcheck], env=env, capture_output=True).returncode
            if status == 0:
                break
            time.sleep(0.5)
        assert status == 0, (tmp_path / "server.log").read_text()
        config = httpx.get(f"http://127.0.0.1:{port}/config").json()
        assert config["title"] == "FLUX.1 [dev]"
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
        log.close()
