"""LoRAs chosen per request from a folder (`--lora-dir`), switched without a restart or a recompile.

- `LoraLibrary` is the folder: the `.safetensors` files in it by name (nothing outside it is read;
  it is listed again when it changes), each described from its header alone (rank, layers).
- `parse_loras()` validates a request's choice ([{"name", "scale"}, ...] or "name:scale" texts)
  against the library and the limits in `settings` into a tuple of `LoraChoice`.
- `LoraAdapters` makes a pipeline use a choice, through diffusers' and PEFT's own machinery:
  eager, each LoRA is loaded once as a PEFT adapter and kept (at most `cache_size`, the least
  recently used deleted) and `set_adapters` picks the request's ones and scales; a request with
  none runs with the adapters disabled, the base layers alone (the pixels of a server without
  LoRAs). With `--compile`, the transformer is given `settings.MAX_LORAS` adapter slots before it is
  compiled (`enable_lora_hotswap` at the largest rank in the folder) and each request's LoRAs are
  hot-swapped into them, their scales folded into the weights: a new LoRA or scale never recompiles.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_infer import settings
from flux_infer.errors import first_line
from flux_infer.inference import NO_LORA_FOLDER, InvalidRequest, LoraChoice

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stacking_adapters():
    """Around loading a LoRA beside others: PEFT warns "Already found a `peft_config` ... multiple
    adapters in the model" for each after the first, and here that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        yield


# A LoRA file's tensors are named <module>.<part>.weight (diffusers/PEFT) or <module>.<part>.weight
# and <module>.alpha (kohya); the module is what it touches.
_PARTS = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)\.weight$|\.alpha$")
_DOWN = re.compile(r"\.(lora_A|lora_down|lora\.down)\.weight$")


class LoraFileError(ValueError):
    """A file in the LoRA folder is not a LoRA this server can use; the message says which and why."""


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file's header says: its name in the folder, rank and the layers it changes."""

    name: str
    path: str
    rank: int
    layers: tuple[str, ...]
    bytes: int
    mtime_ns: int

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "layers": len(self.layers),
                "targets": sorted({_layer_kind(layer) for layer in self.layers}), "bytes": self.bytes}


def _layer_kind(layer: str) -> str:
    """`transformer.transformer_blocks.3.attn.to_q` -> `transformer_blocks.attn.to_q`."""
    parts = [part for part in layer.split(".") if not part.isdigit()]
    if parts and parts[0] in ("transformer", "lora_unet", "diffusion_model"):
        parts = parts[1:]
    return ".".join(parts)


def read_header(path: str | Path, name: str) -> LoraInfo:
    """Describe a LoRA file from its safetensors header (no weights are read). LoraFileError if it
    is not a safetensors file or has no LoRA tensors."""
    from safetensors import safe_open

    path = Path(path)
    stat = path.stat()
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header
        raise LoraFileError(f"LoRA {name!r} ({path.name}) is not a readable safetensors file: "
                            f"{first_line(err)}") from None
    layers = sorted({_PARTS.sub("", key) for key in shapes if _PARTS.search(key)})
    ranks = {shape[0] for key, shape in shapes.items() if _DOWN.search(key) and shape}
    if not layers or not ranks:
        raise LoraFileError(f"LoRA {name!r} ({path.name}) has no LoRA weights (no lora_A/lora_down tensors): "
                            "is it a LoRA for FLUX.1?")
    return LoraInfo(name=name, path=str(path), rank=max(ranks), layers=tuple(layers), bytes=stat.st_size,
                    mtime_ns=stat.st_mtime_ns)


