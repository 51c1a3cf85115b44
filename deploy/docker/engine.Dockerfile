# syntax=docker/dockerfile:1
# The engine (`loraflow engine`): vLLM's official GPU image plus loraflow, whose
# `vllm.general_plugins` entry point registers the resolver that fetches adapter versions
# from object storage. vLLM and its CUDA torch come from the base image, untouched.
# Build from the repository root:  docker build -f deploy/docker/engine.Dockerfile -t loraflow-engine .
ARG VLLM_VERSION=v0.32.0

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cli cli
COPY registry registry
COPY server server
COPY trainer trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM vllm/vllm-openai:${VLLM_VERSION}
# The one place this image's Python dependency set is named (tests/helm/test_images.py reads it).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels "loraflow[s3]==0.1.0"
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/loraflow loraflow
USER 10001
WORKDIR /var/lib/loraflow
ENV HOME=/var/lib/loraflow LORAFLOW_HOME=/var/lib/loraflow HF_HOME=/cache/models
EXPOSE 8001
ENTRYPOINT ["loraflow"]
CMD ["engine", "--host", "0.0.0.0", "--port", "8001"]
