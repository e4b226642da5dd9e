"""Where the weights come from, which device and dtype they run in, and loading the pipeline.

Sources, in the order `--model` is read:
- `tiny`: the random FLUX.1-dev-shaped pipeline of `flux_infer.tiny`, made once in a cache folder;
- `random` / `random-small`: FLUX.1-dev's architecture with random weights, built in memory where
  it will run (`flux_infer.random_weights`): true speed and memory, noise for images;
- a path ending in `.safetensors` or `.gguf`: a single-file transformer checkpoint (e.g.
  `flux1-dev.safetensors`, `flux1-dev-Q8_0.gguf`), with the other components taken from `base_model`;
- an existing folder: a diffusers-format pipeline (`model_index.json` at its root);
- anything else shaped like `owner/name`: a Hugging Face repo id, fetched through huggingface_hub,
  which owns the cache, `HF_TOKEN` and `HF_HUB_OFFLINE`.
Only safetensors and GGUF files are read and no remote code is ever run.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from flux_infer import settings
from flux_infer.errors import first_line

log = logging.getLogger(__name__)

SourceKind = Literal["tiny", "random", "folder", "repo", "single_file"]

# A repo's files that a diffusers FluxPipeline reads. FLUX.1-dev's repo also holds BFL-format
# single files at its root (flux1-dev.safetensors, ae.safetensors: 34 GB) that it does not need.
PIPELINE_PATTERNS = ("model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")
SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")
# Pickle-based formats: loading them can run arbitrary code, so they are refused.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
PICKLE_REFUSED = ("{path} is a pickle-based checkpoint, which can run code when loaded: flux-infer reads only "
                  "safetensors and GGUF. Use the .safetensors release of these weights (or convert them once, "
                  "somewhere you trust, with safetensors' torch.save_file)")


def refuse_pickle(path: str | Path) -> None:
    """ModelLoadError for a pickle-based file name (see PICKLE_SUFFIXES)."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise ModelLoadError(PICKLE_REFUSED.format(path=path))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """The weights could not be found or fetched; the message says what to do."""


class DeviceError(RuntimeError):
    """The requested device or dtype cannot be used here; the message says what to use."""


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    location: str
    # For a single-file transformer: the folder or repo id of the other components.
    base: ModelSource | None = None

    def describe(self) -> str:
        text = f"{self.kind} {self.location}"
        return f"{text} (other components from {self.base.describe()})" if self.base else text


@dataclass(frozen=True)
class Placement:
    device: str
    dtype_name: str
    reason: str

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)


DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("cuda", "mps", "cpu")


def default_model() -> str:
    """`FLUX_MODEL`, else `weights/FLUX.1-dev` when it exists, else the hub repo id."""
    return os.environ.get(settings.MODEL_ENV) or _default_base()


def tiny_model_dir() -> Path:
    """The cache folder of the `--model tiny` pipeline (under `XDG_CACHE_HOME`)."""
    from flux_infer.tiny import VERSION

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "flux-infer" / f"tiny-v{VERSION}-seed0"


def resolve_source(model: str | None = None, *, base_model: str | None = None) -> ModelSource:
    """Say what `model` names, without loading or downloading anything."""
    model = model or default_model()
    if base_model is not None and not model.endswith(SINGLE_FILE_SUFFIXES):
        raise ModelLoadError(f"--base-model completes a single-file transformer (a .safetensors or .gguf "
                             f"--model); {model} is a whole pipeline already: leave --base-model out")
    if model == settings.TINY_MODEL_NAME:
        return ModelSource("tiny", str(tiny_model_dir()))
    if model in (settings.RANDOM_MODEL_NAME, settings.RANDOM_SMALL_MODEL_NAME):
        return ModelSource("random", model)
    path = Path(model).expanduser()
    refuse_pickle(model)
    if model.endswith(SINGLE_FILE_SUFFIXES):
        if not path.is_file():
            raise ModelLoadError(f"transformer checkpoint {model} does not exist. {settings.DOWNLOAD_HINT}")
        base = resolve_source(base_model or _default_base())
        if base.kind == "single_file":
            raise ModelLoadError("--base-model must be a diffusers folder or repo id, not another single file")
        return ModelSource("single_file", str(path), base=base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers pipeline folder (no model_index.json). {settings.DOWNLOAD_HINT}"
            )
        transformer = path / "transformer"
        if transformer.is_dir() and not any(transformer.glob("*.safetensors")) and any(
                f.suffix in PICKLE_SUFFIXES for f in transformer.iterdir()):
            raise ModelLoadError(PICKLE_REFUSED.format(path=transformer))
        return ModelSource("folder", str(path))
    if _REPO_ID.match(model) and not model.startswith((".", "/", "~")):
        return ModelSource("repo", model)
    raise ModelLoadError(f"model folder {model} does not exist. {settings.DOWNLOAD_HINT}")


def _default_base() -> str:
    """`weights/FLUX.1-dev` when it exists, else the hub repo id."""
    if settings.DEFAULT_LOCAL_MODEL.is_dir():
        return str(settings.DEFAULT_LOCAL_MODEL)
    return settings.DEFAULT_REPO_ID


def resolve_placement(device: str | None = None, dtype: str | None = None) -> Placement:
    """Choose the device and dtype, and say why. CUDA -> bfloat16, otherwise CPU -> float32."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            device, why = "cuda", f"CUDA device found ({torch.cuda.get_device_name(0)})"
        else:
            device, why = "cpu", "no CUDA device found"
        kind = device
    else:
        device = device.lower()
        try:
            parsed = torch.device(device)
            kind, index = parsed.type, parsed.index
        except RuntimeError:
            kind = index = None
        if kind not in DEVICES:
            raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, optionally numbered (cuda:1), "
                              f"got {device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(
                f"--device {device} was asked for, but torch {torch.__version__} ({build}) sees no CUDA GPU: "
                "check `nvidia-smi` and install a CUDA build of torch, or use --device cpu"
            )
        count = torch.cuda.device_count() if kind == "cuda" else 0
        if kind == "cuda" and index is not None and index >= count:
            raise DeviceError(
                f"--device {device}: torch sees {count} CUDA GPU{'s' if count != 1 else ''} here "
                f"({', '.join(f'cuda:{n}' for n in range(count))}; CUDA_VISIBLE_DEVICES renumbers them): pick "
                "one of those, or --device cuda for the first"
            )
        if kind == "mps" and not torch.backends.mps.is_available():
            raise DeviceError("--device mps was asked for, but this machine has no MPS device: use --device cpu")
        why = "asked for with --device"
    if dtype is None:
        if kind == "cpu":
            # bfloat16 matmuls are slow on most CPUs and float16 lacks CPU kernels.
            dtype, dtype_why = "float32", "float32 on CPU"
        else:
            dtype, dtype_why = "bfloat16", "bfloat16, FLUX.1-dev's native precision"
    else:
        if dtype not in DTYPES:
            raise DeviceError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype_why = "asked for with --dtype"
    return Placement(device=device, dtype_name=dtype, reason=f"{why}; {dtype_why}")


