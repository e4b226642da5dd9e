"""FLUX.1-dev on a GPU: every preset, step caches, the served path, memory caps and cold start.

One script for a short GPU window. It installs what the machine lacks from wheels brought along,
builds `--model random` (FLUX.1-dev's architecture, random weights: real shapes, kernels, seconds
and bytes) or loads `--model`, and writes each figure to `--out` as soon as it is measured
(`results.md`, a table a part; `results.jsonl`, a line a measurement), so a run cut short still
leaves all it finished. The card, torch, CUDA and library versions head the report.

Every measurement runs in its own process (its compiled graphs, its allocator cap and its peak
memory are its own); the parent polls nvidia-smi for the card's peak while it runs, and for its SM
clock and power while it is busy (a row's note: a busier card may clock lower). Ratios are to
bf16 eager measured in the same run.

Parts (`--parts`, comma-separated; each sized for about 5 minutes on an H100 at 1024x1024, 28 steps):
- presets: bf16 eager, fused QKV, fp8, int8, attention backends (cuDNN, FA3, FA2, cuDNN's float8
  attention; those not installed say so): build/load s, warm-up s, first image, median of --runs,
  s/step, peak memory;
- compile: --compile in bf16, with fp8, with CUDA graphs (bf16 and fp8), autotuned (bf16 and fp8),
  with fused QKV, with cuDNN attention (bf16 and fp8) and with fp8 and float8 attention (with and
  without CUDA graphs), the same figures (compiling takes minutes; `--only` picks some);
- offload: the transformer in int8 with T5 streamed in (`--offload t5`, each image a new prompt, so
  T5's trip is in every image), model offload and group offload, the same figures;
- steps: the cost of a full step and of a step a cache skipped (fbcache, taylorseer, magcache;
  skip counts on random weights mean nothing, the costs do);
- served: `flux-infer serve` driven like the page (event stream, every preview fetched) and by
  gradio_client, previews latent (the page's images as lossless WebP, the default, and as PNG) and a
  random-weight TAEF1, and one OpenAI-route request,
  against the direct call (needs the `server` wheels), each Gradio door's time split by Gradio's own
  timings (GRADIO_PROFILING: its event, the handler in it, its postprocessing, and the time outside
  it: event stream, downloads, client); then what serving adds, each part timed
  apart: a preview decoded on the device (latent map, TAEF1 as served with channels_last weights,
  TAEF1 on 2x2-pooled latents or with NCHW weights), the VAE decode (NCHW, channels_last) and the
  final PNG and WebP encoding;
- graphs: one server with CUDA graphs (`--compile --compile-mode reduce-overhead`) asked through
  each door in turn: the graphs its warm-up recorded must serve them all (graphs recorded after the
  start-up, each door's first image against its second, the card's memory door to door);
- memory: `--memory auto` within `--gpu-memory` 24, 16, 12 and 8 GiB: the plan, s/image, peaks;
  nf4 needs the `nf4` wheels, else 12 GiB plans group offload; 8 GiB plans group offload of an
  fp8-storage transformer;
- lean: other plans under the 8 GiB cap (group offload of a bf16 transformer, twice the bytes a step
  of fp8-storage's, or of an int8 one; nf4 transformer and T5 with model offload; nf4 transformer on
  the GPU with T5 streamed in and the VAE tiled), against what --memory auto picks there;
- cold: the random pipeline saved as a diffusers folder, page cache dropped, raw read time of its
  safetensors against load_pipeline's time to ready (cold and warm cache, cold with diffusers'
  parallel shard loading, and cold onto a numbered device, `cuda:0`; imports timed apart); time to a
  first image on a second `--compile` start with a kept TORCHINDUCTOR_CACHE_DIR.

On the GPU machine (torch present, our other dependencies not):
    ../shared/gpu/fetch-wheels nf4 .whl        # here, before the call; `server` for the served part
    # the float8 attention presets (--attention cudnn-fp8) also need the module cudnn, 4.6 MiB:
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d .whl nvidia-cudnn-frontend==1.27.0
    python3 bench/gpu.py --wheels .whl --out "$OUT" --parts presets
Check the whole script on a CPU first (random-small, 256x256, 4 steps, 1 run):
    python bench/gpu.py --allow-cpu --out /tmp/gpu-check \
        --parts presets,compile,offload,steps,served,graphs,memory,lean,cold,lora

`--only NAMES` narrows the preset parts to some presets, measured in that order (bf16 eager is always
measured first, for the ratios); `--profile [PARTS]` adds a torch.profiler account of one more image
per preset, cap or lean plan (in PARTS only, when given): the kernels by GPU time in OUT/profiles/
(4 denoising steps from an image's middle), and ms per step in matmuls, attention and the rest (and
the kernels' share of a step: the rest is launch waits), to see where a preset stands against the
arithmetic floor. Compiling children log their recompilations
and graph breaks (counted in the table); a child near its time limit writes its stacks to
children.log. `--deadline SECONDS` bounds the measurements: each measurement child (and
bench/lora.py's) gets at most what is left, and none starts that could not finish, so a GPU window's
run ends by itself with every log kept (saving the cold part's folder and the served part's servers
are not bounded by it).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib.util
import json
import logging
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1",
                  PYTHONUNBUFFERED="1")

COMPILE_GOAL_S = 3.9  # --compile, bf16, one H100
FP8_GOAL_S = 2.4  # fastest preset whose only loss is fp8
SERVED_GOAL = 1.03
CAP_TIME_GOAL = 3.0  # 8 GiB within 3x bf16 on a free card
COLD_GOAL = 1.3  # cold load within 1.3x the raw read
SECOND_START_GOAL_S = 60

# Preset: the flags `flux-infer serve` would get.
PRESETS = {
    "bf16": "--memory off --no-fuse-qkv",
    "fused-qkv": "--memory off --fuse-qkv",
    "compile": "--memory off --compile",
    "compile-fused": "--memory off --compile --fuse-qkv",
    "compile-cudagraphs": "--memory off --compile --compile-mode reduce-overhead",
    "compile-autotune": "--memory off --compile --compile-mode max-autotune-no-cudagraphs",
    "fp8": "--quantize fp8",
    "fp8-compile": "--quantize fp8 --compile",
    "fp8-compile-autotune": "--quantize fp8 --compile --compile-mode max-autotune-no-cudagraphs",
    # fp8 halves a step's GPU time, so the CPU's kernel launches weigh more: CUDA graphs replay them
    # (the transformer's forward recorded once, over its blocks compiled one by one)
    "fp8-compile-cudagraphs": "--quantize fp8 --compile --compile-mode reduce-overhead",
    # or launches them from C++ rather than Python (inductor's cpp_wrapper; PRESET_ENV), with the
    # blocks still compiled one by one
    "fp8-compile-cpp-wrapper": "--quantize fp8 --compile",
    # a scale per row: each activation's scaling is one pass over it, fused with what made it, where
    # a scale per tensor first needs the whole tensor's largest value (a reduction of its own)
    "fp8-row-compile": "--quantize fp8-row --compile",
    "fp8-row-compile-cudagraphs": "--quantize fp8-row --compile --compile-mode reduce-overhead",
    # flux-fast's recipe but for its attention (FA3 in float8, not installable here): per-row fp8,
    # kernels autotuned while compiling, CUDA graphs
    "fp8-row-compile-max-autotune": "--quantize fp8-row --compile --compile-mode max-autotune",
    # float8 attention too (cuDNN's, through nvidia-cudnn-frontend): the part of an fp8 step still in bf16
    "fp8-compile-fp8-attention": "--quantize fp8 --compile --attention cudnn-fp8",
    "fp8-compile-cudagraphs-fp8-attention": "--quantize fp8 --compile --compile-mode reduce-overhead "
                                            "--attention cudnn-fp8",
    "fp8-row-compile-cudagraphs-fp8-attention": "--quantize fp8-row --compile --compile-mode reduce-overhead "
                                                "--attention cudnn-fp8",
    "compile-cudnn": "--memory off --compile --attention _native_cudnn",
    "fp8-compile-cudnn": "--quantize fp8 --compile --attention _native_cudnn",
    "int8": "--quantize int8",
    "cudnn-attention": "--memory off --attention _native_cudnn",
    "flash3-attention": "--memory off --attention _flash_3",
    "flash-attention": "--memory off --attention flash",
    "fp8-attention": "--memory off --attention cudnn-fp8",
    "t5-offload": "--quantize int8 --offload t5",
    "model-offload": "--offload model",
    "group-offload": "--offload group",
}
# Environment a preset's child runs with, beside its flags.
PRESET_ENV = {"fp8-compile-cpp-wrapper": {"TORCHINDUCTOR_CPP_WRAPPER": "1"}}
# The presets each goal is met by: bf16 with any compile mode; any preset whose only loss is fp8.
COMPILE_PRESETS = ("compile", "compile-fused", "compile-cudagraphs", "compile-autotune", "compile-cudnn")
FP8_PRESETS = ("fp8", "fp8-compile", "fp8-compile-autotune", "fp8-compile-cudagraphs", "fp8-compile-cpp-wrapper",
               "fp8-compile-cudnn", "fp8-row-compile", "fp8-row-compile-cudagraphs", "fp8-row-compile-max-autotune",
               "fp8-compile-fp8-attention", "fp8-compile-cudagraphs-fp8-attention",
               "fp8-row-compile-cudagraphs-fp8-attention")
PARTS = {
    "presets": ["bf16", "fused-qkv", "fp8", "int8", "cudnn-attention", "flash3-attention", "flash-attention",
                "fp8-attention"],
    "compile": ["bf16", "compile", "fp8-compile", "compile-cudagraphs", "compile-autotune", "fp8-compile-autotune",
                "fp8-compile-cudagraphs", "fp8-compile-cpp-wrapper", "compile-fused", "compile-cudnn",
                "fp8-compile-cudnn", "fp8-row-compile", "fp8-row-compile-cudagraphs", "fp8-row-compile-max-autotune",
                "fp8-compile-fp8-attention", "fp8-compile-cudagraphs-fp8-attention",
                "fp8-row-compile-cudagraphs-fp8-attention"],
    "offload": ["bf16", "t5-offload", "model-offload", "group-offload"],
    "steps": ["bf16"],
    "served": [],
    "graphs": [],
    "memory": ["bf16"],
    "lean": ["bf16"],
    "cold": [],
    "lora": [],
}
# Parts whose measurements --profile accounts for: those with a goal on the time per image (the step
# costs, the served path and loading are measured directly).
PROFILED_STEPS = 4  # denoising steps a profile records
PROFILED_PARTS = ("presets", "compile", "offload", "memory", "lean")
# Backends that need a package torch does not bring; without it the preset is not measured.
MODULES = {"flash3-attention": "flash_attn_interface", "flash-attention": "flash_attn",
           **{name: "cudnn" for name, flags in PRESETS.items() if "cudnn-fp8" in flags}}
CACHES = {"fbcache": "--cache fbcache:1000", "taylorseer": "--cache taylorseer:4", "magcache": "--cache magcache:1000"}
CAPS_GIB = (24, 16, 12, 8)
# --deadline: a child gets what is left less this margin (for writing the report), and none starts
# with less than MIN_CHILD_S left (too short for a FLUX.1-dev build and one image).
DEADLINE_MARGIN_S = 10
MIN_CHILD_S = 30


# -- the machine ----------------------------------------------------------------------------------

def bench_module(name: str):
    """A module beside this script (common, previews), however this file was loaded."""
    folder = str(REPO / "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def ensure_dependencies(wheels: Path | None) -> None:
    """Install the wheels brought along into a private folder when diffusers is missing; the
    measurement processes inherit the path."""
    paths = [str(REPO)]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        if not wheels or not any(wheels.glob("*.whl")):
            raise SystemExit("diffusers is not installed and no wheels were given: fetch them with "
                             "../shared/gpu/fetch-wheels nf4 .whl and pass --wheels .whl") from None
        site = Path(tempfile.gettempdir()) / "flux-bench-site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))],
                       check=True)
        # Their bytecode, written once on every core: each measurement process imports them anew, and
        # where Python writes no bytecode itself (PYTHONDONTWRITEBYTECODE) each compiled every module
        # from source again (torchao's SyntaxWarning, printed when compiling, was in every process's
        # log). On a 2-core CPU that was 1.1 s of diffusers' 4.4 s import.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(site)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        paths.insert(0, str(site))
        sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def versions() -> dict:
    import importlib.metadata as metadata

    import torch

    found = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA GPU)",
             "torch": torch.__version__, "cuda": torch.version.cuda or "none", "python": sys.version.split()[0]}
    # Pillow: below 11.3 the save parameters set on the page's images are ignored (images.quick_to_encode).
    for name in ("diffusers", "transformers", "torchao", "bitsandbytes", "gradio", "pillow"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    if torch.cuda.is_available():
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
        try:
            found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return found


class SmiPeak:
    """The card's used memory, polled by nvidia-smi while a measurement runs, above what was used before;
    and its SM clock and power draw while it is busy (90% utilization or more): a card kept busier
    can run at lower clocks, which slows every kernel alike."""

    BUSY_PERCENT = 90

    def __init__(self):
        self.peak = None
        self.busy = []  # (SM MHz, watts) of the samples taken while the card was busy
        self._stop = threading.Event()
        self._base = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True) if self._base is not None else None

    @staticmethod
    def _sample() -> dict | None:
        """memory.used (GiB), utilization.gpu (%), clocks.sm (MHz), power.draw (W); a field the card
        does not report ("[N/A]") is None."""
        fields = ("memory.used", "utilization.gpu", "clocks.sm", "power.draw")
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=10).stdout
            values = out.strip().splitlines()[0].split(",")
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

        def number(text):
            try:
                return float(text)
            except ValueError:
                return None

        sample = dict(zip(fields, map(number, values)))
        if sample.get("memory.used") is None:
            return None
        sample["memory.used"] /= 1024  # MiB -> GiB
        return sample

    @classmethod
    def _used(cls) -> float | None:
        sample = cls._sample()
        return None if sample is None else sample["memory.used"]

    def _poll(self):
        while not self._stop.wait(0.25):
            self.take(self._sample())

    def take(self, sample: dict | None) -> None:
        if sample is None:
            return
        self.peak = max(self.peak or 0.0, sample["memory.used"] - self._base)
        if (sample["utilization.gpu"] or 0) >= self.BUSY_PERCENT and sample["clocks.sm"] is not None:
            self.busy.append((sample["clocks.sm"], sample["power.draw"]))

    def busy_figures(self) -> dict:
        """The SM clock (median and lowest) and power (median) over the busy samples; {} without any."""
        if not self.busy:
            return {}
        clocks = [clock for clock, _ in self.busy]
        watts = [w for _, w in self.busy if w is not None]
        return {"busy_sm_mhz": statistics.median(clocks), "busy_sm_mhz_min": min(clocks),
                "busy_watts": statistics.median(watts) if watts else None, "busy_samples": len(self.busy)}

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        if self._thread:
            self._thread.join()


# -- one measurement, in its own process ----------------------------------------------------------

def measure_one(flags: str, *, model: str, device: str | None, size: int, steps: int, runs: int,
                step_times: bool, started: float, plain: bool = False, profile: str | None = None,
                taef1: str | None = None, image: str | None = None) -> dict:
    """Load with `flags`, warm up, time a first image and `runs` more; the row as a dict.

    `plain`: load as plain diffusers does (`from_pretrained` into RAM, then `.to(device)`), flags
    ignored, for the cold-start comparison. `profile`: a file for torch.profiler's account of one
    more image (the kernels by device time, and the time per step in matmuls, attention and the rest).
    `taef1`: a TAEF1 folder; the row then has `serving_costs` (previews, the VAE decode and the final
    encoding, each timed apart). `image`: a PNG file for the first image (the same seed and prompt in
    every measurement), to be compared with bf16 eager's.
    """
    import torch

    prompt = bench_module("common").prompt

    from flux_infer import cli
    from flux_infer.inference import FluxInference, build_request
    from flux_infer.loading import load_pipeline, resolve_placement
    from flux_infer.tuning import DENOISE_GIB, MemoryPlan, Runtime

    options = cli._options(cli._parser().parse_args(["generate", "x", *shlex.split(flags)]))
    cuda = torch.cuda.is_available() and device != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    began = time.perf_counter()
    # diffusers' and transformers' imports (FluxPipeline's pull in both), timed apart from the load
    from diffusers import FluxPipeline

    import_s = time.perf_counter() - began
    began = time.perf_counter()
    if plain:
        placement = resolve_placement(device)
        pipeline = FluxPipeline.from_pretrained(model, dtype=placement.dtype).to(placement.device)
        runtime = Runtime(pipeline, options, MemoryPlan(reason="plain diffusers: from_pretrained, then .to()"),
                          placement.device)
    else:
        pipeline, _, placement, runtime, _ = load_pipeline(model, device=device, options=options)
    sync()
    build_s = time.perf_counter() - began
    inference = FluxInference(pipeline, runtime=runtime)
    from torch._dynamo.utils import counters

    inductor = dict(counters["inductor"])
    began = time.perf_counter()
    if options.compile:
        inference.warm_up(((size, size),), *options.warm_up_runs())
    sync()
    warm_s = time.perf_counter() - began
    # Graphs inductor compiled afresh, and those it took from its cache on disk (what an earlier
    # child of the run compiled the same way): a warm-up's seconds mean a cold compile only without these.
    graphs = {kind: counters["inductor"][f"fxgraph_cache_{key}"] - inductor.get(f"fxgraph_cache_{key}", 0)
              for kind, key in (("compiled", "miss"), ("cached", "hit"))}
    steps_seen = []  # (seconds, full transformer pass?) per step after the first
    previous = {}  # the last step's end and the transformer passes counted by then

    def on_step(step):
        sync()
        now = time.perf_counter()
        calls = runtime.full_passes if options.cache is not None else step.index  # no cache: every step is full
        if step.index > 1:
            steps_seen.append((now - previous["at"], calls > previous["calls"]))
        previous.update(at=now, calls=calls)

    def one(seed: int, each_step=None):
        request = build_request(prompt(seed), seed=seed, randomize_seed=False, width=size, height=size,
                                num_inference_steps=steps)
        began = time.perf_counter()
        result = inference.run(request, on_step=each_step or (on_step if step_times else None))
        sync()
        return time.perf_counter() - began, result

    first_s, result = one(0)
    first_image_at = time.time() - started
    if image:
        result.image.save(image, compress_level=1)  # lossless, and quick to write
    steps_seen.clear()
    steady = [one(seed) for seed in range(1, runs + 1)]
    times = [seconds for seconds, _ in steady]
    median = statistics.median(times) if times else first_s
    # Each image's allocator peak, as the server logs it (flux_infer.tuning.Runtime): the steady images'
    peaks = [r.gpu_peak_bytes for _, r in steady or [(first_s, result)] if r.gpu_peak_bytes is not None]
    row = dict(flags=flags, plan=runtime.plan.describe(), plan_reason=runtime.plan.reason, import_s=import_s,
               build_s=build_s, warm_s=warm_s, warm_up_graphs=graphs if options.compile else None,
               first_s=first_s, median_s=median, times=times,
               per_step_s=median / steps,
               cached_steps=result.cached_steps, first_image_after_start_s=first_image_at,
               peak_alloc_gib=max(peaks) / 1024**3 if peaks else None,
               # The last image's (its peak is reset at each request): with CUDA graphs, their pool's
               # memory is reserved for the replays but not allocated between them.
               peak_reserved_gib=torch.cuda.max_memory_reserved() / 1024**3 if cuda else None,
               graphs_pool_gib=runtime.graphs.pool_bytes / 1024**3 if runtime.graphs is not None else None,
               graphs_pool_planned_gib=DENOISE_GIB,
               peak_ram_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # KiB on Linux
               device=placement.device, dtype=placement.dtype_name)
    row.update(after_image_check(inference, result, size=size, steps=steps, cuda=cuda))
    if taef1:
        resident = runtime.plan.offload == "none"  # offloaded, its decode would time the weights' transfers too
        row.update(serving_costs=serving_costs(result.image, taef1, placement, vae=pipeline.vae if resident else None,
                                               size=size, sync=sync))
    if profile:
        # Denoising steps from the middle of one more image (not its text encoding or VAE decode):
        # PROFILED_STEPS of them, after one to warm the profiler up. Reading a whole image's
        # events took a minute of a GPU run's time.
        active = min(PROFILED_STEPS, max(steps - 2, 1))
        window = torch.profiler.schedule(skip_first=max((steps - active) // 2 - 1, 0), wait=0, warmup=1,
                                         active=active, repeat=1)

        def profiled():  # torch.profiler records the operators of its own thread: the generation's
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                        ([torch.profiler.ProfilerActivity.CUDA] if cuda else []),
                                        schedule=window) as profiler:
                def each_step(_step):
                    sync()  # the step's kernels ran inside its window
                    profiler.step()

                one(runs + 1, each_step)
            return profiler

        profiler = inference.on_generation_thread(profiled)
        row.update(profile_ms_per_step=write_profile(profiler, Path(profile), steps=active, cuda=cuda),
                   profile_file=profile, profiled_steps=active)
    if step_times:
        full = [s for s, computed in steps_seen if computed]
        skipped = [s for s, computed in steps_seen if not computed]
        row.update(full_step_s=statistics.median(full) if full else None,
                   skipped_step_s=statistics.median(skipped) if skipped else None,
                   full_steps=len(full), skipped_steps=len(skipped))
    return row


def after_image_check(inference, result, *, size: int, steps: int, cuda: bool) -> dict:
    """An image-to-image edit of `result` (4 steps at strength 0.5: 2 run, at the measured size so
    compiled graphs are reused) and a text-to-image cancelled after its second step, each followed by
    the GPU memory still allocated: both must leave the GPU as a finished image does (with model
    offload: nothing held)."""
    import threading
    from dataclasses import replace

    import torch

    from flux_infer.inference import GenerationCancelled, build_request

    def held():
        return torch.cuda.memory_allocated() / 1024**3 if cuda else None

    after = {"image": held()}
    request = build_request(bench_module("common").PROMPT, seed=0, randomize_seed=False, width=size, height=size,
                            num_inference_steps=steps)
    began = time.perf_counter()
    inference.run(replace(request, image=result.image, strength=0.5, num_inference_steps=4))
    edit_s = time.perf_counter() - began
    after["edit"] = held()
    cancel = threading.Event()
    try:
        inference.run(request, on_step=lambda step: step.index >= 2 and cancel.set(), cancel=cancel)
        cancelled = False
    except GenerationCancelled:
        cancelled = True
    after["cancel"] = held()
    return dict(edit_s=edit_s, cancelled=cancelled, held_after_gib=after)


def serving_costs(image, taef1: str, placement, *, vae, size: int, sync) -> dict:
    """Milliseconds each, timed apart (median of 5 after one): a preview decoded on the device in the
    step callback (the denoising waits for it), for the latent map and TAEF1 (channels_last weights,
    as served; also given latents pooled 2x2, a quarter of its work, and with NCHW weights); the
    pipeline's VAE decode (part of every image; NCHW and channels_last; left out when `vae` is None);
    the final image's encoding on the CPU, PNG (what /infer and the OpenAI route send) and WebP."""
    import torch
    import torch.nn.functional as F

    from flux_infer.images import encode
    from flux_infer.previews import LatentPreview, load_preview_decoder

    def ms(call) -> float:
        times = []
        for _ in range(6):
            began = time.perf_counter()
            with torch.no_grad():
                call()
            sync()
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:]) * 1000

    latents = torch.randn(16, size // 8, size // 8, device=placement.device, dtype=placement.dtype)
    pooled = F.avg_pool2d(latents[None], 2)[0]
    latent_map = LatentPreview()
    decoder = load_preview_decoder("taef1", taef1=taef1, device=placement.device, dtype=placement.dtype)
    costs = {"latent preview": ms(lambda: latent_map(latents)), "taef1 preview": ms(lambda: decoder(latents)),
             "taef1 preview, pooled latents": ms(lambda: decoder(pooled))}
    decoder.vae.to(memory_format=torch.contiguous_format)
    costs["taef1 preview, NCHW weights"] = ms(lambda: decoder(latents))
    if vae is not None:
        vae_latents = latents[None].to(vae.dtype)
        costs["vae decode"] = ms(lambda: vae.decode(vae_latents, return_dict=False))
        vae.to(memory_format=torch.channels_last)
        costs["vae decode, channels_last"] = ms(lambda: vae.decode(vae_latents, return_dict=False))
        vae.to(memory_format=torch.contiguous_format)  # as it was, for what the child measures next
    costs.update({"png encode": ms(lambda: encode(image, "png")), "webp encode": ms(lambda: encode(image, "webp"))})
    return costs


# Kernel (or, on a CPU, operator) names by what they compute, for the profile's per-step summary.
KERNEL_KINDS = (("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
                ("matmul", re.compile(r"gemm|matmul|cutlass|nvjet|xmma|cublas|scaled_mm|aten::(mm|addmm|bmm|linear)\b",
                                      re.I)))


def write_profile(profiler, path: Path, *, steps: int, cuda: bool) -> dict:
    """Write the top of torch.profiler's table to `path`; return milliseconds per step by kind
    (matmul, attention, other), from the GPU's kernels (a CPU's operators without one)."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort, row_limit=40, max_name_column_width=90))
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for event in events:
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros <= 0 or (cuda and event.device_type != DeviceType.CUDA):
            continue
        kind = next((name for name, pattern in KERNEL_KINDS if pattern.search(event.key)), "other")
        totals[kind] += micros
    return {kind: micros / 1000 / steps for kind, micros in totals.items()}


class Run:
    """One invocation: the settings, the output folder, and the figures so far."""

    def __init__(self, args, *, began: float | None = None):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {}
        self.eager: dict | None = None
        self.began = time.monotonic() if began is None else began  # --deadline counts from here

    def child_timeout(self) -> tuple[float, str] | None:
        """Seconds the next child may take and the flag that bounds it (--timeout, or what is left of
        --deadline less DEADLINE_MARGIN_S); None when less than MIN_CHILD_S is left."""
        a = self.args
        if a.deadline is None:
            return a.timeout, "--timeout"
        left = a.deadline - (time.monotonic() - self.began) - DEADLINE_MARGIN_S
        if left < MIN_CHILD_S:
            return None
        return (a.timeout, "--timeout") if a.timeout <= left else (left, "--deadline")

    def deadline_reached(self) -> str:
        """Why a child was not started (child_timeout() gave None)."""
        return f"--deadline {self.args.deadline:.0f} s reached"

    def helper(self, command: list[str]) -> subprocess.CompletedProcess | str:
        """Run a child that is not a measurement (a pipeline save, another bench script) within
        --timeout and --deadline as measurements are: its result, or why it did not run or finish
        (with the end of what it printed when it timed out)."""
        limit = self.child_timeout()
        if limit is None:
            return self.deadline_reached()
        timeout, bound = limit
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            printed = _text(err.output)[-2000:].strip()
            return f"timed out after {timeout:.0f} s ({bound})" + (f"\n```\n{printed}\n```" if printed else "")

    def write(self, text: str) -> None:
        print(text, flush=True)
        with open(self.out / "results.md", "a") as report:
            report.write(text + "\n")

    def keep_server_log(self, server, name: str) -> None:
        """The end of a server's log, appended to servers.log: one file for every server of the run."""
        with open(self.out / "servers.log", "ab") as kept:
            kept.write(f"### server {name}\n".encode() + server.log_path.read_bytes()[-200_000:] + b"\n")

    def record(self, part: str, name: str, row: dict) -> None:
        with open(self.out / "results.jsonl", "a") as lines:
            lines.write(json.dumps({"part": part, "name": name, **row}) + "\n")

    def measure(self, part: str, name: str, flags: str, *, model: str | None = None, runs: int | None = None,
                step_times: bool = False, env: dict | None = None, plain: bool = False,
                taef1: str | None = None, device: str | None = None) -> dict | None:
        """Run one measurement in a child process (on `device`, default the run's); the row, or None
        (reason written) when it could not run.

        A compiling child logs its recompilations and graph breaks (TORCH_LOGS), counted in the row;
        a child still running near its time limit writes its threads' stacks to children.log first."""
        a = self.args
        limit = self.child_timeout()
        if limit is None:
            self.write(f"| {name} | `{flags}` | not measured: {self.deadline_reached()} |")
            self.record(part, name, {"flags": flags, "error": "--deadline reached"})
            return None
        timeout, bound = limit
        runs = a.runs if runs is None else runs
        slug = f"{part}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}"
        profile = self.out / "profiles" / f"{slug}.txt" if a.profile and part in a.profile and runs > 0 else None
        image = Path(a.scratch) / "images" / f"{slug}.png"  # beside the run's scratch files, not brought back
        image.parent.mkdir(parents=True, exist_ok=True)
        spec = dict(flags=flags, model=model or a.model, device=device or a.device, size=a.size, steps=a.steps,
                    runs=runs, step_times=step_times, started=time.time(), plain=plain,
                    profile=profile and str(profile), taef1=taef1, image=str(image),
                    stacks_after=max(timeout - 15, 1))
        compiling = "--compile" in flags
        env = {**os.environ, **({"TORCH_LOGS": "recompiles,graph_breaks"} if compiling else {}),
               **(env or {})}
        began = time.perf_counter()
        with SmiPeak() as smi:
            try:
                child = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                       text=True, env=env, timeout=timeout)
            except subprocess.TimeoutExpired as err:  # its output is bytes, whatever text= said
                child = subprocess.CompletedProcess(err.cmd, 124, _text(err.stdout), _text(err.stderr) +
                                                    f"\ntimed out after {timeout:.0f} s ({bound})")
        wall = time.perf_counter() - began
        with open(self.out / "children.log", "a") as log:
            log.write(f"### {part} {name}: {flags}\n{child.stderr[-20000:]}\n")
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            reason = failure_reason(child.stderr, child.returncode)
            self.write(f"| {name} | `{flags}` | could not run: {reason} |")
            self.record(part, name, {"flags": flags, "error": reason})
            return None
        row = {**json.loads(lines[-1]), "process_s": wall, "peak_smi_gib": smi.peak, **smi.busy_figures(),
               "image": str(image)}
        if self.eager:  # bf16 eager's own row is measured before it is the baseline
            row["image_vs_eager"] = image_difference(image, Path(self.eager["image"]))
        if compiling:
            # A CUDA graph mode logs each graph it records: one a size, at the warm-up.
            row.update(recompiles=child.stderr.count("Recompiling function"),
                       graph_breaks=len(re.findall(r"^.*Graph break", child.stderr, re.M)),
                       cuda_graphs=child.stderr.count(CUDA_GRAPH_RECORDED))
        self.record(part, name, row)
        self.rows[name] = row
        return row

    def baseline(self, part: str) -> dict | None:
        """bf16 eager, measured once per run (the first part that needs it)."""
        if self.eager is None:
            self.eager = self.measure(part, "bf16", PRESETS["bf16"])
        return self.eager

    def ratio(self, value: float | None) -> str:
        if value is None or not self.eager:
            return ""
        return f"{value / self.eager['median_s']:.2f}"


def image_difference(image: Path, eager: Path) -> dict:
    """How far `image` is from bf16 eager's image of the same seed and prompt, in 8-bit levels: the
    mean and the largest absolute difference of a channel. A compiled preset's should be a level or
    two (kernels that sum in another order); a quantized one's says what the quantization costs (on
    random weights, whose activations are not a trained model's)."""
    import numpy as np
    from PIL import Image

    pixels = [np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in (image, eager)]
    if pixels[0].shape != pixels[1].shape:
        return {}
    difference = np.abs(pixels[0] - pixels[1])
    return {"mean": float(difference.mean()), "max": int(difference.max())}


# What flux_infer.cuda_graphs logs as it records a CUDA graph of the transformer.
CUDA_GRAPH_RECORDED = "CUDA graph for inputs of"


# A traceback's last line names the exception ("torch._dynamo.exc.TorchRuntimeError: ..."); torch's
# errors go on with an explanation and advice lines ("Set TORCHDYNAMO_VERBOSE=1 ...").
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def failure_reason(stderr: str, returncode: int) -> str:
    """One line saying why a child failed: its last exception (with torch's explanation line when it
    gives one), else its last line (a timeout says so there), else its exit status."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return f"exit {returncode}"
    if returncode != 124:
        found = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
        if found:
            reason = lines[found[-1]]
            following = lines[found[-1] + 1] if found[-1] + 1 < len(lines) else ""
            if following.strip().startswith("Explanation:"):
                reason += " " + following.strip()
            return reason[:400]
    return lines[-1][:300]


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _gib(value) -> str:
    return "" if value is None else f"{value:.1f}"


PRESET_HEADER = ("| preset | flags | plan | build s | warm-up s | first image s | steady s (median) | s/step | "
                 "vs bf16 eager | peak GiB (torch) | peak GiB (nvidia-smi) | peak RAM GiB | recompiles / graph breaks "
                 "/ CUDA graphs recorded |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def preset_line(run: Run, name: str, row: dict) -> str:
    compiled = (f"{row['recompiles']} / {row['graph_breaks']} / {row.get('cuda_graphs', 0)}"
                if "recompiles" in row else "")
    flags = " ".join([*(f"{key}={value}" for key, value in PRESET_ENV.get(name, {}).items()), row["flags"]])
    return (f"| {name} | `{flags}` | {row['plan']} | {row['build_s']:.1f} | {row['warm_s']:.1f} | "
            f"{row['first_s']:.2f} | {row['median_s']:.3f} | {row['per_step_s']:.3f} | {run.ratio(row['median_s'])} | "
            f"{_gib(row['peak_alloc_gib'])} | {_gib(row['peak_smi_gib'])} | {_gib(row['peak_ram_gib'])} | {compiled} |"
            + row_notes(row))


def row_notes(row: dict) -> str:
    """Lines under a preset's row: where each step went (with --profile), and the edit and cancel check."""
    ms = row.get("profile_ms_per_step")
    profile = ""
    if ms:
        # The kernels' time against a steady image's per step (which holds its share of the text
        # encoding and VAE decode too): what is missing, the GPU waited for the CPU (its kernel
        # launches, the Python between them).
        kernels, step = sum(ms.values()), row["per_step_s"] * 1000
        profile = (f"\n|  | profile of {row['profiled_steps']} denoising steps, ms each: matmul "
                   f"{ms['matmul']:.1f}, attention {ms['attention']:.1f}, other {ms['other']:.1f}; kernels "
                   f"{kernels:.1f} of the {step:.1f} ms an image takes a step ({kernels / step:.0%} busy) "
                   f"(kernels: {Path(row['profile_file']).name}) |")
    clocks = ""
    if "busy_sm_mhz" in row:
        watts = "" if row["busy_watts"] is None else f", power {row['busy_watts']:.0f} W"
        clocks = (f"\n|  | while the card was busy ({row['busy_samples']} samples of nvidia-smi): SM clock "
                  f"{row['busy_sm_mhz']:.0f} MHz (lowest {row['busy_sm_mhz_min']:.0f}){watts} |")
    pool = row.get("graphs_pool_gib")
    reserved = (f"\n|  | the allocator's reserved peak {row['peak_reserved_gib']:.1f} GiB (with the CUDA graphs' pool, "
                f"which the allocated peak does not count); the pool {pool:.2f} GiB (--memory auto plans for "
                f"{row['graphs_pool_planned_gib']} at 1024x1024) |" if pool is not None and row.get("peak_reserved_gib")
                else "")
    graphs = row.get("warm_up_graphs")
    warm_up = (f"\n|  | its warm-up compiled {graphs['compiled']} graphs and took {graphs['cached']} from inductor's "
               f"cache on disk (compiled before, by an earlier preset or run): not a cold compile's seconds |"
               if graphs and graphs["cached"] else "")
    difference = row.get("image_vs_eager")
    image = (f"\n|  | its first image against bf16 eager's (the same seed and prompt): mean difference "
             f"{difference['mean']:.2f}, largest {difference['max']} of 255 |" if difference else "")
    return warm_up + reserved + profile + clocks + image + after_image_note(row)


def after_image_note(row: dict) -> str:
    if "edit_s" not in row:
        return ""
    held = row["held_after_gib"]
    memory = ("" if held["image"] is None else
              "; GPU GiB allocated after an image / the edit / the cancelled image: "
              + " / ".join(f"{held[k]:.2f}" for k in ("image", "edit", "cancel")))
    cancel = "cancelled after step 2" if row["cancelled"] else "NOT cancelled"
    return f"\n|  | an edit (2 steps) {row['edit_s']:.2f} s; a second image {cancel}{memory} |"


def part_presets(run: Run, part: str, names: list[str]) -> None:
    run.write(f"\n## {part.capitalize()}\n\n{PRESET_HEADER}")
    only = run.args.only
    if only:  # bf16 eager first (the baseline), then in the order asked: what matters most first
        names = [name for name in dict.fromkeys(["bf16", *only]) if name in names]
    for name in names:
        missing = MODULES.get(name)
        if missing and importlib.util.find_spec(missing) is None:
            run.write(f"| {name} | `{PRESETS[name]}` | not measured: the {missing} package is not installed |")
            continue
        row = run.baseline(part) if name == "bf16" else run.measure(part, name, PRESETS[name],
                                                                     env=PRESET_ENV.get(name))
        if row:
            run.write(preset_line(run, name, row))
    for label, group, goal in (("--compile, bf16", COMPILE_PRESETS, COMPILE_GOAL_S), ("fp8", FP8_PRESETS, FP8_GOAL_S)):
        measured = {n: run.rows[n]["median_s"] for n in group if n in names and n in run.rows}
        if measured:
            fastest = min(measured, key=measured.get)
            run.write(f"\nfastest {label}: {measured[fastest]:.3f} s, {fastest} (goal on an H100: <= {goal} s)")


def part_steps(run: Run) -> None:
    run.write("\n## A full step and a skipped step\n\n| cache | flags | full step s | skipped step s | full / skipped "
              "steps | image s | vs bf16 eager |\n|---|---|---:|---:|---:|---:|---:|")
    base = run.measure("steps", "no cache", "--memory off", step_times=True, runs=1)
    if base:
        run.write(f"| none | `--memory off` | {base['full_step_s']:.3f} | | {base['full_steps']} / 0 | "
                  f"{base['median_s']:.3f} | {run.ratio(base['median_s'])} |")
    for name, flags in CACHES.items():
        row = run.measure("steps", name, f"--memory off {flags}", step_times=True, runs=1)
        if row:
            skipped = "" if row["skipped_step_s"] is None else f"{row['skipped_step_s']:.4f}"
            full = "" if row["full_step_s"] is None else f"{row['full_step_s']:.3f}"
            run.write(f"| {name} | `{flags}` | {full} | {skipped} | {row['full_steps']} / {row['skipped_steps']} | "
                      f"{row['median_s']:.3f} | {run.ratio(row['median_s'])} |")


def part_memory(run: Run) -> None:
    run.write("\n## --memory auto within --gpu-memory\n\n" + PRESET_HEADER.replace("| preset |", "| cap |"))
    for cap in CAPS_GIB:
        row = run.measure("memory", f"{cap} GiB", f"--gpu-memory {cap}", runs=1)
        if row:
            run.write(preset_line(run, f"{cap} GiB", row))
            run.write(f"|  | plan: {row['plan_reason']} | {under_cap(row, cap)} |")
    if "8 GiB" in run.rows and run.eager:
        run.write(f"\n8 GiB: {run.ratio(run.rows['8 GiB']['median_s'])}x bf16 on a free card (goal <= {CAP_TIME_GOAL})")


def under_cap(row: dict, cap: float) -> str:
    under = row["peak_alloc_gib"] is not None and row["peak_alloc_gib"] <= cap
    return f"peak under the cap: {'yes' if under else 'NO'}"


# Other plans than --memory auto picks for an 8 GiB card (group offload of an fp8-storage
# transformer), measured under the same cap, to see whether one should take its place.
LEAN_CAP_GIB = 8
LEAN_PLANS = {
    "group offload, bf16 transformer": "--offload group",
    "group offload, int8 transformer": "--offload group --quantize int8",
    "model offload, nf4 transformer and T5": "--offload model --quantize nf4 --quantize-text-encoder",
    "nf4 transformer on the GPU, T5 streamed in, VAE tiled": "--offload t5 --quantize nf4 --vae-tiling on",
}


def part_lean(run: Run) -> None:
    run.write(f"\n## Other plans within --gpu-memory {LEAN_CAP_GIB}\n\n" +
              PRESET_HEADER.replace("| preset |", "| plan |"))
    for name, flags in LEAN_PLANS.items():
        row = run.measure("lean", name, f"--gpu-memory {LEAN_CAP_GIB} {flags}", runs=1)
        if row:
            run.write(preset_line(run, name, row))
            run.write(f"|  | {under_cap(row, LEAN_CAP_GIB)} |")


def _drop_page_cache(folder: Path) -> str:
    """Evict the folder's files from the page cache: all of it where allowed, else file by file."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped (drop_caches)"
    except OSError:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "dropped file by file (posix_fadvise DONTNEED)"


def _read_all(folder: Path) -> tuple[float, int]:
    began, total = time.perf_counter(), 0
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(64 * 1024**2):
                total += len(chunk)
    return time.perf_counter() - began, total


def part_cold(run: Run) -> None:
    a = run.args
    folder = Path(a.scratch) / "flux-random-pipeline"
    run.write("\n## Cold start\n")
    if not (folder / "model_index.json").is_file():
        began = time.perf_counter()  # writing 30+ GB can take minutes
        saved = run.helper([sys.executable, __file__, "--save", str(folder), "--model", a.model,
                            *(["--allow-cpu"] if a.allow_cpu else [])])
        if isinstance(saved, str) or saved.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)  # a part-written folder would pass for a whole one next time
            why = saved if isinstance(saved, str) else saved.stderr.strip().splitlines()[-1:]
            run.write(f"could not save the pipeline: {why}")
            return
        run.write(f"saved `{a.model}` as a diffusers folder in {time.perf_counter() - began:.1f} s")
    dropped = _drop_page_cache(folder)
    read_s, size = _read_all(folder)
    run.write(f"page cache {dropped}; raw read of its safetensors: {size / 1024**3:.1f} GiB in {read_s:.1f} s "
              f"({size / 1024**3 / read_s:.2f} GiB/s)\n")
    run.write("| start | page cache | load s (to ready) | vs raw read | imports s (before the load) | first image s | "
              "peak RAM GiB |\n|---|---|---:|---:|---:|---:|---:|")
    # diffusers and transformers read a model's shards in threads with HF_ENABLE_PARALLEL_LOADING
    # ("profile before using it", their docs say): measured here, cold, beside the default.
    parallel = {"HF_ENABLE_PARALLEL_LOADING": "yes"}
    # A numbered device takes another way in (diffusers' pipeline device_map names device types only):
    # the transformer and T5 each read onto it.
    numbered = f"{a.device or 'cuda'}:0"
    loads = (("plain diffusers (from_pretrained into RAM, then .to)", "cold", "", True, None, None),
             ("flux-infer `--memory off`", "cold", "--memory off", False, None, None),
             ("flux-infer `--memory off`, HF_ENABLE_PARALLEL_LOADING=yes", "cold", "--memory off", False, parallel,
              None),
             ("flux-infer `--memory off`", "warm", "--memory off", False, None, None),
             (f"flux-infer `--memory off --device {numbered}`", "cold", "--memory off", False, None, numbered),
             ("flux-infer `--quantize fp8` (quantized as it loads)", "cold", "--quantize fp8", False, None, None))
    for label, cache, flags, plain, env, device in loads:
        if cache == "cold":
            _drop_page_cache(folder)
        row = run.measure("cold", f"{label}, {cache}", flags, model=str(folder), runs=0, plain=plain, env=env,
                          device=device)
        if row:
            run.write(f"| {label} | {cache} | {row['build_s']:.1f} | {row['build_s'] / read_s:.2f} | "
                      f"{row['import_s']:.1f} | {row['first_s']:.2f} | {_gib(row['peak_ram_gib'])} |")
    cache = Path(a.scratch) / "inductor-cache"
    run.write(f"\n(goal: cold load <= {COLD_GOAL}x the raw read)\n\n| --compile start | process start to first "
              "image s | compile/warm-up s |\n|---|---:|---:|")
    shutil.rmtree(cache, ignore_errors=True)
    for label in ("first (empty TORCHINDUCTOR_CACHE_DIR)", "second (kept cache)"):
        row = run.measure("cold", label, "--memory off --compile", runs=0,
                          env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
        if row:
            run.write(f"| {label} | {row['first_image_after_start_s']:.1f} | {row['warm_s']:.1f} |")
    run.write(f"\n(goal: second start with --compile to its first image <= {SECOND_START_GOAL_S} s)")


class Door(NamedTuple):
    """A way a served image is asked for: `call(seed)` returns once the image is back; `gradio`: it
    goes through Gradio's queue, whose timings split its time (bench/common.py's gradio_split)."""

    call: Callable[[int], object]
    gradio: bool


def served_doors(server, *, size: int, steps: int, takes, timeout: float) -> dict[str, Door]:
    """The doors of a served image by name: the page (its event stream, every preview fetched),
    gradio_client and the OpenAI route. `takes` numbers the prompts: every served image a prompt of
    its own (bench/common.py's `prompt`)."""
    import httpx

    prompt = bench_module("common").prompt
    page_outputs = bench_module("previews").page_outputs
    browser = httpx.Client(base_url=server.url, timeout=timeout)
    client = server.client()
    data = [False, size, size, 3.5, steps]  # /infer's arguments after the prompt and seed

    def page(seed):
        if not list(page_outputs(browser, [prompt(next(takes)), seed, *data])):
            raise RuntimeError(f"the page's event stream brought no image: see {server.log_path}")

    def openai_route(seed):
        browser.post("v1/images/generations", json={
            "prompt": prompt(next(takes)), "size": f"{size}x{size}", "response_format": "b64_json", "seed": seed,
            "num_inference_steps": steps}).raise_for_status()

    return {
        "page (event stream, every preview fetched)": Door(page, gradio=True),
        "gradio_client predict()": Door(lambda seed: client.predict(prompt(next(takes)), seed, *data,
                                                                    api_name="/infer"), gradio=True),
        "OpenAI route, b64_json": Door(openai_route, gradio=False),
    }


# The served table's columns from Gradio's timings (bench/common.py's gradio_split), and how each is written.
SPLIT_COLUMNS = (("event_s", "Gradio's event s", ".3f"), ("handler_s", "its handler s", ".3f"),
                 ("postprocess_ms", "its postprocess ms", ".0f"),
                 ("final_image_ms", "the final image's in it ms", ".0f"), ("outside_ms", "outside the event ms", ".0f"))


def part_served(run: Run) -> None:
    """The served path against the direct call, at the Space's defaults with previews on."""
    import itertools

    a = run.args
    common = bench_module("common")
    Server = common.Server

    run.write("\n## Served end to end\n")
    from flux_infer.random_weights import save_taef1

    workdir = Path(a.scratch) / "served"
    taef1 = save_taef1(workdir / "taef1-random")
    # the server's own defaults: --memory auto
    direct = run.measure("served", "direct", "", runs=a.runs, taef1=str(taef1))
    if not direct:
        return
    takes = itertools.count(10_000)  # every served image a prompt of its own, as the direct ones
    # The Gradio doors' time split by Gradio's own timings (GRADIO_PROFILING): its event (the handler,
    # that is the generation with its previews, and the postprocessing of every yield: the previews'
    # files, then the final image's, written in the last) and what is outside it (the event stream,
    # the downloads, the client).
    run.write("| consumer | previews | median s | vs direct | runs | " +
              " | ".join(label for _, label, _ in SPLIT_COLUMNS) + " |\n|---|---|---:|---:|---|" +
              "---:|" * len(SPLIT_COLUMNS))
    run.write(f"| direct FluxInference.run | none | {direct['median_s']:.3f} | 1.00 | "
              f"{' '.join(f'{t:.2f}' for t in direct['times'])} |")
    extra = ["--device", a.device] if a.device else []
    # The page's images as lossless WebP (the default, the Space's format) and as PNG (slower to encode).
    variants = (("latent", "latent", ["--preview", "latent"]),
                ("latent, PNG images", "latent-png", ["--preview", "latent", "--image-format", "png"]),
                ("taef1", "taef1", ["--preview", "taef1", "--taef1", str(taef1)]))
    for preview, slug, flags in variants:
        try:
            server = Server(a.model, workdir / slug, [*flags, *extra], name=slug, env=common.GRADIO_PROFILING)
        except RuntimeError as err:
            run.write(f"| server, previews {preview} | could not start: {str(err).strip().splitlines()[-1][:300]} |")
            continue
        try:
            consumers = served_doors(server, size=a.size, steps=a.steps, takes=takes, timeout=600)
            for consumer, door in consumers.items():
                if slug == "latent-png" and not door.gradio:
                    continue  # the OpenAI route's format is the request's output_format, not the page's
                door.call(100)  # warm-up
                runs = a.runs if door.gradio else 1
                times = []
                for seed in range(runs):
                    began = time.perf_counter()
                    door.call(seed)
                    times.append(time.perf_counter() - began)
                median = statistics.median(times)
                split = common.gradio_split(times, server) if door.gradio else {}
                columns = " | ".join(f"{split[key]:{form}}" for key, _, form in SPLIT_COLUMNS) + " |" if split else ""
                run.write(f"| {consumer} | {preview} | {median:.3f} | {median / direct['median_s']:.3f} | "
                          f"{' '.join(f'{t:.2f}' for t in times)} | " + columns)
                run.record("served", f"{consumer}, {preview}", {"times": times, "median_s": median,
                                                                "ratio": median / direct["median_s"], **split})
        finally:
            server.stop()
            run.keep_server_log(server, slug)
    run.write(f"\n(goal: served/direct <= {SERVED_GOAL} with previews on)")
    run.write(serving_costs_table(direct["serving_costs"], direct["median_s"], a.steps))
    # The encoding as timed above is of a random model's noise; a photograph's, on this machine's CPU:
    run.write("\nThe final image's encoding on this machine's CPU (`bench/encode.py --runs 3`):\n")
    encoded = run.helper([sys.executable, str(REPO / "bench" / "encode.py"), "--size", str(a.size), "--runs", "3"])
    if isinstance(encoded, str):
        run.write(f"not measured: {encoded}")
    else:
        run.write(encoded.stdout if encoded.returncode == 0 else f"could not run: {encoded.stderr.strip()[-500:]}")


def part_graphs(run: Run) -> None:
    """CUDA graphs, served: one server with `--compile --compile-mode reduce-overhead`, asked through
    each door in turn (gradio_client, the page's event stream, the OpenAI route), two images each.
    The graph recorded at the start-up's warm-up (one for its one size) must serve every door: none
    is recorded after it, no door's first image is slower than its second, and the card's memory
    does not grow from door to door. The server logs each graph it records."""
    import itertools

    a = run.args

    run.write("\n## CUDA graphs served through every door\n")
    limit = run.child_timeout()
    if limit is None:
        run.write(f"not measured: {run.deadline_reached()}")
        return
    flags = [*PRESETS["compile-cudagraphs"].split(), "--compile-sizes", f"{a.size}x{a.size}", "--preview", "latent",
             *(["--device", a.device] if a.device else [])]
    began = time.perf_counter()
    try:
        server = bench_module("common").Server(a.model, Path(a.scratch) / "graphs", flags, name="graphs",
                                               startup_s=limit[0], env={"TORCH_LOGS": "recompiles"})
    except RuntimeError as err:
        run.write(f"`serve {' '.join(flags)}` could not start: {str(err).strip().splitlines()[-1][:300]}")
        return
    started_s = time.perf_counter() - began

    def recorded() -> tuple[int, int]:  # CUDA graphs recorded, recompilations
        log = server.log()
        return log.count(CUDA_GRAPH_RECORDED), log.count("Recompiling function")

    try:
        doors = served_doors(server, size=a.size, steps=a.steps, takes=itertools.count(20_000), timeout=limit[0])
        at_start, used_at_start = recorded(), SmiPeak._used()
        run.write(f"`serve {' '.join(flags)}`: ready in {started_s:.0f} s (load and warm-up), {at_start[0]} CUDA "
                  f"graphs recorded, card memory "
                  f"{f'{used_at_start:.1f} GiB' if used_at_start is not None else 'not read'}\n")
        run.write("| door | first image s | second image s | first/second | graphs recorded | recompilations | "
                  "card GiB after |\n|---|---:|---:|---:|---:|---:|---:|")
        used = []
        for name, door in doors.items():
            if run.child_timeout() is None:
                run.write(f"| {name} | not measured: {run.deadline_reached()} |")
                break
            before = recorded()
            times = []
            for seed in range(2):
                began = time.perf_counter()
                door.call(seed)
                times.append(time.perf_counter() - began)
            used.append(SmiPeak._used())
            after = recorded()
            row = {"times": times, "recorded": after[0] - before[0], "recompiles": after[1] - before[1],
                   "card_gib": used[-1]}
            run.write(f"| {name} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f} | {row['recorded']} | "
                      f"{row['recompiles']} | {_gib(used[-1])} |")
            run.record("graphs", name, row)
        growth = (f"{used[-1] - used[0]:+.2f} GiB" if len(used) > 1 and None not in (used[0], used[-1])
                  else "not read (no nvidia-smi)")
        after = recorded()
        run.write(f"\nAfter the start-up: {after[0] - at_start[0]} CUDA graphs recorded and {after[1] - at_start[1]} "
                  f"recompilations (goal 0 and 0); card memory from the first door to the last: {growth}.")
    finally:
        server.stop()
        run.keep_server_log(server, "graphs")


def serving_costs_table(costs: dict, direct_s: float, steps: int) -> str:
    """From `serving_costs`, per image: previews at every step (the served path only), one VAE decode
    (inside the direct time too), one encoding (the served path only)."""
    lines = ["\nPer image, each part timed apart: previews (decoded in the denoising, served only), the VAE "
             "decode (in direct too), the final encoding (served only):\n\n| part | ms each | per image ms | "
             "of direct |\n|---|---:|---:|---:|"]
    for name, ms in costs.items():
        count = steps if "preview" in name else 1
        lines.append(f"| {name} | {ms:.1f} | {ms * count:.0f} ({count}x) | {ms * count / 1000 / direct_s:.1%} |")
    return "\n".join(lines)


def part_lora(run: Run) -> None:
    """bench/lora.py on the same model: switch costs and per-step cost of per-request LoRAs, eager and
    compiled (hot swap), each in its own process."""
    a = run.args
    run.write("\n## Per-request LoRAs (bench/lora.py)\n")
    for extra in ([], ["--compile"]):
        command = [sys.executable, str(REPO / "bench" / "lora.py"), "--model", a.model, "--size", str(a.size),
                   "--steps", str(a.steps), "--runs", str(a.runs), *extra]
        name = " ".join(extra) or "eager"
        child = run.helper(command)
        if isinstance(child, str):
            run.write(f"{name}: not measured: {child}")
            continue
        shown = child.stdout if child.returncode == 0 else child.stdout + child.stderr[-3000:]
        run.write(f"`{' '.join(command[1:])}` (exit {child.returncode})\n```\n{shown.strip()}\n```")
        run.record("lora", name, {"returncode": child.returncode, "stdout": child.stdout})


def save_pipeline(folder: str, model: str, allow_cpu: bool) -> None:
    from flux_infer.loading import load_pipeline
    from flux_infer.tuning import Options

    loaded = load_pipeline(model, device=None if not allow_cpu else "cpu",
                           options=Options(memory="off", fuse_qkv=False))
    loaded.pipeline.save_pretrained(folder, safe_serialization=True)


def main() -> None:
    began = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--parts", default="presets", help=f"comma-separated, from {', '.join(PARTS)} "
                        "(default: presets)")
    parser.add_argument("--out", default="gpu-results", help="folder for results.md, results.jsonl and logs")
    parser.add_argument("--model", default=None, help="default: random (random-small with --allow-cpu)")
    parser.add_argument("--wheels", type=Path, default=None, help="install these .whl files when diffusers is missing")
    parser.add_argument("--size", type=int, default=None, help="default: 1024 (256 with --allow-cpu)")
    parser.add_argument("--steps", type=int, default=None, help="default: 28 (4 with --allow-cpu)")
    parser.add_argument("--runs", type=int, default=None, help="steady images per preset (default: 3; 1 on a CPU)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one measurement may take")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds the whole run may take: each measurement gets at most what is left (less "
                        f"{DEADLINE_MARGIN_S} s), so the run ends by itself, its last child's log and stacks kept, "
                        "before an outer `timeout` would kill it")
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="disk for the cold-start folder and caches")
    parser.add_argument("--only", type=lambda text: [n for n in text.split(",") if n], default=None,
                        help=f"measure only these presets in the preset parts (from {', '.join(PRESETS)}), in this "
                        "order, after bf16 eager, which is always measured")
    parser.add_argument("--profile", nargs="?", const=list(PROFILED_PARTS), default=None,
                        type=lambda text: [p for p in text.split(",") if p], metavar="PARTS",
                        help="profile one more image per preset, cap or lean plan with torch.profiler: kernels by "
                        "device time in OUT/profiles/, matmul/attention/other per step; in PARTS only, when given "
                        f"(from {', '.join(PROFILED_PARTS)}; default: all of them)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU at a small size, to check the script")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one measurement, one JSON line; its log (the plan, any error) goes to children.log
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        spec = json.loads(args.one)
        faulthandler.dump_traceback_later(spec.pop("stacks_after"), exit=False)  # where a slow child is
        print(json.dumps(measure_one(spec.pop("flags"), **spec)))
        faulthandler.cancel_dump_traceback_later()
        return
    if args.save:
        save_pipeline(args.save, args.model, args.allow_cpu)
        return
    parts = [p for p in args.parts.split(",") if p]
    if not set(parts) <= set(PARTS):
        raise SystemExit(f"--parts takes {', '.join(PARTS)}; got {args.parts}")
    if args.only and not set(args.only) <= set(PRESETS):
        raise SystemExit(f"--only takes {', '.join(PRESETS)}; got {','.join(args.only)}")
    if args.profile and not set(args.profile) <= set(PROFILED_PARTS):
        raise SystemExit(f"--profile takes {', '.join(PROFILED_PARTS)}; got {','.join(args.profile)}")
    ensure_dependencies(args.wheels)

    import torch

    cpu = not torch.cuda.is_available()
    if cpu and not args.allow_cpu:
        raise SystemExit("bench/gpu.py measures a CUDA GPU and this machine has none; to check the script: --allow-cpu")
    args.device = "cpu" if cpu else None
    args.model = args.model or ("random-small" if cpu else "random")
    args.size = args.size or (256 if cpu else 1024)
    args.steps = args.steps or (4 if cpu else 28)
    args.runs = args.runs if args.runs is not None else (1 if cpu else 3)
    run = Run(args, began=began)
    facts = versions()
    run.write(f"# bench/gpu.py on {facts['card']}\n\n" + ", ".join(f"{k} {v}" for k, v in facts.items()) +
              f"\n\n`python bench/gpu.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}`: model {args.model}, "
              f"{args.size}x{args.size}, {args.steps} steps, median of {args.runs}")
    with open(run.out / "versions.json", "w") as f:
        json.dump(facts, f, indent=1)
    # The empty folders gradio_client (the served parts') leaves in the temporary folder go at the end.
    with bench_module("common").download_folders_removed():
        for part in parts:
            began = time.perf_counter()
            if part in ("presets", "compile", "offload"):
                part_presets(run, part, PARTS[part])
            elif part == "steps":
                run.baseline(part)
                part_steps(run)
            elif part == "memory":
                run.baseline(part)
                part_memory(run)
            elif part == "lean":
                run.baseline(part)
                part_lean(run)
            elif part == "cold":
                part_cold(run)
            elif part == "served":
                part_served(run)
            elif part == "graphs":
                part_graphs(run)
            elif part == "lora":
                part_lora(run)
            run.write(f"\n({part}: {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
