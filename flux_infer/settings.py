"""Every default and limit of flux-infer, written once.

The sliders, the CLI flags, the request validation and the tests all read these values. The
ranges are the ones of the Space `black-forest-labs/FLUX.1-dev` (its app.py), which is the API
contract: a script written for the Space must work unchanged against a local server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Range:
    """An inclusive numeric range with the UI's slider step and the API's default."""

    minimum: float
    maximum: float
    step: float
    default: float

    def describe(self) -> str:
        return f"between {_fmt(self.minimum)} and {_fmt(self.maximum)}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# numpy.iinfo(np.int32).max, the Space's MAX_SEED.
MAX_SEED = 2_147_483_647

SEED = Range(minimum=0, maximum=MAX_SEED, step=1, default=0)
WIDTH = Range(minimum=256, maximum=2048, step=32, default=1024)
HEIGHT = Range(minimum=256, maximum=2048, step=32, default=1024)
GUIDANCE_SCALE = Range(minimum=1, maximum=15, step=0.1, default=3.5)
NUM_INFERENCE_STEPS = Range(minimum=1, maximum=50, step=1, default=28)
RANDOMIZE_SEED_DEFAULT = True

# Images sent to be edited (and their masks): the most bytes read, and the most pixels decoded
# (checked from the file's header, before decoding). A side may exceed the output's 2048 limit: the
# image is then resized to the output size.
MAX_UPLOAD_BYTES = 25 * 2**20
MAX_UPLOAD_SIDE = 4096
MAX_UPLOAD_PIXELS = 4096 * 4096
STRENGTH = Range(minimum=0, maximum=1, step=0.01, default=0.6)

# Per-request LoRAs from --lora-dir: the scale each may have, how many one image may use, how many
# are kept loaded (--lora-cache), and the rank the --compile hot-swap slots are padded to (--lora-rank).
LORA_SCALE = Range(minimum=-2, maximum=2, step=0.05, default=1.0)
MAX_LORAS = 4
DEFAULT_LORA_CACHE = 8
DEFAULT_LORA_RANK = 64

# FLUX packs 2x2 latent patches and its VAE downsamples 8x, so pixel sizes must be multiples of 16.
# FluxPipeline floors other sizes (with a warning); infer() floors them first, so the size it
# reports is the size it made.
SIZE_MULTIPLE = 16

# CLIP reads 77 tokens and T5 512; a prompt far longer than that is a mistake, not a prompt.
MAX_PROMPT_CHARS = 10_000

# Prompts whose text embeddings (T5's and CLIP's, ~4 MB on the device each) are kept for the next
# image with the same prompt (FluxInference): a new seed skips the text encoders.
PROMPT_CACHE_SIZE = 16

# The Space's examples, and the fixed seed its lazily cached examples are generated with
# (the Space's infer() defaults: seed=42, randomize_seed=False).
EXAMPLES = (
    "a tiny astronaut hatching from an egg on the moon",
    "a cat holding a sign that says hello world",
    "an anime illustration of a wiener schnitzel",
)
EXAMPLE_SEED = 42

TITLE = "FLUX.1 [dev]"
DESCRIPTION = (
    "12B param rectified flow transformer guidance-distilled from "
    "[FLUX.1 [pro]](https://blackforestlabs.ai/)  \n"
    "[[non-commercial license](https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md)] "
    "[[blog](https://blackforestlabs.ai/announcing-black-forest-labs/)] "
    "[[model](https://huggingface.co/black-forest-labs/FLUX.1-dev)]"
)

# Where the weights come from when --model / FLUX_MODEL is not given.
DEFAULT_LOCAL_MODEL = Path("weights/FLUX.1-dev")
DEFAULT_REPO_ID = "black-forest-labs/FLUX.1-dev"
TINY_MODEL_NAME = "tiny"
# FLUX.1-dev's architecture with random weights (flux_infer.random_weights): full size, and CPU size.
RANDOM_MODEL_NAME = "random"
RANDOM_SMALL_MODEL_NAME = "random-small"
MODEL_ENV = "FLUX_MODEL"

# Server.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_QUEUE = 16
# Generated files in the server's temporary storage (Gradio's cache, the OpenAI route's url files)
# are deleted this many seconds after they were made (--keep-outputs).
DEFAULT_KEEP_OUTPUTS_S = 3600
# Recent images shown in the page's gallery, per browser session.
HISTORY_SIZE = 12
# How often the page asks which step its running request is at (seconds).
STEP_LINE_EVERY_S = 0.5
# How often Ray Serve asks whether each replica is alive (seconds): a crashed replica is noticed, and a
# new one started, within this time (Ray's default, 10 s, left its place empty that long).
REPLICA_HEALTH_CHECK_S = 2.0
# The page's and /infer's final image: WebP, the Space's format (written lossless, quicker than PNG:
# flux_infer.images), or PNG. Either keeps the settings inside.
IMAGE_FORMATS = ("webp", "png")
DEFAULT_IMAGE_FORMAT = "webp"
# A preview's WebP quality (lossy: it is sent at every step).
PREVIEW_QUALITY = 80

DOWNLOAD_HINT = (
    "Get the weights: accept the licence at https://huggingface.co/black-forest-labs/FLUX.1-dev, "
    "then `export HF_TOKEN=hf_...` and run "
    "`hf download black-forest-labs/FLUX.1-dev --local-dir weights/FLUX.1-dev`. "
    "To smoke-test without them, use `--model tiny`."
)
