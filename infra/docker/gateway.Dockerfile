# The tuneship gateway image: `tuneship serve` in front of a vLLM server reached at TUNESHIP_VLLM_URL.
#   docker build -f infra/docker/gateway.Dockerfile -t ghcr.io/tuneship/gateway:latest .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TUNESHIP_GATEWAY_HOST=0.0.0.0 TUNESHIP_GATEWAY_PORT=8080

WORKDIR /app
COPY requirements/pipeline.lock requirements/pipeline.lock
COPY pyproject.toml README.md ./
COPY flows flows
COPY tasks tasks
COPY infra infra
COPY serving serving
RUN pip install --no-compile -c requirements/pipeline.lock . \
    && useradd --create-home --uid 10001 tuneship

USER 10001
EXPOSE 8080
HEALTHCHECK CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health')"]
ENTRYPOINT ["tuneship", "serve", "--no-deploy"]
