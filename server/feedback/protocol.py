"""Wire types of /v1/feedback."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(
        min_length=1, max_length=128, description="The x-request-id header of the response being rated."
    )
    rating: Literal[1, -1] = Field(description="+1 (good) or -1 (bad).")
    correction: str | None = Field(
        None,
        max_length=100_000,
        description="What the answer should have been; the flywheel trains on it. Redacted like the request.",
    )
    comment: str | None = Field(None, max_length=10_000, description="Free text; redacted too.")


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    request_id: str
    model: str = Field(description="NAME@vN: the version that answered the rated request.")
    rating: Literal[1, -1]
