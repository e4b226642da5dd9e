"""FLUX.1-dev's real architecture with random weights: true speed and memory without the weights.

`--model random` builds FLUX.1-dev's transformer, T5-XXL encoder, CLIP-L encoder and VAE from
their published configs (below) with random weights, for "how fast and how lean is this card?"
without 34 GB of downloads or a licence. The images are noise; the shapes and kernels, and so the
seconds and the bytes, are FLUX.1-dev's.

Building is fast and lean: each model is made on the meta device (nothing allocated), then every
parameter is allocated where it is made (the GPU when there is one), filled in place, and, block
by block, quantized there as the memory plan says and moved to where it will live (the CPU when
offloading). No float32 copy ever exists (47.6 GB for the transformer alone), and the peak is the
final weights plus one block.

`--model random-small` is the same code at a width a CPU runs in seconds: for tests and for
checking a GPU script before spending GPU time on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flux_infer import settings

log = logging.getLogger(__name__)

# FLUX.1-dev's configs (its repo's transformer/, text_encoder/, text_encoder_2/, vae/ and
# scheduler/ config files).
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
          dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
# The checkpoint holds one input embedding, shared by the encoder: transformers ties it while
# tie_word_embeddings keeps its default (an encoder has no LM head to untie).
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=16, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611,
           shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
# TAEF1 (madebyollin/taef1), the tiny preview decoder: AutoencoderTiny's defaults with 16 latent channels.
TAEF1 = dict(latent_channels=16)

# Parameter counts of the models above (counted on the meta device).
PARAMETERS = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
              "vae": 83_819_683}

# Weights are drawn from N(0, 0.02): activations stay finite through all 57 blocks in bfloat16.
INIT_STD = 0.02
# Room left for activations, the CUDA context and the allocator when checking that weights fit.
MARGIN_GIB = 1.0


@dataclass(frozen=True)
class Architecture:
    """The four models' configs; `overrides` shrink them for `random-small`."""

    name: str
    transformer: dict = field(default_factory=lambda: dict(TRANSFORMER))
    t5: dict = field(default_factory=lambda: dict(T5))
    clip: dict = field(default_factory=lambda: dict(CLIP))
    vae: dict = field(default_factory=lambda: dict(VAE))


