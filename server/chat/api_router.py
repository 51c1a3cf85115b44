"""POST /v1/chat/completions: pass-through to the engine with per-request adapter routing."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await request.app.state.gateway.handle(request, "/v1/chat/completions")  # type: ignore[no-any-return]


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
