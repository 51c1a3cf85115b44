"""Typed accessors for what ``build_app`` stores on ``app.state`` (vLLM's api routers do the
same), so a resource router reads ``gateway(request)`` rather than an untyped attribute."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import Request

    from loraflow.server.feedback.serving import FeedbackService
    from loraflow.server.gateway import Gateway


def gateway(request: Request) -> Gateway:
    """The gateway: routing table, replicas, metrics and the request path."""
    found: Gateway = request.app.state.gateway
    return found


def feedback_service(request: Request) -> FeedbackService:
    """``POST /v1/feedback``'s service."""
    found: FeedbackService = request.app.state.feedback
    return found