def _small() -> Architecture:
    # FLUX.1-dev's head size, rope axes, vocabularies and VAE depth; fewer, narrower layers.
    return Architecture(
        name=settings.RANDOM_SMALL_MODEL_NAME,
        transformer={**TRANSFORMER, "num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2,
                     "joint_attention_dim": 256, "pooled_projection_dim": 64},
        t5={**T5, "d_model": 256, "d_ff": 512, "num_layers": 2, "num_heads": 4},
        clip={**CLIP, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": 64},
        vae={**VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
    )


def architecture(name: str) -> Architecture:
    """`random` (FLUX.1-dev at full size) or `random-small`."""
    if name == settings.RANDOM_MODEL_NAME:
        return Architecture(name=name)
    if name == settings.RANDOM_SMALL_MODEL_NAME:
        return _small()
    raise ValueError(f"no random architecture called {name!r}: use {settings.RANDOM_MODEL_NAME} or "
                     f"{settings.RANDOM_SMALL_MODEL_NAME}")


def empty_models(arch: Architecture) -> dict:
    """The four models on the meta device (no memory), keyed by their FluxPipeline component names."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    # Parameters on meta; buffers (CLIP's position ids) stay real, so they need no re-making.
    with init_empty_weights():
        models = {
            "transformer": FluxTransformer2DModel(**arch.transformer),
            "text_encoder_2": T5EncoderModel(T5Config(**arch.t5)),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.clip)),
            "vae": AutoencoderKL(**arch.vae),
        }
    models["text_encoder_2"].tie_weights()  # what from_pretrained does: one embedding for T5's input
    return models


def count_parameters(model) -> int:
    """Parameters of a model, each shared (tied) one once."""
    return sum(p.numel() for p in model.parameters())


def _is_linear_weight(module, name: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and name == "weight"


# Bytes per weight of a quantized Linear layer: 8-bit, or NF4's 4 bits plus a scale per 64.
QUANTIZED_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 4 / 64}


def weight_bytes(models: dict, *, dtype, quantized: dict[str, str]) -> dict[str, int]:
    """Bytes each model's weights take, given `quantized` ({component: int8|fp8|nf4})."""
    sizes = {}
    for component, model in models.items():
        kind, seen, total = quantized.get(component), set(), 0
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied: stored once
                    continue
                seen.add(id(param))
                per = QUANTIZED_BYTES[kind] if kind and _is_linear_weight(module, name) else dtype.itemsize
                total += int(param.numel() * per)
        sizes[component] = total
    return sizes


def _units(model):
    """(prefix, module) pieces made one at a time: each block of the outermost ModuleLists (where
    nearly all the weights are), then the model itself for what those blocks do not hold."""
    import torch

    units, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, torch.nn.ModuleList):
            units += [(f"{name}.{index}.", block) for index, block in enumerate(module)]
            inside += (f"{name}.",)
    return units + [("", model)], inside


def _fill_(tensor, name: str, generator) -> None:
    if name.endswith("bias"):
        tensor.zero_()
    elif tensor.dim() == 1:  # norm scales
        tensor.fill_(1.0)
    else:
        tensor.normal_(0.0, INIT_STD, generator=generator)


def materialize(model, *, stage: str, home: str, dtype, quantize=None, seed: int = 0) -> None:
    """Allocate and fill `model`'s meta parameters on `stage`, block by block; quantize each block
    with `quantize(module, skip_prefixes)` if given, then move it to `home`.

    Tied parameters (T5's shared embedding) stay tied: each is made once. A real parameter is held
    here only until every module that shares it has it, so a block's unquantized weights are freed
    as soon as it is quantized: the peak is the final weights plus one block.
    """
    import torch

    generator = torch.Generator(device=stage).manual_seed(seed)
    # id(meta parameter) -> [meta parameter (kept alive for its id), modules still to get it, its real one]
    pending = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_meta:
                pending.setdefault(id(param), [param, 0, None])[1] += 1
    units, block_prefixes = _units(model)
    for prefix, unit in units:
        for module_name, module in unit.named_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:
                    continue
                entry = pending[id(param)]
                if entry[2] is None:
                    entry[2] = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=stage),
                                                  requires_grad=False)
                    _fill_(entry[2].data, name, generator)
                setattr(module, name, entry[2])
                entry[1] -= 1
                if entry[1] == 0:
                    entry[2] = None  # every holder has it: drop this reference
        if quantize is not None:
            quantize(unit, block_prefixes if not prefix else ())
        if home != stage:
            unit.to(home)
    model.to(home)  # buffers made on the CPU by init_empty_weights
    model.eval()
    model.requires_grad_(False)


def torchao_quantizer(config):
    """quantize(module, skip) with torchao: every Linear not under a prefix in `skip`."""
    import torch
    from torchao.quantization import quantize_

    def quantize(module, skip):
        def wanted(child, fqn):
            return isinstance(child, torch.nn.Linear) and not fqn.startswith(skip) and not _quantized(child)

        quantize_(module, config, filter_fn=wanted)

    return quantize


def _quantized(linear) -> bool:
    import torch

    return type(linear.weight) is not torch.nn.Parameter and type(linear.weight.data) is not torch.Tensor


def nf4_quantizer(dtype, device: str):
    """quantize(module, skip) with bitsandbytes: each Linear becomes a Linear4bit (NF4), as diffusers'
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") makes them when loading."""
    import bitsandbytes as bnb
    import torch

    def quantize(module, skip):
        for parent_name, parent in list(module.named_modules()):
            for name, child in list(parent.named_children()):
                fqn = f"{parent_name}.{name}" if parent_name else name
                if type(child) is not torch.nn.Linear or fqn.startswith(skip):
                    continue
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, layer.to(device))  # Params4bit quantizes as it moves to the GPU

    return quantize