def ensure_tiny(directory: Path | None = None) -> Path:
    """Make the tiny pipeline in `directory` unless it is already there; return the folder."""
    from flux_infer.tiny import make_tiny

    directory = directory or tiny_model_dir()
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent or interrupted run never sees half.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    try:
        make_tiny(staging, seed=0)
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("made the tiny random pipeline in %s", directory)
    return directory


def _download(repo_id: str, *, transformer_weights: bool) -> str:
    """Fetch a pipeline repo into huggingface_hub's cache (or find it there) and return the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    patterns = list(PIPELINE_PATTERNS)
    ignore = None if transformer_weights else ["transformer/*.safetensors"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore)
    except GatedRepoError:
        reason = f"{repo_id} is gated and this token may not read it (accept the licence on its page, set HF_TOKEN)"
    except RepositoryNotFoundError:
        reason = f"the repo {repo_id} was not found, or is private and HF_TOKEN is not set"
    except (OfflineModeIsEnabled, FileNotFoundError):
        reason = f"{repo_id} is not in the local Hugging Face cache and downloading is off (HF_HUB_OFFLINE)"
    except OSError as err:  # connection refused, DNS, TLS, HTTP errors: huggingface_hub's are OSErrors
        reason = f"could not download {repo_id} ({type(err).__name__}: {first_line(err)})"
    raise ModelLoadError(f"{reason}. {settings.DOWNLOAD_HINT}")


def _local_folder(source: ModelSource, *, transformer_weights: bool = True) -> str:
    if source.kind == "tiny":
        return str(ensure_tiny(Path(source.location)))
    if source.kind == "repo":
        return _download(source.location, transformer_weights=transformer_weights)
    return source.location


def parse_lora(text: str) -> tuple[str, float]:
    """`style.safetensors` or `style.safetensors:0.8` -> (path, scale)."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def check_lora_files(loras) -> None:
    """ModelLoadError for a start-up LoRA (--lora) that is not a safetensors file there: said before
    the model loads (a minute for FLUX.1-dev), not after."""
    for path, _ in loras:
        refuse_pickle(path)
        if not Path(path).is_file():
            file, colon, scale = str(path).rpartition(":")
            if colon and Path(file).is_file():  # parse_lora kept a scale that is not a number in the path
                raise ModelLoadError(f"--lora {path}: the scale after the colon must be a number, got {scale!r}")
            raise ModelLoadError(f"LoRA file {path} does not exist (--lora PATH[:SCALE])")