class LoraLibrary:
    """The `.safetensors` files of one folder, by name (the file name without `.safetensors`).

    The folder is listed again whenever its modification time changes, so a file copied in is usable
    at once; headers are read once per file version. Only regular files directly in the folder count:
    no sub-folders, no links out of it, no pickles (`.ckpt`, `.pt`, `.bin` are never listed).
    """

    SUFFIX = ".safetensors"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise LoraFileError(f"--lora-dir {folder} is not a folder: create it or point it at your LoRA files")
        self._lock = threading.Lock()
        self._listed: tuple[int, dict[str, Path]] | None = None
        self._headers: dict[tuple[str, int, int], LoraInfo] = {}

    def _files(self) -> dict[str, Path]:
        with self._lock:
            mtime = self.folder.stat().st_mtime_ns
            if self._listed is None or self._listed[0] != mtime:
                files = {}
                for entry in os.scandir(self.folder):
                    if (entry.name.endswith(self.SUFFIX) and entry.is_file(follow_symlinks=False)
                            and not entry.name.startswith(".")):
                        files[entry.name[: -len(self.SUFFIX)]] = Path(entry.path)
                self._listed = (mtime, dict(sorted(files.items())))
            return self._listed[1]

    def names(self) -> list[str]:
        return list(self._files())

    def info(self, name: str) -> LoraInfo:
        """The header of LoRA `name`; InvalidRequest naming the known ones if there is none."""
        path = self._files().get(name) if isinstance(name, str) else None
        if path is None:
            known = ", ".join(self.names()) or f"none: put .safetensors files in {self.folder}"
            raise InvalidRequest(f"unknown LoRA {name!r}; known LoRAs: {known}")
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise InvalidRequest(f"LoRA {name!r} was removed from {self.folder}") from None
        key = (name, stat.st_mtime_ns, stat.st_size)
        if key not in self._headers:
            self._headers[key] = read_header(path, name)
        return self._headers[key]

    def slot_layers(self) -> tuple[list[str], dict[str, str]]:
        """Every layer the folder's LoRAs touch (what --compile's hot-swap slots must cover), and the
        files left out, each with why it is not a usable LoRA (GET /v1/loras lists them so too).
        LoraFileError when no LoRA is left."""
        layers, left_out = set(), {}
        for name in self.names():
            try:
                layers.update(self.info(name).layers)
            except (LoraFileError, InvalidRequest) as err:
                left_out[name] = str(err)
        if not layers:
            raise LoraFileError(f"--compile with --lora-dir needs the LoRAs in {self.folder} at start-up "
                                "(the compiled slots cover the layers they touch)")
        return sorted(layers), left_out

    def describe(self) -> list[dict[str, Any]]:
        """Every usable LoRA's summary (for GET /v1/loras); a file that is not a LoRA is listed with
        its error instead."""
        listed = []
        for name in self.names():
            try:
                listed.append(self.info(name).summary())
            except (LoraFileError, InvalidRequest) as err:
                listed.append({"name": name, "error": str(err)})
        return listed


def _choice(item: Any) -> tuple[Any, Any]:
    if isinstance(item, str):
        name, sep, scale = item.rpartition(":")
        return (name, scale) if sep else (item, settings.LORA_SCALE.default)
    if isinstance(item, dict):
        unknown = set(item) - {"name", "scale"}
        if unknown:
            raise InvalidRequest(f"loras: a LoRA is {{\"name\": ..., \"scale\": ...}}; unknown key(s): "
                                 f"{', '.join(sorted(map(str, unknown)))}")
        return item.get("name"), item.get("scale", settings.LORA_SCALE.default)
    raise InvalidRequest(f"loras: each LoRA is {{\"name\": ..., \"scale\": ...}} or \"name:scale\", got {item!r}")


def parse_loras(value: Any, library: LoraLibrary | None) -> tuple[LoraChoice, ...]:
    """A request's LoRAs, validated: known names, scales within settings.LORA_SCALE, at most
    settings.MAX_LORAS, each name once, headers readable and ranks within the hot-swap target."""
    from flux_infer.inference import _number

    if value is None or value == [] or value == "":
        return ()
    if library is None:
        raise InvalidRequest(NO_LORA_FOLDER)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise InvalidRequest(f"loras must be a list of {{\"name\": ..., \"scale\": ...}}, got {value!r}")
    if len(items) > settings.MAX_LORAS:
        raise InvalidRequest(f"loras: at most {settings.MAX_LORAS} LoRAs per image, got {len(items)}")
    choices = []
    for item in items:
        name, scale = _choice(item)
        name = name.strip() if isinstance(name, str) else name
        scale = float(_number(f"scale of LoRA {name!r}", scale, settings.LORA_SCALE, whole=False))
        try:
            library.info(name)
        except LoraFileError as err:
            raise InvalidRequest(str(err)) from None
        if any(choice.name == name for choice in choices):
            raise InvalidRequest(f"loras: LoRA {name!r} is listed twice; give it once with its scale")
        choices.append(LoraChoice(name, scale))
    return tuple(choices)


