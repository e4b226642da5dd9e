"""The `flux-infer` command: `serve`, `generate` and `make-tiny`.

Each subcommand reads its flags, then calls the library with explicit keyword arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flux_infer import settings, tuning
from flux_infer.images import SUFFIX_FORMATS
from flux_infer.loading import parse_lora
from flux_infer.previews import DEFAULT_PREVIEW, DEFAULT_TAEF1_LOCAL, DEFAULT_TAEF1_REPO, PREVIEW_MODES

log = logging.getLogger("flux_infer")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"a diffusers folder, a hub repo id, a .safetensors or .gguf transformer, 'tiny' (a tiny random "
        f"pipeline), or 'random' (FLUX.1-dev's architecture with random weights: real speed and memory, images "
        f"of noise; 'random-small' at CPU size) "
        f"(default: ${settings.MODEL_ENV}, else {settings.DEFAULT_LOCAL_MODEL} if it exists, "
        f"else {settings.DEFAULT_REPO_ID})",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="with a .safetensors transformer: the folder or repo id of the other components",
    )
    parser.add_argument("--lora", action="append", default=[], type=parse_lora, metavar="PATH[:SCALE]",
                        help="a LoRA .safetensors to fuse into the model at start-up, at SCALE (default 1); "
                        "repeatable. For `generate` with --lora-dir: NAME[:SCALE], a LoRA of that folder "
                        "used for the image")
    loras = parser.add_argument_group("LoRAs chosen per request")
    loras.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                       help="the LoRA .safetensors files requests may name (re-read when it changes; nothing "
                       "outside it is read) (default: none)")
    loras.add_argument("--lora-cache", type=int, default=settings.DEFAULT_LORA_CACHE, metavar="N",
                       help="LoRAs kept loaded; the least recently used is dropped (default: %(default)s)")
    loras.add_argument("--lora-rank", type=int, default=settings.DEFAULT_LORA_RANK, metavar="R",
                       help="with --compile: the largest LoRA rank that can be switched in without a recompile "
                       "(default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="cuda, mps or cpu, or a numbered GPU such as cuda:1 (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on a GPU, float32 on CPU)"
    )


def _checked(parse):
    """An argparse `type` that reports the parser's own message (argparse hides a ValueError's)."""

    def convert(text):
        try:
            return parse(text)
        except tuning.OptionError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory and speed (see the README's tables)")
    group.add_argument("--memory", choices=tuning.MEMORY_MODES, default="auto",
                       help="auto: on a GPU, pick the fastest offload/quantization that fits its free memory "
                       "(unless --offload/--quantize are given); off: only what the flags say (default: auto)")
    group.add_argument("--offload", choices=tuning.OFFLOAD_MODES, default=None,
                       help="keep weights on the CPU: t5 (T5 alone, streamed in block by block for each new "
                       "prompt; the transformer stays on the GPU), model (one component at a time on the GPU), "
                       "group (blocks streamed in), sequential (layer by layer; slowest) (default: none, or "
                       "--memory auto's)")
    group.add_argument("--quantize", choices=tuning.QUANTIZE_MODES, default=None,
                       help="transformer weights: fp8-storage (float8 storage, compute in the dtype), int8 or fp8 "
                       "(torchao), fp8-row (fp8 with a scale per row), nf4 (bitsandbytes, CUDA) (default: none, or "
                       "--memory auto's)")
    group.add_argument("--quantize-text-encoder", action="store_true", default=None,
                       help="quantize the T5 text encoder the same way (int8, fp8, fp8-row or nf4)")
    group.add_argument("--compile", action="store_true", help="torch.compile the transformer and VAE decoder, "
                       "warmed up at start-up (minutes on the first run; cached after)")
    group.add_argument("--compile-mode", choices=tuning.COMPILE_MODES, default=tuning.Options.compile_mode,
                       help="with --compile, torch.compile's mode: max-autotune-no-cudagraphs tries kernel variants "
                       "while compiling; reduce-overhead and max-autotune also replay the transformer from CUDA "
                       "graphs, one per size (not with --cache, nor with offloading other than t5) (default: default)")
    group.add_argument("--compile-sizes", type=_checked(tuning.parse_sizes), default=tuning.DEFAULT_COMPILE_SIZES,
                       metavar="WxH[,WxH]", help="sizes to warm up with --compile (default: 1024x1024)")
    group.add_argument("--cache", type=_checked(tuning.parse_cache), default=None, metavar="KIND[:VALUE]",
                       help="reuse transformer work across steps: fbcache[:threshold] (First Block Cache, "
                       f"default {tuning.CACHE_DEFAULTS['fbcache']}), taylorseer[:interval] (default "
                       f"{tuning.CACHE_DEFAULTS['taylorseer']}), magcache[:threshold] (default "
                       f"{tuning.CACHE_DEFAULTS['magcache']}); changes pixels (default: none)")
    group.add_argument("--attention", default=None, metavar="BACKEND",
                       help="diffusers attention backend, e.g. flash, _flash_3, sage, xformers, _native_cudnn, or "
                       f"{tuning.FLOAT8_ATTENTION} (cuDNN's float8 attention: Hopper or newer, bf16 models, "
                       "changes pixels a little) (default: torch's SDPA)")
    group.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=tuning.Options.fuse_qkv,
                       help="fuse the Q, K, V projections into one matmul: the same maths, but diffusers keeps the "
                       "separate weights too (+4 GiB for FLUX.1-dev), and on an H100 it was not faster (default: off)")
    group.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                       help="use at most this much GPU memory: --memory auto plans within it and torch's allocator "
                       "enforces it, so the card can be shared (default: all that is free)")
    group.add_argument("--vae-tiling", choices=tuning.VAE_TILING_MODES, default="auto",
                       help="decode in tiles: auto when the decode would not fit in free memory (default: auto)")


def _options(args) -> tuning.Options:
    return tuning.Options(memory=args.memory, offload=args.offload, quantize=args.quantize,
                          quantize_text_encoder=args.quantize_text_encoder, compile=args.compile,
                          compile_mode=args.compile_mode, compile_sizes=args.compile_sizes, cache=args.cache,
                          attention=args.attention, fuse_qkv=args.fuse_qkv, vae_tiling=args.vae_tiling,
                          gpu_memory=args.gpu_memory)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-infer", description="FLUX.1-dev, served locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the Space's web page and /infer API")
    _add_model_flags(serve)
    _add_runtime_flags(serve)
    serve.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", settings.DEFAULT_HOST),
        help="address to bind (default: $GRADIO_SERVER_NAME, else 127.0.0.1: this machine only)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", settings.DEFAULT_PORT)),
        help="port (default: $GRADIO_SERVER_PORT, else 7860)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=settings.DEFAULT_MAX_QUEUE,
        help="requests allowed to wait; more are refused as busy (default: %(default)s)",
    )
    serve.add_argument(
        "--preview",
        choices=PREVIEW_MODES,
        default=DEFAULT_PREVIEW,
        help="live previews: taef1 (tiny VAE), latent (a colour map of the latents, no weights), none; "
        "auto uses taef1 when it loads (default: %(default)s)",
    )
    serve.add_argument("--preview-every", type=int, default=1, help="a preview every K steps (default: 1)")
    serve.add_argument(
        "--taef1",
        default=None,
        help=f"TAEF1 folder or repo id (default: {DEFAULT_TAEF1_LOCAL} if it exists, else {DEFAULT_TAEF1_REPO})",
    )
    serve.add_argument("--auth", default=os.environ.get("FLUX_AUTH"), metavar="USER:PASSWORD",
                       help="log-in for the page and the Gradio API (default: $FLUX_AUTH, else none)")
    serve.add_argument("--api-key", default=os.environ.get("FLUX_API_KEY"), metavar="KEY",
                       help="Bearer key for the OpenAI route /v1 (default: $FLUX_API_KEY, else none)")
    serve.add_argument("--model-alias", action="append", default=[], metavar="NAME",
                       help="another model name the OpenAI route accepts and /v1/models lists, for clients "
                       "that insist on one (e.g. dall-e-3, gpt-image-1); repeatable")
    serve.add_argument("--mcp", action="store_true", help="also serve /infer as an MCP tool at /gradio_api/mcp/")
    serve.add_argument("--output-dir", type=Path, default=None,
                       help="save every image here, with its settings in the PNG and a JSON sidecar")
    serve.add_argument("--keep-outputs", type=float, default=settings.DEFAULT_KEEP_OUTPUTS_S, metavar="SECONDS",
                       help="delete the server's temporary image files after this long (default: %(default)g)")
    serve.add_argument("--no-log-prompts", dest="log_prompts", action="store_false",
                       help="keep prompts out of the log (their length is logged instead)")
    cluster = serve.add_argument_group("scale out on Ray Serve (pip install 'flux-infer[ray]')")
    cluster.add_argument("--replicas", type=int, default=None,
                         help="run generation on N Ray Serve replicas, one GPU each (default: in this process)")
    cluster.add_argument("--min-replicas", type=int, default=None, help="autoscale between these bounds")
    cluster.add_argument("--max-replicas", type=int, default=None, help="autoscale between these bounds")
    cluster.add_argument("--upscale-delay", type=float, default=None, metavar="SECONDS",
                         help="when autoscaling, add a replica after this long of sustained load "
                         "(default: Ray Serve's, 30)")
    cluster.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                         help="join this Ray cluster (from `ray start --head`) instead of starting one here "
                         "(default: $RAY_ADDRESS)")
    serve.add_argument(
        "--image-format",
        choices=settings.IMAGE_FORMATS,
        default=settings.DEFAULT_IMAGE_FORMAT,
        help="the final image's format, lossless either way: webp (the Space's, quicker to write) or png "
        "(default: %(default)s)",
    )

    generate = sub.add_parser("generate", help="generate one image from the shell")
    generate.add_argument("prompt")
    _add_model_flags(generate)
    _add_runtime_flags(generate)
    generate.add_argument("--seed", type=int, default=None, help="fixed seed (default: a random one)")
    generate.add_argument("--width", type=int, default=int(settings.WIDTH.default))
    generate.add_argument("--height", type=int, default=int(settings.HEIGHT.default))
    generate.add_argument("--steps", type=int, default=int(settings.NUM_INFERENCE_STEPS.default))
    generate.add_argument("--guidance", type=float, default=settings.GUIDANCE_SCALE.default)
    generate.add_argument("-o", "--output", type=Path, default=Path("flux.png"), help="PNG or WebP path")

    edit = sub.add_parser("edit", help="rework an image (image to image), or repaint a masked region of it")
    edit.add_argument("image", type=Path, help="the image to edit (PNG, JPEG or WebP)")
    edit.add_argument("prompt")
    edit.add_argument("--mask", type=Path, default=None,
                      help="repaint only here: white (or transparent, as OpenAI's masks) is repainted (default: "
                      "the whole image, image to image)")
    edit.add_argument("--strength", type=float, default=settings.STRENGTH.default,
                      help="0 keeps the image, 1 repaints it entirely (default: %(default)s)")
    _add_model_flags(edit)
    _add_runtime_flags(edit)
    edit.add_argument("--seed", type=int, default=None, help="fixed seed (default: a random one)")
    edit.add_argument("--width", type=int, default=None, help="default: the image's, within the limits")
    edit.add_argument("--height", type=int, default=None, help="default: the image's, within the limits")
    edit.add_argument("--steps", type=int, default=int(settings.NUM_INFERENCE_STEPS.default))
    edit.add_argument("--guidance", type=float, default=settings.GUIDANCE_SCALE.default)
    edit.add_argument("-o", "--output", type=Path, default=Path("flux-edit.png"), help="PNG or WebP path")

    tiny = sub.add_parser("make-tiny", help="write a tiny random FLUX.1-dev-shaped pipeline")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default: %(default)s)")
    return parser


def _lora_folder(args):
    """--lora-dir, --lora-cache and --lora-rank, checked (before any slow load), or None."""
    from flux_infer.loras import LoraFolder

    if getattr(args, "lora_dir", None) is None:
        return None
    return LoraFolder(str(args.lora_dir), cache=args.lora_cache, rank=args.lora_rank)


def _spec(args, *, preview: str = "none", preview_every: int = 1, taef1: str | None = None):
    from flux_infer.loading import InferenceSpec

    # `generate --lora-dir D --lora NAME`: the LoRA is the request's, not fused at start-up.
    fused = () if args.command != "serve" and args.lora_dir is not None else tuple(args.lora)
    return InferenceSpec(model=args.model, base_model=args.base_model, device=args.device, dtype=args.dtype,
                         options=_options(args), loras=fused, lora_folder=args.lora_folder, preview=preview,
                         preview_every=preview_every, taef1=taef1, progress_bar=args.command != "serve",
                         serving=args.command == "serve")


def _load(args, **preview):
    from flux_infer.loading import load_inference

    return load_inference(_spec(args, **preview))


def _serve(args) -> int:
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.preview_every < 1:
        raise ValueError(f"--preview-every must be at least 1, got {args.preview_every}")
    if args.keep_outputs <= 0:
        raise ValueError(f"--keep-outputs must be more than 0 seconds, got {args.keep_outputs:g}")
    if any(not alias.strip() for alias in args.model_alias):
        raise ValueError("--model-alias needs a name, such as dall-e-3")
    from flux_infer.server import ServerConfig, claim_address, parse_auth, serve
    from flux_infer.service import Service, output_folder
    from flux_infer.web import build_demo

    # Before the slow load: an unwritable folder or a port in use is said at once.
    output_dir = output_folder(args.output_dir) if args.output_dir is not None else None
    sock = claim_address(args.host, args.port)
    # An empty $FLUX_AUTH or $FLUX_API_KEY (an unset variable passed through) means none, as unset.
    config = ServerConfig(host=args.host, port=args.port, auth=parse_auth(args.auth) if args.auth else None,
                          api_key=args.api_key or None, mcp=args.mcp, keep_outputs=args.keep_outputs,
                          model_aliases=tuple(args.model_alias))
    preview = dict(preview=args.preview, preview_every=args.preview_every, taef1=args.taef1)
    cluster_flags = (args.replicas, args.min_replicas, args.max_replicas, args.upscale_delay, args.ray_address)
    if all(flag is None for flag in cluster_flags):
        inference, concurrency = _load(args, **preview), 1
    else:
        from flux_infer.cluster import ClusterConfig, start

        if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
            raise ValueError("--replicas is a fixed count: leave it out when autoscaling with "
                             "--min-replicas/--max-replicas")
        cluster = ClusterConfig(replicas=1 if args.replicas is None else args.replicas,
                                min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                upscale_delay_s=args.upscale_delay, address=args.ray_address)
        cluster.check()  # before the model or Ray is touched
        if args.device is not None and ":" in args.device:
            raise ValueError(f"--device {args.device} picks one GPU, and each replica is given a GPU of its "
                             "own: leave the number out (--device cuda)")
        inference, concurrency = start(_spec(args, **preview), cluster), cluster.most_replicas
    service = Service(inference, max_queue=args.max_queue, output_dir=output_dir, log_prompts=args.log_prompts,
                      concurrency=concurrency,
                      loras=args.lora_folder.library() if args.lora_folder is not None else None)
    demo = build_demo(service, image_format=args.image_format)
    serve(service, demo, config, sock)
    return 0


def _request(args, *, width, height):
    """The command's validated request (before the slow load, so a typo costs nothing)."""
    from dataclasses import replace

    from flux_infer.inference import build_request
    from flux_infer.loras import parse_loras

    request = build_request(args.prompt, seed=0 if args.seed is None else args.seed, randomize_seed=args.seed is None,
                            width=width, height=height, guidance_scale=args.guidance, num_inference_steps=args.steps)
    if args.lora_folder is not None:
        request = replace(request, loras=parse_loras([f"{name}:{scale}" for name, scale in args.lora],
                                                     args.lora_folder.library()))
    if args.output.suffix.lower() not in SUFFIX_FORMATS:
        raise ValueError(f"-o must end in {' or '.join(SUFFIX_FORMATS)}, got {args.output.name}")
    return request


