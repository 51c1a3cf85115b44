"""POST /v1/chat/completions: pass-through to the engine with per-request adapter routing."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from loraflow.server.chat.protocol import ChatCompletion, ChatCompletionChunk
from loraflow.server.openapi import ERROR_RESPONSES, request_body, stream_response
from loraflow.server.state import gateway

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    summary="Create a chat completion with the base model or an adapter version",
    openapi_extra=request_body(
        "ChatCompletionRequest",
        "OpenAI's chat completion request. `model` may be the base, NAME (its production alias), "
        "NAME:ALIAS or NAME@vN. Other fields, vLLM's extras included, go to the engine unchanged.",
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
    return await gateway(request).handle(request, "/v1/chat/completions")


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