def apply_loras(pipeline, loras) -> None:
    """Load LoRA safetensors through diffusers, fuse them at their scales, and drop the adapters."""
    if not loras:
        return
    from flux_infer.loras import stacking_adapters

    names, scales = [], []
    for index, (path, scale) in enumerate(loras):
        name = f"lora{index}"
        try:
            with stacking_adapters():
                pipeline.load_lora_weights(path, adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"could not load {path} as a FLUX LoRA: {first_line(err)}") from None
        names.append(name)
        scales.append(scale)
        log.info("LoRA %s at scale %g", path, scale)
    pipeline.set_adapters(names, adapter_weights=scales)
    pipeline.fuse_lora(adapter_names=names)
    pipeline.unload_lora_weights()


class Loaded(NamedTuple):
    pipeline: object
    source: ModelSource
    placement: Placement
    runtime: object  # flux_infer.tuning.Runtime
    adapters: object  # flux_infer.loras.LoraAdapters with a LoRA folder, else None


def load_pipeline(
    model: str | None = None,
    *,
    base_model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    options=None,
    loras: tuple[tuple[str, float], ...] = (),
    lora_folder=None,
) -> Loaded:
    """Load a FluxPipeline from `model` (see the module docstring) and apply `options`.

    `options` (flux_infer.tuning.Options, default: its defaults) choose quantization at load time,
    then placement or offloading, attention, cache and compilation. `loras` ((path, scale), ...) are
    fused into the weights before any of that. `lora_folder` (flux_infer.loras.LoraFolder) sets up the
    per-request LoRAs, hot-swap slots included, before compiling. Raises ModelLoadError,
    DeviceError or tuning.OptionError with a message that says what to do.
    """
    from flux_infer import tuning

    options = options or tuning.Options()
    placement = resolve_placement(device, dtype)
    source = resolve_source(model, base_model=base_model)
    check_lora_files(loras)
    if lora_folder is not None:
        lora_folder.check(compiled=options.compile)
    log.info("device %s, dtype %s: %s", placement.device, placement.dtype_name, placement.reason)
    tuning.use_device(placement.device)
    tuning.limit_gpu_memory(options.gpu_memory, placement.device)
    gguf = source.kind == "single_file" and source.location.endswith(".gguf")
    plan = tuning.resolve_plan(options, placement, gguf_bytes=Path(source.location).stat().st_size if gguf else None,
                               switching_loras=lora_folder is not None)
    log.info("memory: %s (%s)", plan.describe(), plan.reason)
    log.info("loading %s", source.describe())
    # Find (or fetch) the files before importing diffusers: weights that are missing are said in a
    # second rather than after diffusers' imports.
    if source.kind == "single_file":
        folder = _local_folder(source.base, transformer_weights=False)
    elif source.kind != "random":
        folder = _local_folder(source)

    import torch

    try:
        if source.kind == "random":
            from flux_infer.random_weights import build_pipeline

            pipeline = build_pipeline(source.location, placement=placement, plan=plan,
                                      gpu_memory_gib=options.gpu_memory)
        else:
            # fp8-storage: the transformer's weights are prepared (tuning.prepare_weights) as soon as
            # it is read, before T5 is, unless start-up LoRAs are to be fused into them first.
            prepare = (None if plan.quantize != "fp8-storage" or loras else
                       functools.partial(tuning.prepare_weights, options=options, plan=plan,
                                         compute_dtype=placement.dtype))
            pipeline = _read_pipeline(source, folder, placement, plan, gguf=gguf, prepare=prepare)
        return _finish(pipeline, source, placement, plan, options, loras, lora_folder)
    except torch.OutOfMemoryError:
        pass  # said below, once the exception (and with it the part-loaded model) is let go
    raise ModelLoadError(_out_of_memory(placement, plan, options))