def _write(args, request) -> int:
    from flux_infer.images import save_image

    result = _load(args).run(request)
    save_image(result.image, args.output)
    print(f"seed {result.seed}")
    print(f"saved {args.output}")
    return 0


def _generate(args) -> int:
    return _write(args, _request(args, width=args.width, height=args.height))


def _edit(args) -> int:
    from dataclasses import replace

    from flux_infer.inference import InvalidRequest, check_strength
    from flux_infer.uploads import edit_size, read_image, read_mask

    def read(path: Path, what: str) -> bytes:
        if not path.is_file():
            raise InvalidRequest(f"{what} {path} does not exist")
        return path.read_bytes()

    image = read_image(read(args.image, "image"), "image")
    mask = read_mask(read(args.mask, "mask"), image.size, "mask") if args.mask is not None else None
    width, height = edit_size(image.size)
    request = _request(args, width=args.width or width, height=args.height or height)
    return _write(args, replace(request, image=image, mask=mask, strength=check_strength(args.strength)))


def _make_tiny(args) -> int:
    from flux_infer.tiny import make_tiny

    path = make_tiny(args.directory, seed=args.seed)
    print(f"wrote a tiny random FLUX.1-dev-shaped pipeline to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [%(request_id)s]: %(message)s",
                        datefmt="%H:%M:%S")
    from flux_infer.service import RequestIdFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    # Gradio checks its own start-up over HTTP; one log line per request is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from flux_infer.gradio_internals import GradioMismatch
    from flux_infer.inference import GenerationFailed, InvalidRequest
    from flux_infer.loading import DeviceError, ModelLoadError

    commands = {"serve": _serve, "generate": _generate, "edit": _edit, "make-tiny": _make_tiny}
    try:
        args.lora_folder = _lora_folder(args)  # one, checked once, for the command
        return commands[args.command](args)
    except (ModelLoadError, DeviceError, InvalidRequest, GradioMismatch, ValueError) as err:
        print(f"flux-infer: error: {err}", file=sys.stderr)
        return 2
    except GenerationFailed as err:  # out of GPU memory in `generate` or the warm-up of --compile
        print(f"flux-infer: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
