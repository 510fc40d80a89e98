# parakeet-worker: Runpod serverless image.
#   docker build -t parakeet-worker .
#   docker build --build-arg PARAKEET_MODEL=nvidia/parakeet-tdt-0.6b-v2 -t parakeet-worker:v2 .
#   docker run --gpus all parakeet-worker   # off Runpod (no job queue): runs test_input.json once
# torch==2.13.0 on PyPI is built for CUDA 13.0 and brings its own CUDA, cuDNN and NCCL wheels,
# so the base only needs the CUDA 13.0 driver interface: the small "base" flavour.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04
FROM ${CUDA_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/huggingface

# Python 3.11 and ffmpeg from the distribution.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

WORKDIR /app

# Pinned dependencies in one layer, before any code, so code changes rebuild in seconds.
# torch==2.13.0 from requirements.txt is the CUDA 13.0 build on linux/x86_64.
COPY requirements.txt constraints.txt ./
RUN pip install -c constraints.txt -r requirements.txt

# Bake the model into HF_HOME so a cold start never downloads it. A network volume or
# Runpod's model cache is used instead when this copy is absent (see README).
ARG PARAKEET_MODEL=nvidia/parakeet-tdt-0.6b-v3
ENV PARAKEET_MODEL=${PARAKEET_MODEL}
COPY docker/fetch_model.py /tmp/fetch_model.py
RUN python /tmp/fetch_model.py && rm /tmp/fetch_model.py

COPY handler.py test_input.json ./
COPY samples ./samples

ENV RUNPOD_SERVERLESS=1
CMD ["python", "-u", "handler.py"]
