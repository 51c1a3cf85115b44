"""`loraflow flywheel build-dataset`: sampled traffic with feedback becomes the adapter's next dataset
(the installed console script on the tiny Llama), and an empty or thin window says what to check."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.redact import Redactor
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings, load_settings
from loraflow.registry.traffic import TrafficStore, new_request_id
from tests.factories import make_adapter, make_base, write_traffic
from tests.services import Tiny

LORAFLOW = Path(sys.executable).parent / "loraflow"
NOW = datetime.now(UTC).replace(microsecond=0)

TOPICS = [
    "reset my password",
    "cancel the order I placed yesterday",
    "change the delivery address to my office",
    "refund for a damaged blender",
    "upgrade the plan to the business tier",
    "invoice copy for last March",
    "close the account of a former employee",
    "add a second user to the team",
    "report a billing error on the receipt",
]


def request(adapter: str, at: datetime, prompt: str, *, status: int = 200) -> dict[str, Any]:
    return {
        "request_id": new_request_id(at),
        "at": at.isoformat(),
        "adapter": adapter,
        "version": 1,
        "endpoint": "/v1/chat/completions",
        "request": {"messages": [{"role": "user", "content": f"Please help: {prompt}."}]},
        "response": [{"index": 0, "content": f"Routed to the team for: {prompt}", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9},
        "latency_s": 0.1,
        "status": status,
        "error": None if status == 200 else {"message": "engine unavailable"},
        "stream": False,
        "key": None,
        "sampled": True,
    }


def feedback(req: dict[str, Any], rating: int, correction: str | None = None) -> dict[str, Any]:
    return {
        "request_id": req["request_id"],
        "at": (datetime.fromisoformat(req["at"]) + timedelta(seconds=30)).isoformat(),
        "adapter": req["adapter"],
        "version": req["version"],
        "rating": rating,
        "correction": correction,
        "comment": None,
        "key": None,
    }


def traffic(
    settings: Settings, adapter: str, redactor: Redactor
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nine requests: 4 rated +1, 2 corrected, 1 rated -1 alone, 1 unrated, 1 failed."""
    requests = [
        request(adapter, NOW - timedelta(minutes=40 - i), topic, status=500 if i == 8 else 200)
        for i, topic in enumerate(TOPICS)
    ]
    given = [feedback(r, 1) for r in requests[:4]]
    given += [
        feedback(r, -1, correction=f"Escalated to billing: {t}")
        for r, t in zip(requests[4:6], TOPICS[4:6], strict=True)
    ]
    given.append(feedback(requests[6], -1))
    store = TrafficStore(settings.resolved_traffic_uri)
    return write_traffic(store, "requests", requests, redactor), write_traffic(
        store, "feedback", given, redactor
    )


def register_fake(settings: Settings, tmp_path: Path, name: str) -> None:
    """An adapter on a base with a placeholder tokenizer: anything that loads it fails."""
    reg = Registry.open(settings)
    try:
        reg.register(name, make_adapter(tmp_path / "adapter"), base_model=str(make_base(tmp_path / "base")))
    finally:
        reg.close()


@pytest.mark.unit
def test_no_traffic_says_so_and_what_to_check(tmp_path: Path) -> None:
    settings = load_settings()
    register_fake(settings, tmp_path, "support")
    before = datetime.now(UTC)
    result = CliRunner().invoke(app, ["flywheel", "build-dataset", "support", "--since", "1h"])
    hours = {f"{before.hour:02d}:00", f"{datetime.now(UTC).hour:02d}:00"}
    assert result.exit_code == 3, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1
    message = result.stderr
    assert message.startswith("error: no sampled traffic of support between ")
    assert any(f"traffic after {h} is left for the next run; pass --until now" in message for h in hours)
    assert "sample_rate" in message and settings.resolved_traffic_uri in message and "{" not in message

    result = CliRunner().invoke(
        app, ["flywheel", "build-dataset", "support", "--since", "1h", "--until", "now"]
    )
    assert result.exit_code == 3 and "no sampled traffic of support" in result.stderr
    assert "--until now" not in result.stderr  # the window already ends now
    result = CliRunner().invoke(app, ["flywheel", "build-dataset", "support", "--until", "now", "--json"])
    assert result.exit_code == 3 and json.loads(result.stdout)["error"]["param"] == "since"

    result = CliRunner().invoke(app, ["flywheel", "build-dataset", "support", "--until", "tomorrow"])
    assert result.exit_code == 2 and "--until must be an ISO 8601 time" in result.stderr


