"""Memory and speed options: what fits the GPU, and what makes it fast.

Everything here is the field's own machinery, switched on with the right arguments:
- memory: diffusers' offloading (`enable_model_cpu_offload`, group offload of the whole pipeline or
  of T5 alone, sequential), its quantization configs at load time (torchao int8/fp8, bitsandbytes
  nf4, GGUF single files) and layerwise casting (`fp8-storage`); VAE tiling and slicing;
- speed: `torch.compile` of the transformer's repeated blocks and the VAE decoder, fused QKV
  projections, diffusers' cache hooks (First Block Cache, TaylorSeer, MagCache), attention backends
  and cuDNN's float8 attention (flux_infer.fp8_attention).

`plan_memory()` is `--memory auto`: the fastest combination whose estimated peak fits the GPU's
free memory. `Runtime` applies the options to a loaded pipeline and does the per-request parts
(tiling for large images, MagCache's step count, counting what the cache skipped).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field, replace

from flux_infer import settings
from flux_infer.errors import first_line

log = logging.getLogger(__name__)

MEMORY_MODES = ("auto", "off")
# t5: T5 alone in RAM, streamed to the GPU a block at a time when a new prompt is encoded; the
# transformer, CLIP and the VAE stay on the GPU.
OFFLOAD_MODES = ("none", "t5", "model", "group", "sequential")
# Plans whose transformer stays on the GPU: its weights keep their addresses (CUDA graphs) and no
# offloading hook sits in its blocks.
RESIDENT_TRANSFORMER = ("none", "t5")
# fp8 and fp8-row: torchao's float8 weights and activations, with one scale per tensor or finer ones,
# one per row (the two compared, in time and pixels: bench/gpu.py's fp8-row presets).
QUANTIZE_MODES = ("none", "fp8-storage", "int8", "fp8", "fp8-row", "nf4")
VAE_TILING_MODES = ("auto", "on", "off")
# torch.compile's modes: max-autotune* try kernel variants while compiling (slower to start);
# reduce-overhead and max-autotune also replay the transformer from CUDA graphs. Those graphs are
# flux_infer.cuda_graphs' (over blocks compiled one by one), not inductor's: each CUDA graph mode
# compiles as the mode it names without them (None: torch's default).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")
INDUCTOR_MODE = {"default": None, "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
                 "max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": None}
# torch.compile's recompilations allowed per function with diffusers' hooks in the blocks (offloading
# by group or layer, a step cache); torch's default is 8.
HOOKS_RECOMPILE_LIMIT = 64
# --cache KIND[:VALUE]: the value is a threshold, except TaylorSeer's, which is its refresh interval.
CACHE_DEFAULTS = {"fbcache": 0.05, "taylorseer": 5, "magcache": 0.06}
# Sizes warmed up at start-up with --compile, and the one size without (the Space's default size).
DEFAULT_COMPILE_SIZES = ((1024, 1024),)

# Estimated peaks for FLUX.1-dev at 1024x1024, in GiB: the components' weights (12B-parameter
# transformer, 4.7B T5-XXL encoder, CLIP-L and VAE) and the transient memory of the denoising
# and of the VAE decode. Published sizes, checked with bench/gpu.py on an H200 (bench/RESULTS.md,
# 2026-11-27): 31.4 GiB of weights in bf16 (estimated 31.5), 16.0 with the transformer and T5 in fp8
# (16.0), and the allocator's peak 2.5 GiB above the weights in both, the VAE decode's.
TRANSFORMER_GIB = {"none": 22.2, "fp8-storage": 11.1, "int8": 11.1, "fp8": 11.1, "fp8-row": 11.1, "nf4": 6.3}
T5_GIB = {"none": 8.9, "int8": 4.5, "fp8": 4.5, "fp8-row": 4.5, "nf4": 2.7}
OTHER_GIB = 0.4  # CLIP-L, VAE
DENOISE_GIB = 1.5
DECODE_GIB = 2.5
OFFLOAD_PEAK_GIB = {"group": 4.0, "sequential": 3.0}
# T5's blocks on the GPU at once when it is streamed in (the block running, the next one coming, and
# its embedding): at the text-encoding step, before the denoising's transient memory.
T5_STREAMED_GIB = 1.0
HEADROOM_GIB = 1.0
# VAE decode: bytes per output pixel (bf16; twice that in float32), to decide tiling.
DECODE_BYTES_PER_PIXEL = 3 * 1024**3 / (1024 * 1024)
FP8_COMPUTE_CAPABILITY = (8, 9)
# --attention's own choice beside diffusers' backends: cuDNN's float8 flash attention (flux_infer.fp8_attention).
FLOAT8_ATTENTION = "cudnn-fp8"


class OptionError(ValueError):
    """An option cannot be used here (no CUDA, a missing package); the message says what to do."""


@dataclass(frozen=True)
class CacheSpec:
    kind: str
    value: float

    def describe(self) -> str:
        return f"{self.kind}:{self.value:g}"


def parse_cache(text: str | None) -> CacheSpec | None:
    """`fbcache`, `fbcache:0.08`, `taylorseer:4`, `magcache:0.1`, or `none` -> a CacheSpec or None."""
    if text is None or text == "none":
        return None
    kind, _, value = text.partition(":")
    if kind not in CACHE_DEFAULTS:
        raise OptionError(f"--cache must be none or one of {', '.join(CACHE_DEFAULTS)} (with an optional :VALUE), "
                          f"got {text!r}")
    if not value:
        return CacheSpec(kind, CACHE_DEFAULTS[kind])
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"--cache {kind}:VALUE needs a number after the colon, got {value!r}") from None
    if kind == "taylorseer" and (number < 1 or number != int(number)):
        raise OptionError(f"--cache taylorseer:N takes a whole refresh interval of at least 1, got {value}")
    if number < 0:
        raise OptionError(f"--cache {kind}:THRESHOLD must be 0 or more, got {value}")
    return CacheSpec(kind, number)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`1024x1024,768x1344` -> ((1024, 1024), (768, 1344))."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise OptionError(f"--compile-sizes takes WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {item.strip()!r}")
        size = (int(width), int(height))
        for side, value, bounds in zip(("width", "height"), size, (settings.WIDTH, settings.HEIGHT)):
            if not bounds.minimum <= value <= bounds.maximum:
                raise OptionError(f"--compile-sizes {item.strip()}: a {side} between {bounds.minimum:g} and "
                                  f"{bounds.maximum:g}, as requests may ask for, got {value}")
        sizes.append(size)
    return tuple(sizes)


def check_attention(backend: str) -> None:
    """--attention names one of diffusers' attention backends or FLOAT8_ATTENTION: said before the
    weights load (whether it runs on this device is Runtime's question, once they have)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName]
    if backend not in (*names, FLOAT8_ATTENTION):
        raise OptionError(f"--attention must be one of {', '.join(n for n in names if not n.startswith('_'))} "
                          f"or {FLOAT8_ATTENTION}, got {backend!r}")


@dataclass(frozen=True)
class Options:
    """What the command line asked for. None means "not given": `--memory auto` decides."""

    memory: str = "auto"
    offload: str | None = None
    quantize: str | None = None
    quantize_text_encoder: bool | None = None
    compile: bool = False
    compile_mode: str = "default"
    compile_sizes: tuple[tuple[int, int], ...] = DEFAULT_COMPILE_SIZES
    cache: CacheSpec | None = None
    attention: str | None = None
    fuse_qkv: bool = False  # measured on an H100: +4 GiB, 3% slower in eager (bench/RESULTS.md)
    vae_tiling: str = "auto"
    gpu_memory: float | None = None  # GiB this process may use on the GPU (--gpu-memory)

    def __post_init__(self):
        for name, value, allowed in (("memory", self.memory, MEMORY_MODES), ("offload", self.offload, OFFLOAD_MODES),
                                     ("quantize", self.quantize, QUANTIZE_MODES),
                                     ("vae-tiling", self.vae_tiling, VAE_TILING_MODES),
                                     ("compile-mode", self.compile_mode, COMPILE_MODES)):
            if value is not None and value not in allowed:
                raise OptionError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.compile_mode != "default" and not self.compile:
            raise OptionError(f"--compile-mode {self.compile_mode} says how to compile: add --compile")
        if self.compile_sizes != DEFAULT_COMPILE_SIZES and not self.compile:
            raise OptionError("--compile-sizes says which sizes --compile warms up: add --compile")
        if self.attention is not None:
            check_attention(self.attention)
        if self.cuda_graphs and self.cache is not None:
            raise OptionError(f"--compile-mode {self.compile_mode} replays the transformer from CUDA graphs, "
                              "which would replay --cache's first choice at every step: with --cache, use "
                              "--compile-mode default or max-autotune-no-cudagraphs")
        if self.compile and self.quantize == "fp8-storage":
            raise OptionError("--compile cannot trace fp8-storage's per-layer casts: use --quantize fp8 (float8 "
                              "weights and matmuls, which compile), or leave --compile out")
        if self.gpu_memory is not None and not self.gpu_memory > 0:
            raise OptionError(f"--gpu-memory takes the GiB this server may use on the GPU, more than 0, "
                              f"got {self.gpu_memory:g}")

    def warm_up_runs(self) -> tuple[int, int]:
        """(steps, images) per size that compile every graph before the first request.

        Without a cache two steps do. A cache's hooks split the graph by state (computing or
        skipping, first image or not): two images at the default step count reach them all.
        """
        if self.cache is None:
            # The first step compiles the blocks (and records the transformer's CUDA graph), the
            # second runs them compiled; the VAE decoder compiles in the image's decode.
            return 2, 1
        return int(settings.NUM_INFERENCE_STEPS.default), 2

    @property
    def cuda_graphs(self) -> bool:
        """The transformer replays from CUDA graphs: a CUDA graph mode, which only --compile takes."""
        return self.compile_mode in CUDA_GRAPH_MODES

    @property
    def explicit_memory(self) -> bool:
        return self.offload is not None or self.quantize is not None or self.quantize_text_encoder is not None


@dataclass(frozen=True)
class MemoryPlan:
    offload: str = "none"
    quantize: str = "none"
    quantize_text_encoder: bool = False
    reason: str = "defaults"

    def describe(self) -> str:
        parts = [f"transformer {self.quantize if self.quantize != 'none' else 'unquantized'}"]
        if self.quantize_text_encoder and self.quantize != "none":
            parts.append(f"T5 {self.quantize}")
        parts.append(f"offload {self.offload}")
        return ", ".join(parts)


def estimate_gib(offload: str, quantize: str, quantize_text_encoder: bool, *,
                 transformer_gib: float | None = None, graphs: bool = False) -> float:
    """Estimated peak GPU memory of a combination at 1024x1024 (see the module's constants).

    `graphs`: the transformer replays from CUDA graphs, whose pool keeps the denoising's transient
    memory for the next replay, through the text encoding and the VAE decode too."""
    if offload in OFFLOAD_PEAK_GIB:
        return OFFLOAD_PEAK_GIB[offload]
    transformer = transformer_gib if transformer_gib is not None else TRANSFORMER_GIB[quantize]
    t5 = T5_GIB[quantize if quantize_text_encoder else "none"]
    kept = DENOISE_GIB if graphs else 0.0
    if offload == "model":  # one component on the GPU at a time
        return max(transformer + DENOISE_GIB, t5, OTHER_GIB + DECODE_GIB)
    if offload == "t5":  # the transformer stays; T5 passes through a block at a time
        return transformer + OTHER_GIB + kept + max(T5_STREAMED_GIB, DENOISE_GIB - kept, DECODE_GIB)
    return transformer + t5 + OTHER_GIB + kept + max(DENOISE_GIB - kept, DECODE_GIB)


def candidates(*, fp8: bool, nf4: bool, gguf: bool, storage: bool = True):
    """Combinations from the fastest to the leanest: (offload, quantize, quantize_text_encoder).

    Streaming T5 in (offload t5) costs a fraction of a second per new prompt and nothing per step;
    model offload moves the transformer to the GPU and back for every image (22 s an image at 16
    GiB on an H200: bench/RESULTS.md). So a transformer that stays on the GPU comes first, in nf4 if
    need be, before model offload.

    Group offload copies all of the transformer's weights to the GPU at every step (22 GB in bf16:
    the link's time, not the GPU's, sets the pace). Stored in float8 (fp8-storage), they are half the
    bytes to copy and half the pinned RAM to hold, so that comes first where `storage` allows it
    (not under --compile, which cannot trace its per-layer casts, nor with LoRAs chosen per request,
    which would be stored in float8 too).
    """
    eight = "fp8" if fp8 else "int8"
    if gguf:  # the transformer is quantized already; only T5 and offloading are left to choose
        ladder = [("none", "none", False), ("none", eight, True), ("t5", "none", False), ("model", "none", False)]
    else:
        ladder = [("none", "none", False), ("none", eight, False), ("none", eight, True), ("t5", eight, False)]
        if nf4:
            ladder += [("t5", "nf4", False)]
        ladder += [("model", eight, False)]
        if nf4:
            ladder += [("model", "nf4", False), ("model", "nf4", True)]
    streamed = [("group", "fp8-storage", False)] if storage and not gguf else []
    return ladder + streamed + [("group", "none", False), ("sequential", "none", False)]


def plan_memory(free_gib: float, *, fp8: bool = True, nf4: bool = True, gguf_gib: float | None = None,
                storage: bool = True, graphs: bool = False, where: str = "the GPU") -> MemoryPlan:
    """`--memory auto`: the first of `candidates()` whose estimate plus HEADROOM_GIB fits `free_gib`.

    `fp8`: 8 bits means float8 (torchao's float8 weights and activations), else torchao's int8
    weight-only. `resolve_plan` asks for float8 on GPUs with float8 matmuls (compute capability 8.9+)
    under `--compile` only: eager, int8 weight-only was the faster of the two (7.20 s an image
    against 8.33 s on an H100, bench/RESULTS.md), and it leaves the activations in bf16.
    `nf4`: bitsandbytes is installed. `gguf_gib`: the transformer is a GGUF file of that size.
    `storage`: fp8-storage can be chosen (see `candidates()`). `graphs`: CUDA graphs will keep the
    denoising's memory (see `estimate_gib`).
    """
    tried = []
    for offload, quantize, text in candidates(fp8=fp8, nf4=nf4, gguf=gguf_gib is not None, storage=storage):
        needs = estimate_gib(offload, quantize, text, transformer_gib=gguf_gib, graphs=graphs)
        plan = MemoryPlan(offload, quantize, text)
        if needs + HEADROOM_GIB <= free_gib:
            skipped = f"; faster choices need {', '.join(tried)}" if tried else ""
            return replace(plan, reason=f"{free_gib:.1f} GiB free on {where}, this needs ~{needs:.1f} GiB{skipped}")
        tried.append(f"{plan.describe()} ~{needs:.1f} GiB")
    return replace(plan, reason=f"only {free_gib:.1f} GiB free on {where}: even sequential offload (~{needs:.1f} GiB) "
                                "may not fit; close other programs using the GPU")


def _bitsandbytes_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def resolve_plan(options: Options, placement, *, gguf_bytes: int | None = None,
                 switching_loras: bool = False) -> MemoryPlan:
    """The memory plan for these options on this placement; CUDA-only choices fail clearly elsewhere.
    `switching_loras`: requests choose LoRAs from a --lora-dir."""
    import torch

    on_cuda = placement.device.startswith("cuda")
    if options.explicit_memory or options.memory == "off" or not on_cuda:
        if options.explicit_memory:
            why = "as asked"
        elif options.memory == "off":
            why = "--memory off"
        else:
            why = f"on {placement.device} nothing is offloaded or quantized unless asked"
        plan = MemoryPlan(options.offload or "none", options.quantize or "none",
                          bool(options.quantize_text_encoder), reason=why)
    else:
        index = torch.device(placement.device).index or 0
        capability = torch.cuda.get_device_capability(index)
        where = f"{torch.cuda.get_device_name(index)} (sm {capability[0]}.{capability[1]})"
        if options.gpu_memory is not None:
            where += f" within --gpu-memory {options.gpu_memory:g}"
        plan = plan_memory(free_bytes(placement.device, options.gpu_memory) / 1024**3,
                           fp8=capability >= FP8_COMPUTE_CAPABILITY and options.compile,
                           nf4=_bitsandbytes_installed(),
                           gguf_gib=gguf_bytes / 1024**3 if gguf_bytes else None,
                           storage=not options.compile and not switching_loras,
                           graphs=options.cuda_graphs, where=where)
    check_plan(plan, placement, gguf=gguf_bytes is not None, switching_loras=switching_loras,
               fuse_qkv=options.fuse_qkv, compile_mode=options.compile_mode if options.compile else None)
    return plan


def check_plan(plan: MemoryPlan, placement, *, gguf: bool = False, switching_loras: bool = False,
               fuse_qkv: bool = False, compile_mode: str | None = None) -> None:
    """Refuse what cannot run here, saying what to use instead."""
    on_cuda = placement.device.startswith("cuda")
    if compile_mode in CUDA_GRAPH_MODES and plan.offload not in RESIDENT_TRANSFORMER:
        # A CUDA graph replays reads of fixed addresses; offloading gives the weights new ones at
        # every trip to the GPU, where the replay would read whatever is left at the old ones.
        raise OptionError(f"--compile-mode {compile_mode} records CUDA graphs over weights that stay on the GPU, "
                          f"and this plan offloads them (offload {plan.offload}: {plan.reason}): use --compile-mode "
                          "default or max-autotune-no-cudagraphs, or a plan that keeps the transformer on the "
                          "GPU (--memory off, --quantize fp8, --offload t5)")
    if switching_loras and plan.quantize == "fp8-storage":
        # PEFT gives a LoRA loaded later the dtype of the layer it wraps: float8, which cannot multiply.
        raise OptionError("--lora-dir cannot switch LoRAs on --quantize fp8-storage weights (they would be stored "
                          "in float8 too): use --quantize fp8 or int8, or fuse one LoRA at start-up with "
                          "--lora PATH:SCALE")
    if switching_loras and fuse_qkv:
        # Fused attention runs to_qkv; adapters loaded later wrap to_q, to_k and to_v, which it skips.
        raise OptionError("--fuse-qkv with --lora-dir would skip the LoRAs' Q, K and V layers: leave --fuse-qkv "
                          "out (a start-up --lora is fused before and works with it)")
    if plan.quantize_text_encoder and plan.quantize == "none":
        raise OptionError("--quantize-text-encoder quantizes T5 the way --quantize says: add --quantize int8, fp8 "
                          "or nf4")
    if plan.quantize_text_encoder and plan.quantize == "fp8-storage":
        # FluxPipeline gives the prompt embeddings T5's weight dtype: float8 while stored.
        raise OptionError("--quantize-text-encoder cannot store T5 in float8 (fp8-storage): its output would be "
                          "float8 too; use --quantize fp8 or int8 to quantize T5, or leave --quantize-text-encoder out")
    if plan.offload == "t5" and plan.quantize_text_encoder:
        # Streamed in, T5 is copied block by block from pinned RAM: plain bf16 tensors, not quantized ones.
        raise OptionError("--offload t5 streams T5's bf16 weights to the GPU as it runs: leave "
                          "--quantize-text-encoder out, or keep a quantized T5 on the GPU with --offload none")
    if plan.offload != "none" and not on_cuda:
        raise OptionError(f"--offload {plan.offload} moves weights between a GPU and the CPU: it needs a CUDA GPU "
                          f"(this run is on {placement.device}); leave --offload at none")
    if plan.quantize == "nf4":
        if not on_cuda:
            raise OptionError("--quantize nf4 (bitsandbytes) needs a CUDA GPU; on a CPU use int8, fp8 or fp8-storage")
        if not _bitsandbytes_installed():
            raise OptionError("--quantize nf4 needs bitsandbytes: pip install 'flux-infer[gpu]'")
    if gguf and plan.quantize not in ("none",) and not plan.quantize_text_encoder:
        raise OptionError("a GGUF transformer is quantized already: --quantize applies to T5 only with a GGUF file, "
                          "add --quantize-text-encoder or leave --quantize at none")


def plan_quantized(plan: MemoryPlan) -> bool:
    """The transformer's weights are quantized tensors (not fp8-storage's plain float8 ones)."""
    return plan.quantize in ("int8", "fp8", "fp8-row", "nf4")


def quantization_configs(plan: MemoryPlan, placement) -> dict:
    """Load-time quantization configs per pipeline component, for int8/fp8/nf4 (fp8-storage is applied after)."""
    if plan.quantize in ("none", "fp8-storage"):
        return {}
    names = ["transformer"] + (["text_encoder_2"] if plan.quantize_text_encoder else [])
    from diffusers import BitsAndBytesConfig as DiffusersBnb
    from diffusers import TorchAoConfig as DiffusersAo
    from transformers import BitsAndBytesConfig as TransformersBnb
    from transformers import TorchAoConfig as TransformersAo

    if plan.quantize == "nf4":
        kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=placement.dtype)
        return {name: (DiffusersBnb if name == "transformer" else TransformersBnb)(**kwargs) for name in names}
    config = torchao_config(plan.quantize, placement)
    return {name: (DiffusersAo if name == "transformer" else TransformersAo)(config) for name in names}


