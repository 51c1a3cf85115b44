"""What the console's reviewers look at: sampled requests with their reviews and feedback, and
blind pairs of answers. Everything here reads the registry's stores (redacted as stored); the
routes in ``app.py`` only choose and render.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from loraflow.registry import domain
from loraflow.registry.drift import is_refusal_or_empty, json_valid
from loraflow.registry.reviews import current_reviews
from loraflow.registry.service import Registry
from loraflow.registry.traffic import answer_text, current_feedback, request_turns

# The slices a reviewer can narrow the queue to, each read off the stored answer the way the
# drift figures read it: the live signals worth a human's eye.
SLICES: dict[str, str] = {
    "invalid_json": "the answer is not valid JSON",
    "refusal": "the answer is a refusal or empty",
    "truncated": "the answer was cut off at max_tokens",
    "rated_down": "the customer rated it down",
    "shadowed": "a rollout candidate answered it too (shadow)",
}
RATINGS: dict[str, str] = {
    "unreviewed": "not reviewed yet",
    "positive": "reviewed +1",
    "negative": "reviewed -1",
    "corrected": "reviewed with a correction",
}


@dataclass
class Item:
    record: dict[str, Any]
    review: domain.ReviewInfo | None
    feedback: list[dict[str, Any]] = field(default_factory=list)  # the customers' current ratings

    @property
    def request_id(self) -> str:
        return str(self.record["request_id"])

    @property
    def answer(self) -> str:
        return answer_text(self.record)

    @property
    def turns(self) -> list[dict[str, Any]]:
        return request_turns(self.record.get("request") or {}) or []

    @property
    def slices(self) -> list[str]:
        first = (self.record.get("response") or [{}])[0]
        found = []
        if not json_valid(self.answer):
            found.append("invalid_json")
        if is_refusal_or_empty(self.answer):
            found.append("refusal")
        if first.get("finish_reason") == "length":
            found.append("truncated")
        if any((f.get("rating") or 0) < 0 for f in self.feedback):
            found.append("rated_down")
        if self.record.get("shadow"):
            found.append("shadowed")
        return found


@dataclass(frozen=True)
class Filters:
    version: int | None = None
    day: date | None = None
    slice: str | None = None
    rating: str | None = None
    category: str | None = None

    def query(self) -> dict[str, str]:
        """The filters as query parameters (for links that keep them)."""
        out = {
            "version": str(self.version) if self.version is not None else "",
            "day": self.day.isoformat() if self.day else "",
            "slice": self.slice or "",
            "rating": self.rating or "",
            "category": self.category or "",
        }
        return {k: v for k, v in out.items() if v}

    def keep(self, item: Item) -> bool:
        review = item.review
        if self.version is not None and item.record.get("version") != self.version:
            return False
        if self.day is not None and str(item.record["at"])[:10] != self.day.isoformat():
            return False
        if self.slice and self.slice not in item.slices:
            return False
        if self.rating == "unreviewed" and review is not None:
            return False
        if self.rating == "positive" and (review is None or (review.rating or 0) <= 0):
            return False
        if self.rating == "negative" and (review is None or (review.rating or 0) >= 0):
            return False
        if self.rating == "corrected" and (review is None or review.correction is None):
            return False
        return not (self.category and (review is None or self.category not in review.categories))


def items(registry: Registry, adapter: str, *, days: int) -> list[Item]:
    """The adapter's served, sampled requests of the last ``days`` days, newest first, each with
    the review that counts and the customers' current feedback."""
    since = datetime.now(UTC) - timedelta(days=days)
    records = [
        r
        for r in registry.traffic.read("requests", adapter=adapter, since=since)
        if r.get("status") == 200 and not r.get("error")
    ]
    reviews = current_reviews(registry.reviews(adapter))
    feedback: dict[str, list[dict[str, Any]]] = {}
    for given in current_feedback(registry.traffic.read("feedback", adapter=adapter, since=since)):
        feedback.setdefault(str(given["request_id"]), []).append(given)
    records.sort(key=lambda r: (str(r["at"]), str(r["request_id"])), reverse=True)
    return [
        Item(
            record=r,
            review=reviews.get(str(r["request_id"])),
            feedback=feedback.get(str(r["request_id"]), []),
        )
        for r in records
    ]


# -- blind pairs ---------------------------------------------------------------------------------
Source = Literal["evaluation", "rollout"]


@dataclass(frozen=True)
class Pair:
    item: str
    prompt: str
    candidate: str
    baseline: str


@dataclass(frozen=True)
class Round:
    """A blind pairwise round: the candidate's answers against a baseline's, on the same inputs."""

    adapter: str
    source: Source
    source_id: int
    candidate: int
    baseline: str  # "production", "base" or "NAME@vN"
    pairs: list[Pair]


def evaluation_round(evaluation: domain.EvaluationInfo) -> Round:
    """An eval report's examples on which the candidate's answer differs from production's (from
    the prompted base's when there was no production): equal answers teach a reviewer nothing."""
    report = evaluation.report
    baseline = "production" if "production" in report.get("systems", {}) else "base"
    pairs = []
    for example in report.get("examples", []):
        outputs = example.get("outputs", {})
        if "candidate" not in outputs or baseline not in outputs:
            continue
        cand, base = str(outputs["candidate"].get("text", "")), str(outputs[baseline].get("text", ""))
        if cand.strip() != base.strip():
            pairs.append(
                Pair(
                    item=str(example["index"]),
                    prompt=str(example.get("prompt", "")),
                    candidate=cand,
                    baseline=base,
                )
            )
    return Round(evaluation.adapter, "evaluation", evaluation.id, evaluation.version, baseline, pairs)


def rollout_round(registry: Registry, rollout: domain.RolloutInfo) -> Round:
    """A rollout's shadowed requests: production's answer (the one the client got) against the
    candidate's shadow answer, where the candidate answered and the two differ."""
    until = rollout.ended_at or datetime.now(UTC)
    pairs = []
    for record in registry.traffic.read(
        "requests", adapter=rollout.adapter, since=rollout.started_at, until=until + timedelta(seconds=1)
    ):
        shadow = record.get("shadow") or {}
        if shadow.get("version") != rollout.candidate or shadow.get("status") != 200:
            continue
        cand = str(((shadow.get("response") or [{}])[0]).get("content") or "")
        base = answer_text(record)
        if cand.strip() == base.strip():
            continue
        turns = request_turns(record.get("request") or {}) or []
        prompt = next((str(t.get("content")) for t in reversed(turns) if t.get("role") == "user"), "")
        pairs.append(Pair(item=str(record["request_id"]), prompt=prompt, candidate=cand, baseline=base))
    pairs.sort(key=lambda p: p.item)
    return Round(
        rollout.adapter, "rollout", rollout.id, rollout.candidate, f"production v{rollout.baseline}", pairs
    )
