# syntax=docker/dockerfile:1
# The trainer and the flywheel (`loraflow train`, `loraflow flywheel run`): CUDA torch, peft,
# trl and bitsandbytes. It starts on vLLM's image because evaluation serves the candidate
# through a vLLM engine, and one torch build for both avoids a second multi-gigabyte download.
# Build from the repository root:  docker build -f deploy/docker/trainer.Dockerfile -t loraflow-trainer .
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
    pip install --no-cache-dir --find-links /wheels "loraflow[train,eval,traffic,postgres,s3]==0.1.0"
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/loraflow loraflow
USER 10001
WORKDIR /var/lib/loraflow
ENV HOME=/var/lib/loraflow LORAFLOW_HOME=/var/lib/loraflow HF_HOME=/scratch/models
ENTRYPOINT ["loraflow"]
CMD ["--help"]