@dataclass(frozen=True)
class LoraFolder:
    """--lora-dir, --lora-cache and --lora-rank: picklable, so Ray Serve replicas set up theirs."""

    path: str
    cache: int = settings.DEFAULT_LORA_CACHE
    rank: int = settings.DEFAULT_LORA_RANK

    def __post_init__(self):
        if self.cache < settings.MAX_LORAS:
            raise ValueError(f"--lora-cache must be at least {settings.MAX_LORAS} (the LoRAs one image may use), "
                             f"got {self.cache}")
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be at least 1, got {self.rank}")
        self.library()  # the folder is there

    def library(self) -> LoraLibrary:
        return LoraLibrary(self.path)

    def check(self, *, compiled: bool) -> None:
        """With --compile, that the folder has LoRAs for the hot-swap slots, and which files the slots
        leave out: said once, before the model loads."""
        if compiled:
            _, left_out = self.library().slot_layers()
            for name, why in left_out.items():
                log.warning("LoRA hot-swap slots leave %s out: %s", name, why)

    def adapters(self, pipeline, *, compiled: bool) -> LoraAdapters:
        """The pipeline's switcher; with `compiled`, its hot-swap slots are made now (before compiling)."""
        adapters = LoraAdapters(pipeline, self.library(), cache_size=self.cache,
                                hotswap_rank=self.rank if compiled else None)
        if compiled:
            adapters.prepare_slots()
        return adapters