def torchao_config(quantize: str, placement):
    """torchao's config for `--quantize int8`, `fp8` or `fp8-row` on this placement.

    torchao would also switch on inductor's coordinate-descent kernel tuning for the whole process
    when it quantizes (`set_inductor_config`); `--compile-mode` decides that instead (the
    max-autotune modes tune, the default mode starts quickly), for quantized models as for others.
    """
    import torch
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig,
                                      Int8WeightOnlyConfig, PerRow, PerTensor)

    if quantize == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    on_cuda = placement.device.startswith("cuda")
    if on_cuda and torch.cuda.get_device_capability(torch.device(placement.device)) >= FP8_COMPUTE_CAPABILITY:
        # float8 matmuls: faster as well as smaller
        return Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if quantize == "fp8-row" else PerTensor(), set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)  # float8 weights, matmuls in the compute dtype


def compile_failure(err: Exception) -> OptionError:
    """The OptionError for a torch.compile that failed (no C++ compiler on a CPU, no Triton on a GPU):
    torch's reason in one line. A backend's failure reads "backend='inductor' raised:" and then the
    inner error's own line; an InductorError starts with that line."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = lines[1] if lines[0].endswith("raised:") and len(lines) > 1 else lines[0]
    return OptionError(f"--compile could not compile the model here: {reason} (the log has torch's account); "
                       "leave --compile out to run it uncompiled")


def use_device(device: str) -> None:
    """Make a numbered GPU (`cuda:1`) the calling thread's current CUDA device. torch starts every
    thread on GPU 0, and some calls take no device: diffusers' group offload makes its copy stream
    with `torch.cuda.Stream()`, and waits on the current device's stream. Called by the thread that
    loads the model and by the generation thread. `cuda` (no number) is GPU 0 already."""
    if not device.startswith("cuda"):
        return
    import torch

    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)


def limit_gpu_memory(gpu_memory: float | None, device: str) -> None:
    """`--gpu-memory GIB`: cap what torch's allocator may take on this GPU, so the server can share
    the card; an allocation past the cap is an out-of-memory error, as on a card of that size."""
    if gpu_memory is None:
        return
    if not device.startswith("cuda"):
        raise OptionError(f"--gpu-memory caps a CUDA GPU's memory and this run is on {device}: leave it out")
    import torch

    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    if gpu_memory * 1024**3 > total:
        raise OptionError(f"--gpu-memory {gpu_memory:g} is more than this GPU has ({total / 1024**3:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(gpu_memory * 1024**3 / total, index)
    log.info("GPU memory capped at %g GiB of %.1f", gpu_memory, total / 1024**3)


def free_bytes(device: str, gpu_memory: float | None = None, kept: int = 0) -> int:
    """Free memory on `device`: the GPU's (within a --gpu-memory cap), or the machine's available RAM.
    `kept`: memory torch's allocator holds, unallocated, for one use only (CUDA graphs' pool); the
    driver's figure already leaves it out, the cap's (the cap less what is allocated) would not."""
    import torch

    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        free = torch.cuda.mem_get_info(index)[0]
        if gpu_memory is not None:
            free = min(free, int(gpu_memory * 1024**3) - torch.cuda.memory_allocated(index) - kept)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _standard_strides(_block, _args, outputs):
    """A single block's outputs as views with the strides of a tensor of their own. diffusers' block
    returns its text and image halves as slices of one tensor: in a batch of one they are laid out
    contiguously, but with another stride in the batch dimension than the first block's inputs, and
    torch.compile guards on every stride, so it would compile the block a second time (the
    same graph again, on every start). No copy is made for a batch of one."""
    return tuple(output.flatten().view(output.shape) for output in outputs)


def group_offload(pipe, onload_device, *, use_stream: bool = True, t5_only: bool = False) -> None:
    """Group offloading, one block at a time on the GPU; with `t5_only` (offload t5), of T5 alone,
    and every other component moves to the GPU to stay. diffusers groups the ModuleLists that are a
    module's direct children; T5's blocks sit one level down (`encoder.block`), so T5's `encoder` is
    the module offloaded, or all 9 GB of T5 would be one group. (Not `block_modules=["encoder"]` on
    T5 itself: with a stream, diffusers then nests two prefetch hooks, which fail on the same blocks.)
    T5's only other module, its input embedding, is the encoder's `embed_tokens` (tied). Each
    component is offloaded here, not by the pipeline's `enable_group_offload`, whose
    `exclude_modules` would first move T5 whole to the GPU. With a stream, diffusers pins the
    offloaded weights in RAM and copies the next block in while one runs."""
    import torch
    from diffusers.hooks import apply_group_offloading

    kwargs = dict(onload_device=onload_device, offload_device=torch.device("cpu"), offload_type="block_level",
                  num_blocks_per_group=1, use_stream=use_stream)
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module) or name == "text_encoder_2":
            continue
        if t5_only:
            component.to(onload_device)
        else:
            apply_group_offloading(component, **kwargs)
    apply_group_offloading(pipe.text_encoder_2.encoder, **kwargs)


def prepare_weights(transformer, options: Options, plan: MemoryPlan, compute_dtype) -> bool:
    """The transformer's weights as `options` and `plan` want them, in this order: Q, K and V fused
    into one projection (--fuse-qkv; not for quantized weights, which cannot be concatenated), then
    stored in float8 (fp8-storage), the fused projection with the rest. Start-up LoRAs are fused
    before this. Loading calls it as soon as the transformer is read, so that RAM never holds
    both models' bf16 weights; Runtime.apply calls it again, which changes nothing the second time
    (diffusers' fusing and store_in_float8 each do their work once). Returns whether Q, K, V are fused."""
    quantized = plan_quantized(plan) or getattr(transformer, "hf_quantizer", None) is not None
    fused = options.fuse_qkv and not quantized
    if fused:
        transformer.fuse_qkv_projections()
    if plan.quantize == "fp8-storage":
        store_in_float8(transformer, compute_dtype)
    return fused


def store_in_float8(transformer, compute_dtype) -> None:
    """fp8-storage: the transformer's weights kept in float8, cast to `compute_dtype` layer by layer
    as they run (diffusers' layerwise casting). Once: a transformer stored so already is left as it is."""
    import torch

    if any(parameter.dtype == torch.float8_e4m3fn for parameter in transformer.parameters()):
        return
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def in_ram(plan: MemoryPlan, component: str) -> bool:
    """Whether `component` (a pipeline component's name) is kept in RAM under `plan`, moved to the
    GPU only as it runs, rather than placed on the GPU once."""
    if plan.offload == "t5":
        return component == "text_encoder_2"
    return plan.offload != "none"


@dataclass
class Runtime:
    """The options applied to a pipeline, and the per-request parts of them."""

    pipeline: object
    options: Options
    plan: MemoryPlan
    device: str
    _cache_steps: int | None = field(default=None, repr=False)
    _calls: int = 0  # full transformer passes in the current image, counted when a cache is on
    graphs: object = field(default=None, repr=False)  # the transformer's cuda_graphs.GraphedForward, if any

    # -- start-up --------------------------------------------------------------------------------
    def apply(self, placement) -> Runtime:
        """Cast, fuse, place or offload, pick attention, hook the cache, compile. Logs each choice."""
        pipe, options = self.pipeline, self.options
        fused = prepare_weights(pipe.transformer, options, self.plan, placement.dtype)
        # A batch decodes one image at a time; then the weights go to the device, or are offloaded.
        pipe.vae.enable_slicing()
        self._place(placement)
        if options.attention:
            self._set_attention(options.attention, placement)
        if options.cache is not None:
            self._hook_cache()
        if options.compile:
            self._compile()
        log.info("options: %s; fused QKV %s; attention %s; cache %s; compile %s; VAE tiling %s",
                 self.plan.describe(), "on" if fused else "off",
                 options.attention or "native (torch SDPA)", options.cache.describe() if options.cache else "none",
                 f"on ({options.compile_mode} mode)" if options.compile else "off", options.vae_tiling)
        return self

    def _hook_cache(self) -> None:
        """The step cache, and a count of full transformer passes: a cached step skips the last
        block's attention. The counting hook runs outside compiled code (a graph break, which a
        cache makes anyway), so a Python counter is neither traced nor guarded on."""
        import torch

        attention = self.pipeline.transformer.single_transformer_blocks[-1].attn
        projection = attention.to_qkv if getattr(attention, "fused_projections", False) else attention.to_q
        projection.register_forward_hook(torch.compiler.disable(self._count_call))
        self._enable_cache(int(settings.NUM_INFERENCE_STEPS.default))

    def _compile(self) -> None:
        """torch.compile of the transformer's blocks (one graph per kind of block) and of the VAE
        decoder; with a CUDA graph mode, on a GPU, the transformer's forward is then replayed from
        CUDA graphs (flux_infer.cuda_graphs)."""
        import torch

        pipe, options, transformer = self.pipeline, self.options, self.pipeline.transformer
        mode = INDUCTOR_MODE[options.compile_mode]
        # torch.compile runs a module's hooks outside its compiled forward, each hook as a graph
        # of its own unless it is disabled there: this one makes no kernels to compile.
        standard_strides = torch.compiler.disable(_standard_strides)
        for block in transformer.single_transformer_blocks:
            block.register_forward_hook(standard_strides)
        # Offloading by group or by layer onloads each block's weights in a hook inside it, run
        # outside the graph (torch.compiler.disable()d): the graph splits there.
        onloading = self.plan.offload in ("group", "sequential")
        if onloading or options.cache is not None:
            # diffusers' hook functions (offloading's, a cache's) are shared by every hooked kind of
            # module and compiled once per kind and again per new size: past torch's limit (8 a
            # function) they would run uncompiled from then on.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       HOOKS_RECOMPILE_LIMIT)
        if options.cache is None:
            transformer.compile_repeated_blocks(fullgraph=not onloading, mode=mode)
        else:
            # The cache hooks are torch.compiler.disable()d, so the graph splits around them
            # (fullgraph off). The last single block stays eager: the step counter's hook lives
            # there, and compiled graphs do not call it.
            last = transformer.single_transformer_blocks[-1]
            for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                if block is not last:
                    block.compile(fullgraph=False, mode=mode)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.vae.decoder.compile(mode=mode)
        if options.cuda_graphs:
            if self.device.startswith("cuda"):
                from flux_infer.cuda_graphs import GraphedForward

                transformer.forward = self.graphs = GraphedForward(transformer.forward)
            else:
                log.info("--compile-mode %s: CUDA graphs need a CUDA GPU; on %s the compiled transformer runs "
                         "without them", options.compile_mode, self.device)

    def _place(self, placement) -> None:
        import torch

        pipe, offload = self.pipeline, self.plan.offload
        if offload == "model":
            pipe.enable_model_cpu_offload(device=placement.device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=placement.device)
        elif offload in ("group", "t5"):
            group_offload(pipe, torch.device(placement.device), t5_only=offload == "t5")
        else:
            pipe.to(placement.device)

    def _set_attention(self, backend: str, placement) -> None:
        """diffusers' attention backend, tried once on the device and in the dtype the images will
        use: a backend that is installed but cannot run there (cuDNN's on a CPU, or in float32)
        fails now, with what to do, rather than at every request."""
        import torch
        from diffusers import attention_backend
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        transformer = self.pipeline.transformer
        where = f"{placement.device} in {str(placement.dtype).removeprefix('torch.')}"
        heads, width = transformer.config.num_attention_heads, transformer.config.attention_head_dim
        if backend == FLOAT8_ATTENTION:
            self._set_float8_attention(placement, where, heads, width)
            return
        try:
            # diffusers' context manager checks the backend's package and puts the process-wide
            # active backend back afterwards (set_attention_backend sets it for good).
            with attention_backend(backend), torch.no_grad():
                probe = torch.randn(1, 64, heads, width, device=placement.device, dtype=placement.dtype)
                dispatch_attention_fn(probe, probe, probe)
            transformer.set_attention_backend(backend)
        except (RuntimeError, ImportError, ValueError) as err:
            raise OptionError(f"attention backend {backend} cannot run on {where}: {first_line(err)} "
                              "(leave --attention out for torch's own SDPA)") from None

    def _set_float8_attention(self, placement, where: str, heads: int, width: int) -> None:
        """cuDNN's float8 attention in every attention layer, once it has run here and come within
        fp8_attention.TOLERANCE of torch's SDPA on a test."""
        from flux_infer import fp8_attention

        leave = "(leave --attention out for torch's own SDPA)"
        try:
            fp8_attention.check_supported(placement.device, placement.dtype)
            error = fp8_attention.relative_error(placement.device, placement.dtype, heads, width)
        except fp8_attention.Float8AttentionUnavailable as err:  # with cuDNN's own reason, where it has one
            raise OptionError(f"--attention {FLOAT8_ATTENTION} cannot run on {where}: {err} {leave}") from None
        if not error <= fp8_attention.TOLERANCE:
            raise OptionError(f"--attention {FLOAT8_ATTENTION} came out {error:.0%} away from torch's SDPA on a test "
                              f"(float8's rounding is a few percent) on {where}: not used {leave}")
        self.pipeline.transformer.set_attn_processor(fp8_attention.processor())
        log.info("attention in float8 (cuDNN): %.1f%% from torch's SDPA on a test", 100 * error)

    def _enable_cache(self, steps: int) -> None:
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        spec, transformer = self.options.cache, self.pipeline.transformer
        if self._cache_steps is not None:
            transformer.disable_cache()
        if spec.kind == "fbcache":
            config = FirstBlockCacheConfig(threshold=spec.value)
        elif spec.kind == "taylorseer":
            config = TaylorSeerCacheConfig(cache_interval=int(spec.value))
        else:
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            config = MagCacheConfig(threshold=spec.value, mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps)
        transformer.enable_cache(config)
        self._cache_steps = steps

    def _count_call(self, *_):
        self._calls += 1

    @property
    def full_passes(self) -> int:
        """Full transformer passes so far in the current image (counted only with a cache)."""
        return self._calls

    def start_up_images(self, *, serving: bool) -> tuple | None:
        """What to generate at start-up, before the first request: (sizes, steps, images), or None.

        With --compile, every compiled graph at --compile-sizes (Options.warm_up_runs). Otherwise,
        when `serving` on a GPU that keeps the transformer: one image of 2 steps at the Space's
        default size, so that the first request does not pay for CUDA's lazy kernel loading and
        cuDNN's and cuBLAS's first choices (a first image took 0.8 s longer than the next on an H200,
        2.9 s in the machine's first process: bench/RESULTS.md). Not with offloading, which would move
        the weights for it (model offload: 20 s), nor on a CPU.
        """
        if self.options.compile:
            return (self.options.compile_sizes, *self.options.warm_up_runs())
        if serving and self.device.startswith("cuda") and self.plan.offload in RESIDENT_TRANSFORMER:
            return DEFAULT_COMPILE_SIZES, 2, 1
        return None

    # -- per request -----------------------------------------------------------------------------
    def before(self, request) -> None:
        """Set what depends on the request: VAE tiling, MagCache's step count; reset the counter and,
        on a GPU, the allocator's peak."""
        self._calls = 0
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        spec = self.options.cache
        if spec is not None and spec.kind == "magcache" and self._cache_steps != request.denoising_steps:
            self._enable_cache(request.denoising_steps)
        vae = self.pipeline.vae
        if self.tile(request.width, request.height):
            vae.enable_tiling()
        else:
            vae.disable_tiling()

    def tile(self, width: int, height: int) -> bool:
        mode = self.options.vae_tiling
        if mode != "auto":
            return mode == "on"
        scale = 2 if self.pipeline.vae.dtype.itemsize >= 4 else 1
        needs = width * height * DECODE_BYTES_PER_PIXEL * scale
        kept = self.graphs.pool_bytes if self.graphs is not None else 0
        if needs <= free_bytes(self.device, self.options.gpu_memory, kept):
            return False
        log.info("VAE tiling on for %dx%d: decoding needs ~%.1f GiB, more than is free", width, height, needs / 1024**3)
        return True

    @contextlib.contextmanager
    def call_context(self, request):
        """Around a pipeline call, what diffusers leaves undone there:
        - a cache's state context for edits: diffusers' FLUX edit pipelines, unlike FluxPipeline, open
          none, and a cache hook outside one fails;
        - when the call ends, however it ends, the step cache's state reset and, with model offload,
          every module back on the CPU (the pipeline's `maybe_free_model_hooks`). diffusers does both at
          the end of a finished FluxPipeline call only. A cancelled or failed call does neither: the
          next image would start from the cancelled one's TaylorSeer or MagCache state (other pixels
          for the same seed), and the 23 GB transformer would stay on the GPU beside the next
          request's text encoders. An edit pipeline made from these components resets the cache but
          frees its own offload hooks, which are none, so the VAE would stay on the GPU."""
        edit_cache = self.options.cache is not None and request.kind != "text-to-image"
        finished_text_to_image = False
        try:
            with self.pipeline.transformer.cache_context("cond") if edit_cache else contextlib.nullcontext():
                yield
            finished_text_to_image = request.kind == "text-to-image"
        finally:
            if not finished_text_to_image:
                self.pipeline.maybe_free_model_hooks()

    def after(self, request) -> dict:
        """What the cache did in the request just run (the transformer runs once per step) and, on a
        GPU, the most memory torch's allocator held during it (the weights on the GPU included)."""
        steps = request.denoising_steps
        stats = {"transformer_steps": steps, "cached_steps": 0}
        if self.options.cache is not None:
            computed = min(self._calls, steps)
            stats = {"transformer_steps": computed, "cached_steps": steps - computed}
            log.info("cache %s: ran the full transformer on %d of %d steps, skipped %d",
                     self.options.cache.describe(), computed, steps, steps - computed)
        if self.device.startswith("cuda"):
            import torch

            stats["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return stats