@pytest.mark.unit
def test_too_few_examples_is_refused_before_the_tokenizer_loads(tmp_path: Path, redactor: Redactor) -> None:
    settings = load_settings()
    register_fake(settings, tmp_path, "support")
    traffic(settings, "support", redactor)
    result = CliRunner().invoke(
        app, ["flywheel", "build-dataset", "support", "--since", "2h", "--until", "now"]
    )
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith("error: only 6 usable new examples from support's traffic between ")
    assert "flywheel.min_examples is 10" in message
    assert (
        "requests 9, dropped failed 1, corrected 2, positive 4, dropped negative 1, dropped unrated 1"
        in message
    )
    assert "{" not in message and "Traceback" not in result.output


@pytest.mark.integration
def test_build_dataset_from_rated_and_corrected_traffic(
    isolated_env: Path, tiny: Tiny, redactor: Redactor
) -> None:
    from loraflow.trainer.prepare import SPLITS, load_split

    settings = load_settings()
    reg = Registry.open(settings)
    reg.register("support", tiny.adapter(1), base_model=str(tiny.base))
    _, given = traffic(settings, "support", redactor)

    until = (NOW + timedelta(minutes=1)).isoformat()
    args = ["flywheel", "build-dataset", "support", "--since", "2h", "--until", until, "--json"]
    env = os.environ | {"LORAFLOW_FLYWHEEL__MIN_EXAMPLES": "4"}
    done = subprocess.run(
        [str(LORAFLOW), *args], cwd=isolated_env, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    built = json.loads(done.stdout)
    assert (built["dataset"], built["created"]) == ("support-traffic@v1", True)
    counts = built["counts"]
    assert (counts["requests"], counts["dropped_failed"]) == (9, 1)
    assert (counts["positive"], counts["corrected"]) == (4, 2)
    assert (counts["dropped_negative"], counts["dropped_unrated"], counts["new_examples"]) == (1, 1, 6)

    dataset = reg.get_dataset("support-traffic@v1")
    assert dataset.lineage["kind"] == "traffic" and dataset.lineage["adapter"] == "support"
    answers = sorted(row["messages"][-1]["content"] for s in SPLITS for row in load_split(reg, dataset, s))
    expected = [f"Routed to the team for: {t}" for t in TOPICS[:4]]
    expected += [g["correction"] for g in given[4:6]]
    assert answers == sorted(expected)  # the rated-down, unrated and failed answers are not there
    reg.close()

    # The same window again (in process: the script was tested above): the same files, found by digest.
    again = CliRunner().invoke(app, args, env={"LORAFLOW_FLYWHEEL__MIN_EXAMPLES": "4"})
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) | {"created": True} == built and not json.loads(again.stdout)["created"]


@pytest.mark.integration
def test_the_same_traffic_in_another_arrival_order_builds_the_same_dataset(
    tmp_path: Path, tiny: Tiny, redactor: Redactor
) -> None:
    """Requests served concurrently are written in any order: the split must not depend on it."""
    from loraflow.trainer.flywheel.dataset import build_dataset
    from loraflow.trainer.prepare import SPLITS, load_split

    rows = {}
    for run, order in (("first", TOPICS), ("second", TOPICS[::-1])):
        settings = Settings(home=tmp_path / run, flywheel={"min_examples": 4, "test_fraction": 0.3})
        reg = Registry.open(settings)
        try:
            reg.register("support", tiny.adapter(1), base_model=str(tiny.base))
            requests = [request("support", NOW - timedelta(minutes=40 - i), t) for i, t in enumerate(order)]
            store = TrafficStore(settings.resolved_traffic_uri)
            write_traffic(store, "requests", requests, redactor)
            write_traffic(store, "feedback", [feedback(r, 1) for r in requests], redactor)
            built = build_dataset(reg, settings, "support", since=timedelta(hours=2), until=NOW)
            rows[run] = {s: load_split(reg, built.dataset, s) for s in SPLITS}
        finally:
            reg.close()
    assert [len(rows["first"][s]) for s in SPLITS] == [5, 1, 3]  # 9 examples, 0.3 test, 0.1 val
    assert rows["first"] == rows["second"]


