"""POST /v1/chat/completions: pass-through to the engine with per-request adapter routing."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from loraflow.server.chat.protocol import FIELDS, ChatCompletion, ChatCompletionChunk
from loraflow.server.openapi import ERROR_RESPONSES, request_body, stream_response
from loraflow.server.state import gateway

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    summary="Create a chat completion with the base model or an adapter version",
    openapi_extra=request_body(
        "ChatCompletionRequest",
        "OpenAI's chat completion request. `model` may be the base, NAME (its production alias), "
        "NAME:ALIAS or NAME@vN. Fields OpenAI's API does not define are a 400, except the vLLM extras "
        "`server.engine_extra_fields` allows; the engine validates the values.",
    ),
    responses={
        200: stream_response(
            ChatCompletion,
            ChatCompletionChunk,
            "The completion, or server-sent chunks when `stream` is true. `model` (and the "
            "`x-loraflow-model` header) name the version that answered.",
        ),
        **ERROR_RESPONSES,
    },
)
async def chat_completions(request: Request) -> Response:
    return await gateway(request).handle(request, "/v1/chat/completions", FIELDS)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
