"""Shared fixtures: the tiny pipeline on disk and live servers on free loopback ports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from flux_infer.cuda_graphs import GraphedForward
from flux_infer.launcher import TELEMETRY_OFF, ServerProcess, download_folders_removed, free_port

# Nothing in the tests may talk to anything but 127.0.0.1.
os.environ.update(TELEMETRY_OFF)
__all__ = ["TELEMETRY_OFF", "free_port", "Server", "InProcessServer", "SMALL", "wait_for", "make_lora", "LORAS",
           "files_under", "FakePipeline", "ReplayedOnCPU"]
# The session's --lora-dir: five LoRAs on the tiny transformer, of ranks 2 to 6.
LORAS = ("film", "ink", "neon", "clay", "pixel")


class ReplayedOnCPU(GraphedForward):
    """flux_infer.cuda_graphs.GraphedForward with a CUDA graph's contract kept on a CPU: the capture
    runs the call once (as the real one's warm-up does) and keeps the outputs of a second run; a
    replay runs it again on the tensors it was captured with and writes into those outputs. What is
    tested is what the wrapper does around a graph: which graph a call gets, what it copies in, what
    it hands out."""

    def _capture(self, run):
        from torch.utils._pytree import tree_leaves

        run()
        outputs = run()

        def replay():
            for static, new in zip(tree_leaves(outputs), tree_leaves(run())):
                static.copy_(new)

        return outputs, replay


class FakePipeline:
    """A stand-in for FluxPipeline in narrow tests of what calls it: the prompt stands for its
    embeddings, and a call makes a plain image (`color`) of the size asked for. Subclasses do their
    part in `__call__` and end with `super().__call__(**kwargs)`."""

    color = "black"

    def set_progress_bar_config(self, **_):
        pass

    def encode_prompt(self, prompt):
        return prompt, prompt, None

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        from PIL import Image

        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]), self.color)])


def files_under(*roots: Path) -> list[Path]:
    """The files below `roots`, walked while a server may be deleting them and their folders (os.walk
    passes over a folder that goes while it is walked; Path.rglob raises)."""
    return [Path(folder) / name for root in roots for folder, _, names in os.walk(root) for name in names]


def wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll `condition()` until it is true; fail naming `what` if it is not within `timeout` (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def no_empty_download_folders_left():
    """gradio_client's empty download folders made during the session (the replica scenarios' process
    included) are removed at its end."""
    with download_folders_removed():
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random pipeline, written once per test session by `flux-infer make-tiny`'s code."""
    from flux_infer.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "FLUX.1-tiny", seed=0)


def make_lora(tiny_dir, path, rank=4, seed=0):
    """A rank-`rank` LoRA on every attention projection of the double blocks, in diffusers' key layout."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, _ in enumerate(transformer.transformer_blocks):
        for target in LORA_TARGETS:
            module = transformer.transformer_blocks[index].get_submodule(target)
            prefix = f"transformer.transformer_blocks.{index}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.5
    save_file(tensors, path)
    return path


LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


@pytest.fixture(scope="session")
def lora_dir(tiny_dir, tmp_path_factory) -> Path:
    """The session server's --lora-dir (LORAS, ranks 2..6)."""
    folder = tmp_path_factory.mktemp("loras")
    for index, name in enumerate(LORAS):
        make_lora(tiny_dir, folder / f"{name}.safetensors", rank=2 + index, seed=10 + index)
    return folder


class InProcessServer:
    """The server's app (flux_infer.server.build_app) under uvicorn in a thread, for fakes in-process."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        # Open event streams (gradio_client heartbeats) would hold a graceful shutdown for ever.
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self):
        self._server.should_exit = True
        self._thread.join(timeout=30)


class Server(ServerProcess):
    """A `flux-infer serve` subprocess, as a user would start it, with the tiny model's cache in `workdir`."""

    def __init__(self, args: list[str], workdir: Path, startup_s: float = 180, env: dict | None = None):
        super().__init__(args, workdir, startup_s=startup_s,
                         env={"XDG_CACHE_HOME": str(Path(workdir) / "cache"), **(env or {})})


@pytest.fixture(scope="session")
def server(tiny_dir, lora_dir, tmp_path_factory):
    """One server on the tiny weights for the whole session (latent previews: no TAEF1 here)."""
    srv = Server(["--model", str(tiny_dir), "--lora-dir", str(lora_dir)], tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()


# Small enough to keep the suite fast on two CPU cores.
SMALL = dict(width=256, height=256, num_inference_steps=4)
