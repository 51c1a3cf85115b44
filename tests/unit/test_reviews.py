"""The pure rules over reviews (registry/reviews.py): which review of a request counts, the failure
categories and counts per version, and a blind pairwise round's preference rate with its Wilson
interval, checked against the interval worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from loraflow.registry.domain import PairwiseChoice, PairwiseVoteInfo, ReviewInfo
from loraflow.registry.reviews import (
    Preference,
    category_summary,
    current_reviews,
    preference,
    reviewed_counts,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
Z = 1.959963984540054  # the two-sided 95% normal quantile


def review(
    review_id: int,
    request_id: str,
    *,
    version: int = 1,
    rating: int | None = None,
    correction: str | None = None,
    categories: tuple[str, ...] = (),
) -> ReviewInfo:
    return ReviewInfo(
        id=review_id,
        adapter="support",
        version=version,
        request_id=request_id,
        reviewer="dana",
        rating=rating,
        correction=correction,
        categories=list(categories),
        revision=review_id,
        created_at=NOW,
    )


def votes(candidate: int, baseline: int, ties: int) -> list[PairwiseVoteInfo]:
    choices: list[PairwiseChoice] = ["candidate"] * candidate + ["baseline"] * baseline + ["tie"] * ties
    return [
        PairwiseVoteInfo(
            id=i,
            adapter="support",
            source="evaluation",
            source_id=1,
            item=str(i),
            candidate=2,
            baseline="production",
            choice=choice,
            reviewer=f"reviewer-{i}",
            created_at=NOW,
        )
        for i, choice in enumerate(choices, 1)
    ]


def test_the_latest_review_of_a_request_counts_whatever_the_order_given() -> None:
    first = review(1, "req-a", rating=1)
    second = review(3, "req-a", rating=-1, categories=("format",))
    other = review(2, "req-b", rating=1)
    assert current_reviews([second, other, first]) == {"req-a": second, "req-b": other}
    assert current_reviews([]) == {}


def test_categories_and_counts_per_version_from_current_reviews_only() -> None:
    reviews = [
        review(1, "req-a", categories=("refusal",), rating=-1),  # replaced by review 4
        review(2, "req-b", categories=("format", "hallucination"), rating=-1),
        review(3, "req-c", categories=("format",), correction="fixed"),
        review(4, "req-a", rating=1),
        review(5, "req-d", version=2, rating=1),
        review(6, "req-e", version=2, categories=("incomplete",), rating=-1, correction="done"),
    ]
    summary = category_summary(reviews)
    assert summary == {1: {"format": 2, "hallucination": 1}, 2: {"incomplete": 1}}
    assert list(summary[1]) == ["format", "hallucination"]  # most frequent first
    assert category_summary(reviews[3:5]) == {1: {}, 2: {}}  # reviewed, nothing tagged
    assert reviewed_counts(reviews) == {
        1: {"reviewed": 3, "positive": 1, "negative": 1, "corrected": 1},
        2: {"reviewed": 2, "positive": 1, "negative": 1, "corrected": 1},
    }
    assert category_summary([]) == {} and reviewed_counts([]) == {}


def test_preference_counts_ties_half_with_the_wilson_interval_worked_by_hand() -> None:
    pref = preference(votes(7, 2, 1))
    assert (pref.candidate, pref.baseline, pref.ties, pref.n) == (7, 2, 1, 10)
    assert pref.rate == pytest.approx(0.75)  # (7 + 1/2) / 10
    # Wilson by hand, x = 7.5 of n = 10: (x + z²/2 ± z·sqrt(x(n-x)/n + z²/4)) / (n + z²)
    #   = (7.5 + 1.92073 ± 1.95996 · sqrt(1.875 + 0.96036)) / 13.84146 = (9.42073 ± 3.30029) / 13.84146
    assert pref.interval == pytest.approx((0.44218, 0.91905), abs=1e-5)
    assert pref.to_json() == {
        "candidate": 7,
        "baseline": 2,
        "ties": 1,
        "n": 10,
        "rate": 0.75,
        "ci": pytest.approx([0.44218, 0.91905], abs=1e-5),
    }

    # All ties: exactly even, and the interval symmetric about one half.
    even = preference(votes(0, 0, 3))
    assert even.rate == 0.5 and even.interval is not None
    assert even.interval[0] == pytest.approx(1 - even.interval[1])
    assert preference(votes(2, 2, 0)).rate == preference(votes(1, 1, 2)).rate == 0.5

    # Every vote for the candidate: the closed form n / (n + z²) below, and never past 1 above.
    clean = preference(votes(10, 0, 0))
    assert clean.rate == 1.0 and clean.interval is not None
    assert clean.interval[0] == pytest.approx(10 / (10 + Z**2)) and clean.interval[1] <= 1.0
    assert clean.interval[1] == pytest.approx(1.0)
    lost = preference(votes(0, 4, 0))
    assert lost.rate == 0.0 and lost.interval is not None and lost.interval[0] >= 0.0
    assert lost.interval[1] == pytest.approx(Z**2 / (4 + Z**2))


def test_no_votes_have_no_rate_and_no_interval() -> None:
    empty = preference([])
    assert empty == Preference(candidate=0, baseline=0, ties=0)
    assert (empty.n, empty.rate, empty.interval) == (0, None, None)
    assert empty.to_json() == {"candidate": 0, "baseline": 0, "ties": 0, "n": 0, "rate": None, "ci": None}
