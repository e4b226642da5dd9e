"""Speed options on this machine, in one run: torch.compile against eager, each cache against none.

Loads the tiny model (or `--model`) once per variant, warms each up, then times them in turn
(round-robin, so machine noise hits all alike) at 1024x1024 and 28 steps. Prints medians, ratios to
eager, and how many steps each cache skipped. The random tiny model's first block changes a lot
from step to step, so the caches here use a high threshold (0.5) to skip at all, and what they
skip says nothing about quality; bench/gpu.py measures the real model on a GPU.

    python bench/speed.py [--runs 5] [--model DIR] [--size 1024] [--steps 28] [--variants ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_thread_option, apply_thread_option, interleaved, prompt, report  # noqa: E402

# name: flags. The random tiny model needs high thresholds to skip at all (see the docstring).
VARIANTS = {
    "eager": "",
    "compile": "--compile",
    "fbcache:0.5": "--cache fbcache:0.5",
    "taylorseer:5": "--cache taylorseer:5",
    "magcache:0.5": "--cache magcache:0.5",
}
# One compiled pipeline per process: torch.compile's caches are keyed by code, and two compiled
# copies of the same blocks, one with cache hooks and one without, can share graphs. To time
# compile together with a cache, run `--variants eager,fbcache:0.5 --compile-all`.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default=None, help="pipeline folder or repo id (default: a fresh tiny one)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--compile-all", action="store_true",
                        help="add --compile to every variant but eager (then leave `compile` out)")
    add_thread_option(parser)
    args = parser.parse_args()
    apply_thread_option(args)
    names = [n for n in args.variants.split(",") if n]
    if "eager" not in names or not set(names) <= set(VARIANTS):
        raise SystemExit(f"--variants must include eager and come from {', '.join(VARIANTS)}")
    compiled = [n for n in names if n != "eager" and (args.compile_all or "--compile" in VARIANTS[n])]
    if len(compiled) > 1:
        raise SystemExit(f"one compiled variant per run (see the note in {Path(__file__).name}), got {compiled}")

    import torch

    from flux_infer.inference import FluxInference, build_request
    from flux_infer.loading import load_pipeline
    from flux_infer.tiny import make_tiny

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu import options_for

    model = args.model or str(make_tiny(Path(tempfile.mkdtemp(prefix="flux-bench-speed-")) / "tiny", seed=0))
    inferences, cached = {}, {}
    for name in names:
        flags = VARIANTS[name] + (" --compile" if args.compile_all and name != "eager" else "")
        options = options_for(flags)
        pipeline, _, placement, runtime, _ = load_pipeline(model, options=options)
        inferences[name] = FluxInference(pipeline, runtime=runtime)
        if options.compile:
            inferences[name].warm_up(((args.size, args.size),), *options.warm_up_runs())

    def call(name):
        def run(seed: int) -> None:
            request = build_request(prompt(seed), seed=seed, randomize_seed=False, width=args.size, height=args.size,
                                    num_inference_steps=args.steps)
            cached[name] = inferences[name].run(request).cached_steps
        return run

    times = interleaved({name: call(name) for name in names}, args.runs)
    print(f"{args.size}x{args.size}, {args.steps} steps, {model}, {placement.device} {placement.dtype_name}, "
          f"{args.runs} runs each, torch threads {torch.get_num_threads()}")
    report(times, "eager", {})
    print("steps skipped by the cache per image: " + ", ".join(f"{n} {cached[n]}" for n in names if ":" in n))


if __name__ == "__main__":
    main()
