"""Reviews and blind pairwise votes through the Registry facade (SQLite, and PostgreSQL when given):
what is kept, what is refused with nothing written, and what the audit log says."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry.errors import ConflictError, InvalidArgumentError, NotFoundError
from loraflow.registry.redact import Redactor
from loraflow.registry.reviews import category_summary, current_reviews, preference, reviewed_counts
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.registry.traffic import new_request_id
from tests.factories import make_adapter, served_record, write_traffic

pytestmark = pytest.mark.store

AT = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
EMAIL = "jane.doe@example.com"


@pytest.fixture
def reg(db_url: str, tmp_path: Path, base_dir: Path) -> Iterator[Registry]:
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    for seed in (1, 2):
        r.register("support", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    r.register("billing", make_adapter(tmp_path / "b1", seed=3), base_model=str(base_dir))
    yield r
    r.close()


def served(reg: Registry, redactor: Redactor, adapter: str, version: int, n: int = 1) -> list[str]:
    """``n`` sampled requests of ``adapter``'s ``version`` in its traffic store; their ids."""
    records = [
        served_record(
            AT + timedelta(seconds=i),
            adapter=adapter,
            version=version,
            prompt=f"Where is order {i}?",
            answer=f"Order {i} ships today.",
        )
        for i in range(n)
    ]
    return [r["request_id"] for r in write_traffic(reg.traffic, "requests", records, redactor)]


def test_a_review_takes_its_version_from_the_record_and_is_redacted_and_audited(
    reg: Registry, redactor: Redactor
) -> None:
    (request_id,) = served(reg, redactor, "support", 2)
    before = reg.revision()
    review = reg.add_review(
        request_id,
        reviewer="dana",
        redactor=redactor,
        rating=-1,
        correction=f"  Order 0 ships tomorrow; write to {EMAIL} for changes.  ",
        categories=["other", "wrong_field", "other"],
    )
    assert (review.adapter, review.version, review.ref) == ("support", 2, "support@v2")
    assert review.request_id == request_id and review.reviewer == "dana" and review.rating == -1
    assert review.correction is not None and EMAIL not in review.correction
    assert review.correction.startswith("Order 0 ships tomorrow; write to <EMAIL_ADDRESS_")
    assert review.categories == ["wrong_field", "other"]  # once each, in the taxonomy's order
    assert review.revision == before + 1 == reg.revision()
    assert reg.reviews("support") == [review] == reg.reviews("support", 2)
    assert reg.reviews("support", 1) == [] and reg.reviews("billing") == []

    event = reg.history("support").events[-1]
    assert (event.action, event.actor, event.subject, event.version) == ("review.add", "dana", "support", 2)
    assert event.after == {
        "review": review.id,
        "request_id": request_id,
        "rating": -1,
        "corrected": True,
        "categories": ["wrong_field", "other"],
    }
    assert "jane" not in str(event.after) and "<EMAIL" not in str(event.after)  # the row holds the text

    # The adapter a caller names must be the record's own (a reviewer sees only its adapters).
    assert (
        reg.add_review(request_id, reviewer="dana", redactor=redactor, rating=1, adapter="support").rating
        == 1
    )
    with pytest.raises(NotFoundError) as other:
        reg.add_review(request_id, reviewer="dana", redactor=redactor, rating=1, adapter="billing")
    assert other.value.param == "request_id"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"rating": 0}, "rating"),
        ({"rating": 2}, "rating"),
        ({"rating": 1, "categories": ["wrong_field", "rude"]}, "categories"),
        ({}, "rating"),  # rates, corrects and tags nothing
        ({"correction": "   ", "categories": []}, "rating"),  # a blank correction is none
        ({"correction": "x" * 20_001}, "correction"),
    ],
)
def test_a_refused_review_writes_nothing(
    reg: Registry, redactor: Redactor, kwargs: dict[str, Any], param: str
) -> None:
    (request_id,) = served(reg, redactor, "support", 1)
    before, events = reg.revision(), len(reg.history("support").events)
    with pytest.raises(InvalidArgumentError) as refused:
        reg.add_review(request_id, reviewer="dana", redactor=redactor, **kwargs)
    assert refused.value.param == param
    assert reg.revision() == before and reg.reviews("support") == []
    assert len(reg.history("support").events) == events