def reviews(settings: Settings, requests: list[dict[str, Any]], redactor: Redactor) -> dict[str, str]:
    """Reviews from the console over ``traffic``'s requests, each against what its customer said;
    returns the reviewers' corrections by request index."""
    reg = Registry.open(settings)
    corrections = {
        1: "Sent to the password team: reset link mailed.",
        5: "Moved to the sales desk: quote sent.",
    }
    try:
        ids = [r["request_id"] for r in requests]
        review = functools.partial(reg.add_review, reviewer="dana", redactor=redactor)
        review(ids[0], rating=-1, categories=["format"])  # customer +1, reviewer -1: dropped
        review(ids[1], rating=-1, correction=corrections[1])  # customer +1, reviewer's correction
        review(ids[2], categories=["hallucination", "format"])  # only tags: the customer's +1 decides
        review(ids[4], rating=-1)  # customer's correction beats a reviewer's rating
        review(ids[5], correction=corrections[5])  # reviewer's correction beats the customer's
        review(ids[6], rating=-1)  # customer -1, first reviewed -1 ...
        review(ids[6], rating=1)  # ... then +1: the latest review counts
        review(ids[7], rating=1)  # unrated by its customer
        review(ids[8], rating=-1, categories=["refusal"])  # failed: dropped whatever anyone says
    finally:
        reg.close()
    return {str(i): text for i, text in corrections.items()}


@pytest.mark.unit
def test_reviews_take_precedence_over_customer_feedback_in_the_counts(
    tmp_path: Path, redactor: Redactor
) -> None:
    settings = load_settings()
    register_fake(settings, tmp_path, "support")
    requests, _ = traffic(settings, "support", redactor)
    reviews(settings, requests, redactor)
    result = CliRunner().invoke(
        app, ["flywheel", "build-dataset", "support", "--since", "2h", "--until", "now"]
    )
    assert result.exit_code == 2, result.output  # 7 usable of 10: refused before the tokenizer loads
    assert result.stderr.startswith("error: only 7 usable new examples from support's traffic between ")
    assert (
        "requests 9, dropped failed 1, review corrected 2, corrected 1, review positive 2, positive 2, "
        "dropped review negative 1." in result.stderr
    )


@pytest.mark.integration
def test_build_dataset_prefers_reviews_and_records_their_categories(
    isolated_env: Path, tiny: Tiny, redactor: Redactor
) -> None:
    from loraflow.trainer.prepare import SPLITS, load_split

    settings = load_settings()
    reg = Registry.open(settings)
    reg.register("support", tiny.adapter(1), base_model=str(tiny.base))
    requests, given = traffic(settings, "support", redactor)
    # A request reviewed but served before the window: its tags are not this dataset's.
    (old,) = write_traffic(
        TrafficStore(settings.resolved_traffic_uri),
        "requests",
        [request("support", NOW - timedelta(hours=5), "renew the maintenance contract")],
        redactor,
    )
    reg.add_review(old["request_id"], reviewer="dana", redactor=redactor, rating=-1, categories=["off_topic"])
    corrections = reviews(settings, requests, redactor)

    args = [
        "flywheel",
        "build-dataset",
        "support",
        "--since",
        "2h",
        "--until",
        (NOW + timedelta(minutes=1)).isoformat(),
    ]
    env = {"LORAFLOW_FLYWHEEL__MIN_EXAMPLES": "4"}
    result = CliRunner().invoke(app, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    counts = built["counts"]
    assert (counts["requests"], counts["dropped_failed"]) == (9, 1)
    assert (counts["review_corrected"], counts["corrected"]) == (2, 1)
    assert (counts["review_positive"], counts["positive"], counts["unrated"]) == (2, 2, 0)
    assert (counts["dropped_review_negative"], counts["dropped_negative"], counts["dropped_unrated"]) == (
        1,
        0,
        0,
    )
    assert counts["new_examples"] == 7
    categories = {"1": {"format": 2, "hallucination": 1, "refusal": 1}}  # the window's, per version
    assert built["review_categories"] == categories

    dataset = reg.get_dataset(built["dataset"])
    assert dataset.lineage["review_categories"] == categories and dataset.lineage["counts"] == counts
    answers = sorted(row["messages"][-1]["content"] for s in SPLITS for row in load_split(reg, dataset, s))
    served = [f"Routed to the team for: {t}" for t in TOPICS]
    expected = [
        corrections["1"],
        served[2],
        served[3],
        given[4]["correction"],
        corrections["5"],
        served[6],
        served[7],
    ]
    assert answers == sorted(
        expected
    )  # not request 0 (a reviewer's -1 over its customer's +1) nor 8 (failed)
    reg.close()

    # The plain view: every count, and the categories per version.
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"found (same splits, by digest) dataset {built['dataset']}: ")
    assert "  review_corrected: 2" in lines and "  dropped_review_negative: 1" in lines
    assert "  review categories of v1: format 2, hallucination 1, refusal 1" in lines
