# syntax=docker/dockerfile:1
# The gateway (`loraflow serve`), its migrations and `loraflow keys`: slim, with no torch.
# Presidio redacts sampled traffic with a blank spaCy pipeline, so no model is downloaded.
# Build from the repository root:  docker build -f deploy/docker/gateway.Dockerfile -t loraflow-gateway .
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cli cli
COPY registry registry
COPY server server
COPY trainer trainer
# The one place this image's Python dependency set is named (tests/helm/test_images.py reads it).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[traffic,postgres,s3]"

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "loraflow[traffic,postgres,s3]==0.1.0"
# The chart runs it as this user, on a read-only root filesystem, with HOME on a volume.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/loraflow loraflow
USER 10001
ENV HOME=/var/lib/loraflow LORAFLOW_HOME=/var/lib/loraflow
EXPOSE 8000
ENTRYPOINT ["loraflow"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
