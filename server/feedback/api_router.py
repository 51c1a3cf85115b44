"""POST /v1/feedback."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request

from loraflow.server.feedback.protocol import FeedbackResponse
from loraflow.server.openapi import ERROR_RESPONSES, request_body
from loraflow.server.state import feedback_service

router = APIRouter()


@router.post(
    "/v1/feedback",
    summary="Rate a response, optionally with the answer it should have given",
    openapi_extra=request_body(
        "FeedbackRequest",
        "Names the response by its x-request-id header. A correction becomes training data for the "
        "adapter's next version (loraflow flywheel).",
    ),
    responses={
        200: {"model": FeedbackResponse, "description": "The feedback was queued."},
        **ERROR_RESPONSES,
    },
)
async def feedback(request: Request) -> FeedbackResponse:
    return await feedback_service(request).handle(request)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
