"""Preview decoders: a small picture of the denoising latents at each step.

- `latent`: a fixed linear map of FLUX's 16 latent channels to RGB (one pixel per latent, 1/8 of the
  image's size). Needs no weights and costs a 16x3 matmul.
- `taef1`: diffusers' AutoencoderTiny with the TAEF1 weights (a local folder or the hub id
  `madebyollin/taef1`, as the Space uses), scaled down to at most PREVIEW_MAX_SIDE.
- `auto`: taef1 when it is on disk (a folder or the hub cache), otherwise latent. `none`: no previews.

Decoding runs on the pipeline's device inside the step callback; the copy to the CPU is
asynchronous on CUDA, and turning it into a PIL image is left to the consumer's thread, so the
denoising loop never waits for image encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREVIEW_MODES = ("auto", "taef1", "latent", "none")
DEFAULT_PREVIEW = "auto"
DEFAULT_TAEF1_REPO = "madebyollin/taef1"
DEFAULT_TAEF1_LOCAL = Path("weights/taef1")
# Long side of a taef1 preview, in pixels: enough to judge the picture, cheap to encode and send.
PREVIEW_MAX_SIDE = 512

# FLUX latent channels -> RGB, fitted on FLUX.1 latents (as used by ComfyUI's Flux latent format).
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


class PreviewFrame:
    """A preview on its way to the CPU; `image()` waits for the copy and makes the PIL image."""

    def __init__(self, pixels, ready_event=None):
        self._pixels = pixels  # uint8 (H, W, 3) on the CPU, maybe still being copied
        self._ready = ready_event

    def image(self):
        from PIL import Image

        if self._ready is not None:
            self._ready.synchronize()
        return Image.fromarray(self._pixels.numpy())


def _to_frame(rgb) -> PreviewFrame:
    """(3, H, W) floats in [-1, 1] on any device -> a PreviewFrame, without blocking on CUDA."""
    import torch

    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    if pixels.device.type != "cuda":
        return PreviewFrame(pixels.cpu().contiguous())
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    # The copy runs on the pixels' GPU's stream; recorded on that stream (not the current device's: with
    # --device cuda:1 they differ), the event is reached once the copy is done.
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(pixels.device))
    return PreviewFrame(host, ready)


class LatentPreview:
    name = "latent"

    def __init__(self):
        self._weights: dict[tuple, Any] = {}

    def __call__(self, latents) -> PreviewFrame:
        """`latents`: (16, h, w) in the pipeline's normalised latent space."""
        import torch

        key = (latents.device, latents.dtype)
        if key not in self._weights:
            self._weights[key] = (
                torch.tensor(FLUX_LATENT_RGB_FACTORS, device=latents.device, dtype=latents.dtype),
                torch.tensor(FLUX_LATENT_RGB_BIAS, device=latents.device, dtype=latents.dtype),
            )
        factors, bias = self._weights[key]
        rgb = torch.einsum("chw,cr->rhw", latents, factors) + bias[:, None, None]
        return _to_frame(rgb.float())


class Taef1Preview:
    name = "taef1"

    def __init__(self, vae):
        self.vae = vae

    def __call__(self, latents) -> PreviewFrame:
        import torch
        import torch.nn.functional as F

        # TAEF1 decodes the normalised latents directly (its scaling factor is 1, shift 0).
        with torch.no_grad():
            rgb = self.vae.decode(latents[None].to(self.vae.dtype), return_dict=False)[0][0]
        height, width = rgb.shape[-2:]
        scale = PREVIEW_MAX_SIDE / max(height, width)
        if scale < 1:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            rgb = F.interpolate(rgb[None].float(), size=size, mode="area")[0]
        return _to_frame(rgb.float())


def _taef1_location(taef1: str | None) -> str:
    if taef1:
        return taef1
    return str(DEFAULT_TAEF1_LOCAL) if DEFAULT_TAEF1_LOCAL.is_dir() else DEFAULT_TAEF1_REPO


def load_taef1(location: str, *, device: str, dtype, download: bool = True):
    """Load TAEF1 from a local folder or a hub repo id (huggingface_hub's cache, HF_HUB_OFFLINE).

    With `download=False` only a folder or the hub cache is read: nothing waits on the network.
    """
    import torch
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny.from_pretrained(location, dtype=dtype, use_safetensors=True, local_files_only=not download)
    # TAEF1 is convolutions and activations only, and channels_last is the convolutions' own layout
    # (cuDNN's tensor-core kernels, oneDNN): a 1024x1024 decode took 0.66x the time on a CPU, the
    # pixels within 1 of NCHW's (bench/gpu.py's served part times both on a GPU).
    return Taef1Preview(vae.to(device, memory_format=torch.channels_last).eval())


def load_preview_decoder(mode: str = DEFAULT_PREVIEW, *, taef1: str | None = None, device: str, dtype):
    """The decoder for `mode` (see the module docstring), or None for `none`.

    `taef1` downloads TAEF1 if needed and fails with a message that says where the weights go;
    `auto` takes it only from a folder or the hub cache (start-up never waits on the network) and
    logs how to get it when it falls back.
    """
    if mode not in PREVIEW_MODES:
        raise ValueError(f"--preview must be one of {', '.join(PREVIEW_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "latent":
        return LatentPreview()
    where = _taef1_location(taef1)
    try:
        decoder = load_taef1(where, device=device, dtype=dtype, download=mode == "taef1")
    except (OSError, ValueError) as err:
        if mode == "taef1":
            raise ValueError(
                f"could not load TAEF1 from {where} ({type(err).__name__}): run "
                f"`hf download {DEFAULT_TAEF1_REPO} --local-dir {DEFAULT_TAEF1_LOCAL}`, or use --preview latent"
            ) from None
        log.info("previews: latent (TAEF1 not found at %s; for sharper previews run "
                 "`hf download %s --local-dir %s`)", where, DEFAULT_TAEF1_REPO, DEFAULT_TAEF1_LOCAL)
        return LatentPreview()
    log.info("previews: taef1 from %s", where)
    return decoder


@dataclass(frozen=True)
class Step:
    """One finished denoising step; `preview` is set on the steps that carry a picture."""

    index: int  # steps done, 1..total
    total: int
    preview: PreviewFrame | None = None