def test_a_review_of_a_request_never_sampled_writes_nothing(reg: Registry, redactor: Redactor) -> None:
    served(reg, redactor, "support", 1)
    before = reg.revision()
    for request_id in (new_request_id(AT), "req-nodate", "not a request id"):
        with pytest.raises(NotFoundError) as missing:
            reg.add_review(request_id, reviewer="dana", redactor=redactor, rating=1)
        assert missing.value.param == "request_id"
    assert reg.revision() == before and reg.reviews("support") == []


def test_the_latest_review_of_a_request_counts_and_every_review_stays(
    reg: Registry, redactor: Redactor
) -> None:
    a, b = served(reg, redactor, "support", 1, n=2)
    first = reg.add_review(a, reviewer="dana", redactor=redactor, rating=1)
    tagged = reg.add_review(b, reviewer="dana", redactor=redactor, rating=-1, categories=["format"])
    again = reg.with_actor("erin").add_review(
        a, reviewer="erin", redactor=redactor, rating=-1, categories=["refusal", "format"]
    )
    assert [r.id for r in reg.reviews("support")] == [first.id, tagged.id, again.id]  # oldest first
    assert current_reviews(reg.reviews("support")) == {a: again, b: tagged}
    assert category_summary(reg.reviews("support")) == {1: {"format": 2, "refusal": 1}}
    assert reviewed_counts(reg.reviews("support", 1)) == {
        1: {"reviewed": 2, "positive": 0, "negative": 2, "corrected": 0}
    }
    assert [e.actor for e in reg.history("support").events if e.action == "review.add"] == [
        "dana",
        "dana",
        "erin",
    ]


def vote(reg: Registry, item: str, choice: Any, reviewer: str, *, source_id: int = 7) -> Any:
    return reg.add_pairwise_vote(
        "support",
        source="evaluation",
        source_id=source_id,
        item=item,
        candidate=2,
        baseline="production",
        choice=choice,
        reviewer=reviewer,
    )


def test_pairwise_votes_one_per_reviewer_and_item_with_their_preference(reg: Registry) -> None:
    first = vote(reg, "0", "candidate", "dana")
    assert (first.adapter, first.source, first.source_id, first.item) == ("support", "evaluation", 7, "0")
    assert (first.candidate, first.baseline, first.choice, first.reviewer) == (
        2,
        "production",
        "candidate",
        "dana",
    )
    event = reg.history("support").events[-1]
    assert (event.action, event.actor, event.version) == ("review.pairwise", "dana", 2)
    assert event.after == {
        "vote": first.id,
        "source": "evaluation",
        "source_id": 7,
        "item": "0",
        "choice": "candidate",
    }

    before = reg.revision()
    with pytest.raises(ConflictError) as twice:
        vote(reg, "0", "baseline", "dana")  # a second pick of the same item by the same reviewer
    assert twice.value.param == "item"
    with pytest.raises(InvalidArgumentError) as bad:
        vote(reg, "1", "both", "dana")
    assert bad.value.param == "choice"
    assert reg.revision() == before and reg.pairwise_votes("evaluation", 7) == [first]

    vote(reg, "0", "tie", "erin")  # another reviewer may judge the same item
    vote(reg, "1", "candidate", "dana")
    vote(reg, "2", "baseline", "dana")
    vote(reg, "0", "baseline", "dana", source_id=8)  # another report's item 0
    votes = reg.pairwise_votes("evaluation", 7)
    assert [(v.item, v.reviewer, v.choice) for v in votes] == [
        ("0", "dana", "candidate"),
        ("0", "erin", "tie"),
        ("1", "dana", "candidate"),
        ("2", "dana", "baseline"),
    ]
    pref = preference(votes)
    assert (pref.candidate, pref.baseline, pref.ties, pref.n) == (2, 1, 1, 4)
    assert pref.rate == pytest.approx(2.5 / 4) and pref.interval is not None
    assert pref.interval[0] < pref.rate < pref.interval[1]
    assert reg.pairwise_votes("rollout", 7) == [] and len(reg.pairwise_votes("evaluation", 8)) == 1
