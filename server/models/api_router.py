"""GET /v1/models: what the key may call: the base model, its adapters with their aliases and versions."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from loraflow.registry import domain
from loraflow.server.auth import authenticate
from loraflow.server.models.protocol import ModelCard, ModelList, VersionCard
from loraflow.server.openapi import ERROR_RESPONSES
from loraflow.server.routing import RoutingTable
from loraflow.server.state import gateway

router = APIRouter()


def model_list(r: RoutingTable, key: domain.ApiKeyInfo | None = None) -> ModelList:
    """What ``key`` may call (everything when auth is off): the base with the ``base`` scope,
    each of its adapters with its aliases, and their versions with the ``versions`` scope."""
    data = []
    if key is None or key.has("base"):
        data.append(ModelCard(id=r.base_model_id, created=r.started_at))
    pinned = key is None or key.has("versions")
    for a in r.snapshot.adapters.values():
        if key is not None and not key.allows(a.name):
            continue
        versions = [
            VersionCard(
                id=v.ref,
                version=v.version,
                status=v.status,
                digest=v.digest,
                template_matches=r.template_matches(v),
            )
            for v in a.versions
            if pinned
        ]
        data.append(
            ModelCard(
                id=a.name,
                parent=r.base_model_id,
                created=int(a.created_at.timestamp()),
                aliases=a.aliases,
                versions=versions,
            )
        )
    return ModelList(data=data)


@router.get(
    "/v1/models",
    response_model=ModelList,
    response_model_exclude_none=False,
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 500, 503)},
)
async def list_models(request: Request) -> ModelList:
    gw = gateway(request)
    snapshot = gw.routes.loaded()  # before the first snapshot: 503, as completions answer, not 401
    key = None
    if gw.settings.auth:
        key = authenticate(request.headers.get("authorization"), snapshot)
    return model_list(gw.routes, key)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
