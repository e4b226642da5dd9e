"""Memory and speed presets on a GPU: load time, first image, steady latency and peak VRAM.

For each preset, one after another in this process: load FLUX.1-dev with its options (and warm up
torch.compile), time the first image, then the median of `--runs` images at 1024x1024 and 28
steps, and read the peak memory torch allocated. Prints a markdown table; ratios are to the first
preset of the run. Goals on one H100: at most 3.9 s lossless, at most 2.5 s with
fp8 + compile + cache at published quality (MagCache's published FLUX settings are diffusers'
defaults: threshold 0.06, at most 3 skips in a row, first 20 % of steps never skipped).

    python bench/gpu.py [--model DIR_OR_REPO] [--presets bf16,fp8-compile-magcache] [--runs 5]
    python bench/gpu.py --list
    python bench/gpu.py --allow-cpu --model tiny --presets bf16,int8 --runs 1   # check the script

Needs the weights (see the README) and, for every preset but the CPU-capable ones, a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")

LOSSLESS_GOAL_S = 3.9
FAST_GOAL_S = 2.5

# name: (command-line flags, changes pixels?)
PRESETS = {
    "bf16": ("--memory off", False),
    "bf16-compile": ("--memory off --compile", False),
    "fp8-storage": ("--quantize fp8-storage", True),
    "int8": ("--quantize int8", True),
    "fp8": ("--quantize fp8", True),
    "fp8-compile": ("--quantize fp8 --compile", True),
    "fp8-compile-fbcache": ("--quantize fp8 --compile --cache fbcache", True),
    "fp8-compile-magcache": ("--quantize fp8 --compile --cache magcache", True),
    "bf16-compile-magcache": ("--memory off --compile --cache magcache", True),
    "fp8-t5-fp8": ("--quantize fp8 --quantize-text-encoder", True),
    "model-offload": ("--offload model", False),
    "fp8-model-offload": ("--quantize fp8 --offload model", True),
    "nf4-model-offload": ("--quantize nf4 --offload model", True),
    "group-offload": ("--offload group", False),
    "sequential-offload": ("--offload sequential --quantize none", False),
    "auto": ("", None),
}
DEFAULT_PRESETS = ("bf16", "bf16-compile", "fp8", "fp8-compile", "fp8-compile-magcache", "fp8-compile-fbcache",
                   "int8", "fp8-storage", "model-offload", "fp8-model-offload", "nf4-model-offload",
                   "group-offload", "auto")


def options_for(flags: str):
    """The tuning.Options the server would build from these flags."""
    from flux_infer import cli

    parser = cli._parser()
    args = parser.parse_args(["generate", "x", *flags.split()])
    return cli._options(args)


def measure(name: str, model: str | None, device: str | None, size: int, steps: int, runs: int) -> dict:
    import torch

    from flux_infer.inference import FluxInference, build_request
    from flux_infer.loading import load_pipeline

    flags, lossy = PRESETS[name]
    options = options_for(flags)
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipeline, _, placement, runtime = load_pipeline(model, device=device, options=options)
    inference = FluxInference(pipeline, runtime=runtime)
    if options.compile:
        inference.warm_up(((size, size),), *options.warm_up_runs())
    if cuda:
        torch.cuda.synchronize()
    loaded = time.perf_counter() - started

    def one(seed: int):
        request = build_request("a tiny astronaut hatching from an egg on the moon", seed=seed, randomize_seed=False,
                                width=size, height=size, num_inference_steps=steps)
        began = time.perf_counter()
        result = inference.run(request)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began, result

    first, result = one(0)
    times = [one(seed)[0] for seed in range(1, runs + 1)]
    row = dict(name=name, flags=flags or "(defaults)", lossy=lossy, plan=runtime.plan.describe(), load_s=loaded,
               first_s=first, median_s=statistics.median(times), cached=result.cached_steps,
               peak_gib=torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan"))
    del inference, pipeline, runtime
    torch._dynamo.reset()  # the next preset compiles its own graphs, never reuses these
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder, repo id or single file (default: as serve)")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated; see --list")
    parser.add_argument("--list", action="store_true", help="print the presets and their flags")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (to check the script on tiny weights)")
    args = parser.parse_args()
    if args.list:
        for name, (flags, _) in PRESETS.items():
            print(f"{name:<22} {flags or '(defaults: --memory auto)'}")
        return
    names = [n for n in args.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {', '.join(unknown)}: see --list")

    import torch

    device = None
    if not torch.cuda.is_available():
        if not args.allow_cpu:
            raise SystemExit("bench/gpu.py measures GPU memory and latency and this machine has no CUDA GPU. "
                             "To check the script itself: --allow-cpu --model tiny --presets bf16,int8 --runs 1")
        device = "cpu"
    where = torch.cuda.get_device_name(0) if device is None else "CPU"
    print(f"{where}, {args.size}x{args.size}, {args.steps} steps, median of {args.runs}, model {args.model or 'default'}")
    rows = []
    for name in names:
        try:
            rows.append(measure(name, args.model, device, args.size, args.steps, args.runs))
        except Exception as err:  # one preset that cannot run here must not hide the others
            print(f"{name}: skipped: {type(err).__name__}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
            continue
        row = rows[-1]
        print(f"  {name}: {row['median_s']:.3f} s, peak {row['peak_gib']:.1f} GiB", file=sys.stderr)
    if not rows:
        raise SystemExit("no preset ran")
    base = rows[0]["median_s"]
    print("\n| preset | flags | plan | pixels | load s | first image s | steady s | vs first | cached steps | peak GiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        pixels = {True: "change", False: "exact", None: "depends"}[row["lossy"]]
        print(f"| {row['name']} | `{row['flags']}` | {row['plan']} | {pixels} | {row['load_s']:.1f} | "
              f"{row['first_s']:.2f} | {row['median_s']:.3f} | {row['median_s'] / base:.2f} | {row['cached']} | "
              f"{row['peak_gib']:.1f} |")
    exact = [r["median_s"] for r in rows if r["lossy"] is False]
    fast = [r["median_s"] for r in rows if r["name"] in ("fp8-compile-magcache", "fp8-compile-fbcache")]
    if exact:
        print(f"\nbest exact: {min(exact):.3f} s (goal on one H100: <= {LOSSLESS_GOAL_S} s)")
    if fast:
        print(f"best fp8 + compile + cache: {min(fast):.3f} s (goal on one H100: <= {FAST_GOAL_S} s)")


if __name__ == "__main__":
    main()
