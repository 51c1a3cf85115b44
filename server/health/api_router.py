"""/health (liveness), /ready (engine and registry reachable), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    gateway = request.app.state.gateway
    body = {
        "ready": gateway.router.ready,
        "registry_revision": gateway.router.snapshot.revision,
        "replicas": [
            {"url": r.url, "healthy": r.healthy, "resident": list(r.resident)}
            for r in gateway.replicas.replicas
        ],
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gateway = request.app.state.gateway
    gauge = gateway.metrics.resident
    gauge.clear()
    for replica in gateway.replicas.replicas:
        for name in replica.resident:
            adapter, _, version = name.partition("+")[0].partition("@")
            gauge.labels(replica.url, adapter, version).set(1)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
