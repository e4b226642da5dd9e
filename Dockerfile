# flux-infer on a CUDA GPU: docker build -t flux-infer . && docker run --gpus all -p 7860:7860 \
#   -v "$PWD/weights:/app/weights" -v flux-hf-cache:/app/hf-cache -e HF_TOKEN flux-infer
# torch 2.13.0 from PyPI brings its own CUDA 13.0 libraries (cuda-toolkit, cuDNN, NCCL wheels): the
# image only needs CUDA 13's base, whose NVIDIA_REQUIRE_CUDA makes the container toolkit refuse, with
# a message, a host driver too old for it (CUDA 13 needs 580 or newer).
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3-dev: Triton (--compile) builds its CUDA launcher, a C file that includes
# Python.h, with the system's C compiler when it first runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev curl \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin flux

WORKDIR /app

# Dependencies first (torch from PyPI is the CUDA build on Linux), so code changes rebuild fast.
COPY pyproject.toml README.md ./
RUN pip install "torch==2.13.0" \
    && mkdir flux_infer && touch flux_infer/__init__.py \
    && pip install ".[gpu]" \
    && pip uninstall -y flux-infer && rm -rf flux_infer build

COPY app.py ./
COPY flux_infer ./flux_infer
RUN pip install --no-deps . \
    && mkdir -p /app/weights /app/hf-cache /app/outputs \
    && chown -R flux:flux /app/weights /app/hf-cache /app/outputs

# The model folder and the hub cache live outside the image; HF_TOKEN comes from `docker run -e`.
# --compile's kernels (inductor's and Triton's) are kept in the cache volume too, so a new container
# reuses them instead of compiling again.
# MALLOC_ARENA_MAX: two glibc malloc arenas instead of up to eight per core, so a long-running
# server's memory stays flat instead of creeping up in bursts as its threads take turns.
ENV GRADIO_SERVER_NAME=0.0.0.0 \
    MALLOC_ARENA_MAX=2 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/app/hf-cache \
    TORCHINDUCTOR_CACHE_DIR=/app/hf-cache/torchinductor \
    FLUX_MODEL=/app/weights/FLUX.1-dev
VOLUME ["/app/weights", "/app/hf-cache"]

USER flux
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${GRADIO_SERVER_PORT}/healthz" || exit 1
CMD ["flux-infer", "serve"]
