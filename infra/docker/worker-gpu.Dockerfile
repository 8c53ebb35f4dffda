# The tuneship GPU worker image: the image the work-pool templates run placed stages in (deployments/work-pools/,
# variable `image`). It holds this repository with the two pinned venvs of `make setup`, built for CUDA GPUs:
#   .venv       the pipeline (requirements/pipeline.lock, with the CUDA build of the same torch release)
#   .venv-vllm  vLLM for GPUs (the `vllm` wheel at the release tuneship's manifests serve with, its own CUDA torch)
#   docker build -f infra/docker/worker-gpu.Dockerfile -t ghcr.io/tuneship/worker-gpu:latest .
# The CUDA runtime comes with the torch wheels; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNESHIP_REPO=/app TUNESHIP_VLLM_PYTHON=/app/.venv-vllm/bin/python TUNESHIP_VLLM_DEVICE=gpu \
    HF_HOME=/cache/huggingface XDG_CACHE_HOME=/cache

WORKDIR /app
COPY requirements requirements
COPY pyproject.toml README.md ./
COPY flows flows
COPY tasks tasks
COPY infra infra
COPY serving serving
COPY offline offline
COPY deployments deployments
# SageMaker runs the image with `train`: that script runs the stage from the "request" channel.
# The lock pins torch's CPU build (2.13.0+cpu); the same release's PyPI wheel is the CUDA build.
RUN sed 's/^torch==2\.13\.0+cpu$/torch==2.13.0/' requirements/pipeline.lock > /tmp/gpu.lock \
    && python -m venv .venv \
    && .venv/bin/pip install --no-compile "pip==26.3" "setuptools==84.2.1" \
    && .venv/bin/pip install --no-compile --no-build-isolation -c /tmp/gpu.lock ".[wandb]" \
    && python -m venv .venv-vllm \
    && .venv-vllm/bin/pip install --no-compile "pip==26.3" "vllm==0.33.0" \
    && printf '#!/bin/sh\nexec /app/.venv/bin/tuneship stage /opt/ml/input/data/request/params.json\n' > /usr/local/bin/train \
    && chmod 755 /usr/local/bin/train \
    && useradd --create-home --uid 10001 tuneship \
    && mkdir -p /cache && chown 10001 /cache

USER 10001
ENV PATH=/app/.venv/bin:$PATH
# A Prefect worker's job runs `prefect flow-run execute`; the image's own entrypoint stays out of its way.
CMD ["prefect", "version"]
