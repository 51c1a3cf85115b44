"""POST /v1/completions: pass-through to the engine with per-request adapter routing."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from loraflow.server.completions.protocol import FIELDS, Completion
from loraflow.server.openapi import ERROR_RESPONSES, request_body, stream_response
from loraflow.server.state import gateway

router = APIRouter()


@router.post(
    "/v1/completions",
    summary="Create a text completion with the base model or an adapter version",
    openapi_extra=request_body(
        "CompletionRequest",
        "OpenAI's completion request. `model` may be the base, NAME, NAME:ALIAS or NAME@vN. "
        "Fields OpenAI's API does not define are a 400, except the vLLM extras "
        "`server.engine_extra_fields` allows; the engine validates the values.",
    ),
    responses={
        200: stream_response(
            Completion,
            Completion,
            "The completion, or server-sent chunks (each shaped like a completion) when `stream` is true.",
        ),
        **ERROR_RESPONSES,
    },
)
async def completions(request: Request) -> Response:
    return await gateway(request).handle(request, "/v1/completions", FIELDS)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