class LoraAdapters:
    """Switches a pipeline's per-request LoRAs (see the module docstring); made by
    `LoraFolder.adapters()`, which checked its sizes. Not thread-safe: call `use()` under the caller's
    pipeline lock, just before the pipeline runs."""

    def __init__(self, pipeline, library: LoraLibrary, *, cache_size: int = settings.DEFAULT_LORA_CACHE,
                 hotswap_rank: int | None = None):
        self.pipeline = pipeline
        self.library = library
        self.cache_size = cache_size
        self.hotswap_rank = hotswap_rank
        self._loaded: OrderedDict[tuple[str, int, int], str] = OrderedDict()  # eager: file version -> adapter
        self._weights: OrderedDict[tuple[str, int, int], dict] = OrderedDict()  # hot-swap: state dicts on CPU
        self._slots: list[tuple[LoraChoice, int] | None] = []
        self._serial = 0
        self._enabled = False

    # -- with --compile: slots prepared before compiling -------------------------------------------

    def prepare_slots(self) -> None:
        """Give the transformer MAX_LORAS adapter slots covering every layer the folder's LoRAs touch,
        at `hotswap_rank`, all zero: call once, before torch.compile."""
        layers, _ = self.library.slot_layers()  # what it leaves out was said by LoraFolder.check
        self.pipeline.enable_lora_hotswap(target_rank=self.hotswap_rank)
        # Each slot gets tensors of its own: PEFT may keep a loaded state dict's tensors as the
        # adapter's weights, and a hot swap copies into them.
        for slot in range(settings.MAX_LORAS):
            self._load(self._zero_state_dict(layers), f"slot{slot}")
            self._slots.append(None)
        self._zero = self._zero_state_dict(layers)
        self.pipeline.set_adapters([f"slot{slot}" for slot in range(settings.MAX_LORAS)],
                                   adapter_weights=[1.0] * settings.MAX_LORAS)
        self._layers = set(layers)
        log.info("LoRA hot-swap: %d slots of rank %d over %d layers", settings.MAX_LORAS, self.hotswap_rank,
                 len(layers))

    def _zero_state_dict(self, layers) -> dict:
        import torch

        transformer = self.pipeline.transformer
        tensors = {}
        for layer in layers:
            name = layer.removeprefix("transformer.")
            try:
                module = transformer.get_submodule(name)
            except AttributeError:
                raise LoraFileError(f"a LoRA in {self.library.folder} touches {layer}, which FLUX.1's transformer "
                                    "does not have: is it a LoRA for FLUX.1 in diffusers' layout?") from None
            tensors[f"transformer.{name}.lora_A.weight"] = torch.zeros(self.hotswap_rank, module.in_features)
            tensors[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, self.hotswap_rank)
        return tensors

    def _load(self, source, adapter: str, **options) -> None:
        with stacking_adapters():
            self.pipeline.load_lora_weights(source, adapter_name=adapter, **options)

    # -- per request ---------------------------------------------------------------------------------

    def use(self, choices: tuple[LoraChoice, ...]) -> None:
        """Make the next pipeline call use exactly `choices` (none: the base model)."""
        if self._slots:
            self._swap(choices)
            return
        if not choices:
            if self._enabled:
                self.pipeline.disable_lora()
                self._enabled = False
            return
        adapters = [self._adapter(choice.name, keep={c.name for c in choices}) for choice in choices]
        if not self._enabled:
            self.pipeline.enable_lora()
            self._enabled = True
        self.pipeline.set_adapters(adapters, adapter_weights=[choice.scale for choice in choices])

    def _version(self, name: str):
        info = self.library.info(name)
        return info, (name, info.mtime_ns, info.bytes)

    def _adapter(self, name: str, keep: set[str]) -> str:
        info, version = self._version(name)
        if version in self._loaded:
            self._loaded.move_to_end(version)
            return self._loaded[version]
        while len(self._loaded) >= self.cache_size:
            old = next(old for old in self._loaded if old[0] not in keep)
            self.pipeline.delete_adapters(self._loaded.pop(old))
            log.info("LoRA %s dropped from the cache (--lora-cache %d)", old[0], self.cache_size)
        self._serial += 1
        adapter = f"lora{self._serial}"
        try:
            self._load(info.path, adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise InvalidRequest(f"LoRA {name!r} could not be loaded as a FLUX LoRA: "
                                 f"{first_line(err)}") from None
        self._loaded[version] = adapter
        log.info("LoRA %s loaded (rank %d, %d layers)", name, info.rank, len(info.layers))
        return adapter

    def _state_dict(self, name: str) -> dict:
        """LoRA `name`'s tensors in diffusers' layout, kept on the CPU (LRU, cache_size)."""
        info, version = self._version(name)
        if version in self._weights:
            self._weights.move_to_end(version)
            return self._weights[version]
        if info.rank > self.hotswap_rank:
            raise InvalidRequest(f"LoRA {name!r} has rank {info.rank}, above this server's hot-swap rank "
                                 f"{self.hotswap_rank}: restart with --lora-rank {info.rank} or higher")
        outside = set(info.layers) - self._layers
        if outside:
            raise InvalidRequest(f"LoRA {name!r} touches {len(outside)} layer(s) that the compiled slots do not "
                                 f"cover (e.g. {sorted(outside)[0]}): restart the server to compile them in")
        state_dict, alphas = self.pipeline.lora_state_dict(info.path, return_alphas=True)
        if alphas:
            raise InvalidRequest(f"LoRA {name!r} carries alpha values; with --compile, convert it to diffusers' "
                                 "layout first (pipeline.save_lora_weights)")
        while len(self._weights) >= self.cache_size:
            self._weights.popitem(last=False)
        self._weights[version] = state_dict
        return state_dict

    def _swap(self, choices: tuple[LoraChoice, ...]) -> None:
        wanted = [(choice, self._version(choice.name)[1]) for choice in choices]
        wanted += [None] * (len(self._slots) - len(wanted))
        for slot, entry in enumerate(wanted):
            if self._slots[slot] == entry:
                continue
            if entry is None:
                weights = self._zero
            else:
                choice, _ = entry
                weights = {key: value * choice.scale if ".lora_B." in key else value
                           for key, value in self._state_dict(choice.name).items()}
            self._load(weights, f"slot{slot}", hotswap=True)
            self._slots[slot] = entry