def build_pipeline(name: str, *, placement, plan, gpu_memory_gib: float | None = None, seed: int = 0):
    """FluxPipeline with `name`'s architecture and random weights, placed for `plan` (a tuning.MemoryPlan).

    Raises loading.ModelLoadError, before allocating anything, when the weights cannot fit.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from flux_infer import tuning
    from flux_infer.loading import ModelLoadError
    from flux_infer.tiny import clip_tokenizer, t5_tokenizer

    arch = architecture(name)
    models = empty_models(arch)
    dtype = placement.dtype
    quantizer_kind = {"int8": "int8", "fp8": "fp8", "fp8-row": "fp8", "nf4": "nf4"}.get(plan.quantize)
    quantized = {}
    if quantizer_kind:
        quantized["transformer"] = quantizer_kind
        if plan.quantize_text_encoder:
            quantized["text_encoder_2"] = quantizer_kind
    sizes = weight_bytes(models, dtype=dtype, quantized=quantized)
    # Offloading keeps weights in RAM (all of them; T5's alone with offload t5) and moves them to the
    # GPU as they are used.
    homes = {component: "cpu" if tuning.in_ram(plan, component) else placement.device for component in models}
    stage = placement.device
    for home in dict.fromkeys(homes.values()):
        here = {component: size for component, size in sizes.items() if homes[component] == home}
        needed, free = sum(here.values()), tuning.free_bytes(home, gpu_memory_gib)
        if needed + MARGIN_GIB * 1024**3 > free:
            where = "this machine's RAM" if home == "cpu" else f"{placement.device}"
            advice = (f"use --model {settings.RANDOM_SMALL_MODEL_NAME} to check the code path here, or run on a GPU"
                      if home == "cpu" and not placement.device.startswith("cuda")
                      else "free memory, or let --memory auto choose quantization and offloading")
            raise ModelLoadError(
                f"--model {name} needs {needed / 1024**3:.1f} GiB for its weights in {placement.dtype_name} "
                f"({', '.join(f'{c} {b / 1024**3:.1f}' for c, b in here.items())}) plus {MARGIN_GIB:g} GiB, and "
                f"{where} has {free / 1024**3:.1f} GiB free: {advice}")

    def quantizer(component):
        kind = quantized.get(component)
        if kind == "nf4":
            return nf4_quantizer(dtype, placement.device)
        if kind:
            return torchao_quantizer(tuning.torchao_config(plan.quantize, placement))
        return None

    log.warning("--model %s: %s with RANDOM weights. Its images are noise; %s", name,
                "FLUX.1-dev's architecture" if name == settings.RANDOM_MODEL_NAME else "a scaled-down FLUX.1-dev",
                "its speed and memory are the real model's" if name == settings.RANDOM_MODEL_NAME
                else "it checks the code path, not speed or memory")
    with torch.no_grad():
        for index, (component, model) in enumerate(models.items()):
            materialize(model, stage=stage, home=homes[component], dtype=dtype, quantize=quantizer(component),
                        seed=seed + index)
    in_ram = [component for component, home in homes.items() if home != placement.device]
    where = ("cpu" if len(in_ram) == len(homes) else
             f"{placement.device}, {' and '.join(in_ram)} in RAM" if in_ram else placement.device)
    log.info("built %s with random weights on %s (%s GiB of weights%s)", name, where,
             f"{sum(sizes.values()) / 1024**3:.1f}", f", quantized {quantized}" if quantized else "")
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), tokenizer=clip_tokenizer(),
                        tokenizer_2=t5_tokenizer(), **models)


def save_taef1(directory, *, seed: int = 0):
    """Write a TAEF1-shaped AutoencoderTiny with random weights to `directory` (a --taef1 folder)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(**TAEF1).save_pretrained(directory, safe_serialization=True)
    return directory
