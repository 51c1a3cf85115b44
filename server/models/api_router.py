"""GET /v1/models: the base model, and every adapter with its aliases and versions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request

from loraflow.server.auth import authenticate
from loraflow.server.routing import Router

router = APIRouter()


def model_list(r: Router) -> dict[str, Any]:
    snap = r.snapshot
    data: list[dict[str, Any]] = [
        {"id": r.base_model_id, "object": "model", "owned_by": "loraflow", "parent": None}
    ]
    for a in snap.adapters.values():
        data.append(
            {
                "id": a.name,
                "object": "model",
                "owned_by": "loraflow",
                "parent": r.base_model_id,
                "created": int(a.created_at.timestamp()),
                "aliases": a.aliases,
                "versions": [
                    {"id": v.ref, "version": v.version, "status": v.status, "digest": v.digest}
                    for v in a.versions
                ],
            }
        )
    return {"object": "list", "data": data}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gateway = request.app.state.gateway
    if gateway.settings.auth:
        authenticate(request.headers.get("authorization"), gateway.router.snapshot)
    return model_list(gateway.router)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