def _out_of_memory(placement, plan, options) -> str:
    """What to do when the model did not fit the GPU while loading or being set up; the memory
    free is read once the part-loaded model's blocks are given back."""
    import gc

    import torch

    from flux_infer import tuning

    gc.collect()
    torch.cuda.empty_cache()
    free = tuning.free_bytes(placement.device, options.gpu_memory) / 1024**3
    if options.explicit_memory or options.memory == "off":
        advice = ("leave the memory options out: --memory auto then plans for the memory that is free, or ask for a "
                  "leaner plan (--quantize fp8, --offload t5, --offload model)")
    else:
        advice = ("another program may be using the GPU (see nvidia-smi); ask for a leaner plan than --memory auto "
                  "chose (--quantize fp8 --offload t5, --quantize nf4 --offload t5, or --offload group)")
    return (f"out of GPU memory while loading the model onto {placement.device} with {plan.describe()} "
            f"({plan.reason}); {free:.1f} GiB free now: {advice}")


def _read_pipeline(source, folder, placement, plan, *, gguf: bool, prepare=None):
    """A FluxPipeline from a diffusers folder, with a single-file transformer when `source` is one.
    `prepare(transformer)` (fp8-storage): the transformer is read first and prepared (stored in
    float8) before T5 is read, so RAM holds its bf16 weights (24 GB in FLUX.1-dev) or T5's (9.5 GB)
    beside its float8 ones (12 GB), never both models' bf16 weights (34 GB): what a 32 GB machine
    with an 8 GB card needs."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel, PipelineQuantizationConfig
    from transformers import T5EncoderModel

    from flux_infer import tuning

    # Read the weights straight onto the device they will run on (quantized there, tensor by
    # tensor), unless they are offloaded or cast for storage after loading: no full copy in RAM.
    # With offload t5, T5 alone is read into RAM, where it stays.
    direct = plan.offload in tuning.RESIDENT_TRANSFORMER and plan.quantize != "fp8-storage"
    # diffusers' pipeline device_map names a device type ("cuda"), not a numbered GPU ("cuda:1"). For
    # one, the transformer and T5 (97% of the bytes) are read onto it each with its own device_map, and
    # the small components are moved there after loading.
    numbered = direct and ":" in placement.device
    configs = tuning.quantization_configs(plan, placement)
    components = {}
    if source.kind == "single_file":
        if gguf:
            from diffusers import GGUFQuantizationConfig

            quantization = GGUFQuantizationConfig(compute_dtype=placement.dtype)
            configs.pop("transformer", None)
        else:
            quantization = configs.pop("transformer", None)
        try:
            # A single file's loader reads onto `device` (its device_map only sizes an allocator warm-up).
            components["transformer"] = FluxTransformer2DModel.from_single_file(
                source.location, config=folder, subfolder="transformer", dtype=placement.dtype,
                quantization_config=quantization, device=placement.device if direct else None,
            )
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(
                f"could not read {source.location} as a FLUX transformer checkpoint: {err}"
            ) from None
    try:
        if prepare is not None:
            if "transformer" not in components:
                components["transformer"] = FluxTransformer2DModel.from_pretrained(
                    folder, subfolder="transformer", dtype=placement.dtype, use_safetensors=True)
            prepare(components["transformer"])
        if direct and tuning.in_ram(plan, "text_encoder_2"):
            components["text_encoder_2"] = T5EncoderModel.from_pretrained(
                folder, subfolder="text_encoder_2", dtype=placement.dtype, use_safetensors=True)
        if numbered:
            for name, model_class in (("transformer", FluxTransformer2DModel), ("text_encoder_2", T5EncoderModel)):
                if name not in components:
                    components[name] = model_class.from_pretrained(
                        folder, subfolder=name, dtype=placement.dtype, use_safetensors=True,
                        quantization_config=configs.pop(name, None), device_map=placement.device)
        quantization = PipelineQuantizationConfig(quant_mapping=configs) if configs else None
        pipeline = FluxPipeline.from_pretrained(folder, dtype=placement.dtype, use_safetensors=True,
                                                quantization_config=quantization,
                                                device_map=placement.device if direct and not numbered else None,
                                                **components)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load a FluxPipeline from {folder}: {err}. {settings.DOWNLOAD_HINT}") from None
    return pipeline


def _finish(pipeline, source, placement, plan, options, loras, lora_folder) -> Loaded:
    """Fuse the start-up LoRAs, set up the per-request ones, then tune (compile last)."""
    from flux_infer import tuning

    apply_loras(pipeline, loras)
    adapters = lora_folder.adapters(pipeline, compiled=options.compile) if lora_folder is not None else None
    runtime = tuning.Runtime(pipeline, options, plan, placement.device).apply(placement)
    return Loaded(pipeline, source, placement, runtime, adapters)


@dataclass(frozen=True)
class InferenceSpec:
    """Everything needed to build a FluxInference: what the CLI asked for, picklable, so that Ray
    Serve replicas build theirs exactly as a single-process server does."""

    model: str | None = None
    base_model: str | None = None
    device: str | None = None
    dtype: str | None = None
    options: object = None  # flux_infer.tuning.Options
    loras: tuple[tuple[str, float], ...] = ()
    lora_folder: object = None  # flux_infer.loras.LoraFolder (--lora-dir)
    preview: str = "none"
    preview_every: int = 1
    taef1: str | None = None
    progress_bar: bool = False
    serving: bool = False  # a server's: on a GPU, an image at start-up takes the first request's one-time costs


def load_inference(spec: InferenceSpec):
    """Load the preview decoder and the pipeline for `spec`, warm up (Runtime.start_up_images); a FluxInference.

    The preview decoder (a few MB) comes first: one that cannot load is said before the model's minute.
    """
    from flux_infer import tuning
    from flux_infer.inference import FluxInference
    from flux_infer.previews import load_preview_decoder

    options = spec.options or tuning.Options()
    placement = resolve_placement(spec.device, spec.dtype)
    decoder = load_preview_decoder(spec.preview, taef1=spec.taef1, device=placement.device, dtype=placement.dtype)
    pipeline, _, placement, runtime, adapters = load_pipeline(
        spec.model, base_model=spec.base_model, device=spec.device, dtype=spec.dtype, options=options,
        loras=spec.loras, lora_folder=spec.lora_folder)
    inference = FluxInference(pipeline, runtime=runtime, preview=decoder, preview_every=spec.preview_every,
                              progress_bar=spec.progress_bar, adapters=adapters)
    start_up = runtime.start_up_images(serving=spec.serving)
    if start_up is not None:
        import torch._dynamo.exc

        from flux_infer.cuda_graphs import GraphCaptureError

        try:
            inference.warm_up(*start_up)
        except torch._dynamo.exc.TorchDynamoException as err:  # no C++ compiler (CPU), no Triton (GPU), ...
            log.error("--compile: torch.compile failed", exc_info=True)
            raise tuning.compile_failure(err) from None
        except GraphCaptureError as err:  # logged where it failed
            raise tuning.OptionError(str(err)) from None
    return inference
