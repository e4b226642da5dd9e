"""Per-request LoRAs: what a switch costs, and what an unfused LoRA costs per step against fused.

One process, one pipeline (`--model`: a tiny one by default; `random` on a GPU is FLUX.1-dev's
architecture with random weights). Random LoRAs of `--rank` on every attention projection of every
transformer block are written to a temporary --lora-dir. Then, through flux_infer.loras (the
server's own path), it times:

- a switch (`LoraAdapters.use()`, the device synchronized after it), median of `--runs`: the first
  use of a LoRA (read and loaded; a fresh file each run), reuse of a cached one, a change of scale
  only, and back to none;
- a whole image without LoRA, with two LoRAs unfused (PEFT adapters, as served), and with the same
  two fused into the weights (as `--lora` at start-up does), round-robin, as medians and ratios.

With `--compile`, the switches are hot swaps into compiled slots instead, and the run fails if any
of them recompiles.

    python bench/lora.py [--model tiny|random|DIR] [--size 512] [--steps 8] [--rank 16] [--runs 3] [--compile]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import add_thread_option, apply_thread_option, prompt  # noqa: E402

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def write_lora(transformer, path: Path, rank: int, seed: int) -> None:
    """A random rank-`rank` LoRA on TARGETS of every double and single block, in diffusers' layout."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear):
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5)
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.01).to(torch.bfloat16)
    save_file(tensors, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, random, random-small or a pipeline folder")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="hot-swap into compiled slots")
    add_thread_option(parser)
    args = parser.parse_args()
    apply_thread_option(args)

    import torch

    from flux_infer.inference import FluxInference, LoraChoice, build_request
    from flux_infer.loading import load_pipeline
    from flux_infer.loras import LoraFolder
    from flux_infer.tuning import Options

    folder = Path(tempfile.mkdtemp(prefix="flux-loras-"))
    # The LoRAs are written from the model's own shapes before the server-side load (slots need them).
    probe = load_pipeline(args.model, options=Options(memory="off")).pipeline
    fresh = [f"new{run}" for run in range(args.runs)]  # one never-used LoRA per run of "first use"
    for index, name in enumerate(("a", "b", *fresh)):
        write_lora(probe.transformer, folder / f"{name}.safetensors", args.rank, seed=index)
    del probe
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    options = Options(compile=True, compile_sizes=((args.size, args.size),)) if args.compile else Options()
    loaded = load_pipeline(args.model, options=options, lora_folder=LoraFolder(str(folder), rank=args.rank))
    inference = FluxInference(loaded.pipeline, runtime=loaded.runtime, adapters=loaded.adapters)
    cuda = torch.cuda.is_available() and loaded.placement.device.startswith("cuda")
    takes = itertools.count()  # every timed image a prompt of its own (common.prompt)

    def timed(call) -> float:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def image(loras=()):
        request = build_request(prompt(next(takes)), seed=1, randomize_seed=False, width=args.size,
                                height=args.size, num_inference_steps=args.steps)
        return timed(lambda: inference.run(replace(request, loras=loras)))

    two = (LoraChoice("a", 1.0), LoraChoice("b", 0.7))
    image()  # warm-up (and, with --compile, the compile)
    image(two)
    recompiles = torch._dynamo.config.patch(error_on_recompile=True) if args.compile else None
    if recompiles is not None:
        recompiles.__enter__()
    switches = {
        "first use of a LoRA": lambda run: [LoraChoice(fresh[run], 1.0)],
        "cached LoRA again": lambda run: [LoraChoice("a", 1.0)],
        "scale change only": lambda run: [LoraChoice("a", 0.5)],
        "back to no LoRA": lambda run: [],
    }
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, rank {args.rank}, "
          f"{'compiled' if args.compile else 'eager'}, device {loaded.placement.device}"
          f"{' ' + torch.cuda.get_device_name() if cuda else ''}, torch {torch.__version__}")
    for label, choose in switches.items():
        seconds = []
        for run in range(args.runs):
            inference.adapters.use((LoraChoice("a", 1.0), LoraChoice("b", 1.0)))  # the same state before each
            seconds.append(timed(lambda: inference.adapters.use(tuple(choose(run)))))
        print(f"switch: {label:<26} {statistics.median(seconds) * 1000:8.2f} ms  "
              f"(runs {' '.join(f'{value * 1000:.2f}' for value in seconds)})")
    adapters = inference.adapters

    def fused() -> float:
        """The two LoRAs merged into the weights (as start-up --lora), timed, then taken out again."""
        adapters.use(two)
        loaded.pipeline.fuse_lora()
        inference.adapters = None  # the request then leaves the merged layers as they are
        try:
            return image()
        finally:
            inference.adapters = adapters
            loaded.pipeline.unfuse_lora()

    # Round-robin, so that the machine's noise hits every variant alike.
    rows = {"no LoRA": [], "2 LoRAs unfused (per request)": []}
    if not args.compile:
        rows["2 LoRAs fused (start-up --lora)"] = []
    for _ in range(args.runs):
        rows["no LoRA"].append(image())
        rows["2 LoRAs unfused (per request)"].append(image(two))
        if not args.compile:
            rows["2 LoRAs fused (start-up --lora)"].append(fused())
    if recompiles is not None:
        recompiles.__exit__(None, None, None)
        print("no recompilation while switching (dynamo error_on_recompile)")
    plain = rows["no LoRA"]
    reference = statistics.median(plain)
    for label, values in rows.items():
        median = statistics.median(values)
        print(f"{label:<34} {median:7.3f} s/image  {median / args.steps * 1000:7.1f} ms/step  "
              f"ratio {median / reference:.3f}")


if __name__ == "__main__":
    main()
