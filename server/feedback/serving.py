"""Feedback: find the rated request, check the key may use its adapter, and queue the rating.

Validation and authentication are those of the completion endpoints. A request is rated by
the key that made it, or by a key with the ``feedback-any`` scope on its adapter; one rating
per request and key counts (a later one replaces it; both stay in the store). An unknown
request id, or one the key may not rate, is the same 404 in OpenAI's error shape. The rating
also feeds the gateway's negative-feedback rate. Writing (and redacting the correction) is
the recorder's thread's job.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request
from pydantic import ValidationError

from loraflow.registry.errors import InvalidArgumentError, NotFoundError, first_error
from loraflow.registry.refs import version_ref
from loraflow.registry.settings import ServerSettings
from loraflow.server.auth import authenticate, may_rate
from loraflow.server.body import json_object, read_capped
from loraflow.server.feedback.protocol import FeedbackRequest, FeedbackResponse
from loraflow.server.rollouts import Rollouts
from loraflow.server.routing import RoutingTable
from loraflow.server.traffic.live import LiveDrift
from loraflow.server.traffic.recorder import Feedback, TrafficRecorder, unknown_request


def parse(raw: bytes) -> FeedbackRequest:
    data = json_object(raw)
    try:
        return FeedbackRequest.model_validate(data)
    except ValidationError as exc:
        field, message = first_error(exc.errors(), default_field="body")
        raise InvalidArgumentError(f"{field}: {message}", param=field) from None


class FeedbackService:
    def __init__(
        self,
        settings: ServerSettings,
        routes: RoutingTable,
        recorder: TrafficRecorder | None,
        live: LiveDrift | None,
        rollouts: Rollouts | None = None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.recorder = recorder
        self.live = live
        self.rollouts = rollouts

    async def handle(self, request: Request) -> FeedbackResponse:
        key = (
            authenticate(request.headers.get("authorization"), self.routes.loaded())
            if self.settings.auth
            else None
        )
        body = parse(await read_capped(request, self.settings.max_body_bytes, self.settings.body_timeout_s))
        if self.recorder is None:
            raise NotFoundError(
                f"no recorded request {body.request_id!r}: traffic recording is off "
                "(traffic.sample_rate and traffic.adapters are all 0)",
                param="request_id",
            )
        served = await self.recorder.locate(body.request_id)
        # To a key that may not rate it, the request does not exist: other tenants' ids cannot be probed.
        if key is not None and not may_rate(key, served.adapter, served.key):
            raise unknown_request(body.request_id)
        self.recorder.add_feedback(
            Feedback(
                request_id=body.request_id,
                at=datetime.now(UTC),
                rating=body.rating,
                correction=body.correction,
                comment=body.comment,
                key=key.name if key else None,
            ),
            served,
        )
        if self.live is not None:
            self.live.observe_feedback(
                served.adapter,
                served.version,
                body.rating,
                request_id=body.request_id,
                key=key.name if key else None,
            )
        if self.rollouts is not None:
            self.rollouts.observe_feedback(
                served.adapter, served.version, body.rating, request_id=body.request_id
            )
        return FeedbackResponse(
            request_id=body.request_id, model=version_ref(served.adapter, served.version), rating=body.rating
        )
