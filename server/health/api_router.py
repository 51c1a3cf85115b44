"""/health (liveness), /ready (engine and registry reachable), /metrics (Prometheus, for operators)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraflow.registry.errors import UnauthenticatedError
from loraflow.server.auth import bearer_token
from loraflow.server.state import gateway

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Status only: which engines exist and what they hold is for operators (``/metrics``)."""
    is_ready = gateway(request).routes.ready
    return JSONResponse(
        {"status": "ready" if is_ready else "not ready"}, status_code=200 if is_ready else 503
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus; the replica detail (URLs, health, residency, loads) is collected at scrape time.

    With ``server.metrics_token`` set, only a scraper that presents it may read them.
    """
    token = gateway(request).settings.metrics_token
    if token is not None:
        given = bearer_token(request.headers.get("authorization"), "metrics token")
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise UnauthenticatedError("/metrics needs the metrics token (server.metrics_token)")
    return Response(gateway(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
