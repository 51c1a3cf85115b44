"""`loraflow traffic show` and `traffic purge`, run as the installed console script over a traffic sink
written by ``TrafficStore`` (as the gateway's writer writes it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from loraflow.cli.main import app
from loraflow.registry.redact import Redactor
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings, load_settings
from loraflow.registry.traffic import TrafficStore, new_request_id
from tests.factories import run_loraflow, write_traffic

NOW = datetime.now(UTC).replace(microsecond=0)


loraflow = run_loraflow  # the installed script, as a subprocess


def request(adapter: str, at: datetime, prompt: str) -> dict[str, Any]:
    return {
        "request_id": new_request_id(at),
        "at": at.isoformat(),
        "adapter": adapter,
        "version": 1,
        "endpoint": "/v1/chat/completions",
        "request": {"messages": [{"role": "user", "content": prompt}]},
        "response": [{"index": 0, "content": f"answer to {prompt}", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 4},
        "latency_s": 0.1,
        "status": 200,
        "error": None,
        "stream": False,
        "key": None,
        "sampled": True,
    }


def feedback(req: dict[str, Any], at: datetime, rating: int, correction: str | None = None) -> dict[str, Any]:
    return {
        "request_id": req["request_id"],
        "at": at.isoformat(),
        "adapter": req["adapter"],
        "version": req["version"],
        "rating": rating,
        "correction": correction,
        "comment": "[red]not markup[/red] <EMAIL_ADDRESS_3f2a9c1be07d>",
        "key": None,
    }


def sink(tmp_path: Path) -> TrafficStore:
    settings = Settings(home=tmp_path / "home")
    Registry.open(settings).close()  # the gateway that wrote the traffic had its registry there
    return TrafficStore(settings.resolved_traffic_uri)


def assert_one_line_error(result: Result, code: int) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert result.stdout == ""


@pytest.mark.integration
def test_show_prints_the_record_and_its_feedback(
    isolated_env: Path, tmp_path: Path, redactor: Redactor
) -> None:
    store = sink(tmp_path)
    asked = request("support", NOW - timedelta(hours=1), "where is my order [/] 42?")
    other = request("support", NOW - timedelta(minutes=50), "another one")
    rated = [
        feedback(asked, NOW - timedelta(minutes=30), -1, correction="it shipped"),
        feedback(other, NOW, 1),
    ]
    asked, other = write_traffic(store, "requests", [asked, other], redactor)
    rated = write_traffic(store, "feedback", rated, redactor)

    done = loraflow("traffic", "show", asked["request_id"], cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"request": asked, "feedback": [rated[0]]}


@pytest.mark.unit
def test_show_of_an_unknown_request_is_not_found(redactor: Redactor) -> None:
    store = TrafficStore(load_settings().resolved_traffic_uri)
    write_traffic(store, "requests", [request("support", NOW, "hello")], redactor)
    for request_id in (new_request_id(NOW), "not-a-request-id"):
        assert_one_line_error(CliRunner().invoke(app, ["traffic", "show", request_id]), 3)


@pytest.mark.integration
def test_purge_by_request_id_then_by_date_then_expired(
    isolated_env: Path, tmp_path: Path, redactor: Redactor
) -> None:
    store = sink(tmp_path)
    old = [request("support", NOW - timedelta(days=d), f"old {d}") for d in (9, 8)]
    recent = [request("billing", NOW - timedelta(days=2), "recent"), request("support", NOW, "today")]
    forget = request("support", NOW, "my e-mail is <EMAIL_ADDRESS_3f2a9c1be07d>")
    *old, r0, r1, forget = write_traffic(store, "requests", [*old, *recent, forget], redactor)
    recent = [r0, r1]
    write_traffic(
        store,
        "feedback",
        [feedback(forget, NOW, 1), feedback(recent[1], NOW, 1), feedback(old[0], NOW, -1)],
        redactor,
    )

    # A data-subject request: the request and its feedback go; the rest of their files stays.
    done = loraflow("traffic", "purge", "--request-id", forget["request_id"], "--json", cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "records_deleted": 2,
        "files_deleted": 0,
        "before": None,
        "request_ids": [forget["request_id"]],
    }
    assert store.find_request(forget["request_id"]) is None
    assert store.find_request(recent[1]["request_id"]) == recent[1]
    assert [f["request_id"] for f in store.read("feedback", adapter="support", since=NOW)] == [
        recent[1]["request_id"],
        old[0]["request_id"],
    ]

    # By date: whole partitions before the day go, files and records counted; text output by default.
    before = (NOW - timedelta(days=8)).date().isoformat()
    done = loraflow("traffic", "purge", "--before", before, cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"purged 1 records in 1 files (before {before})"
    assert store.find_request(old[0]["request_id"]) is None
    assert store.find_request(old[1]["request_id"]) == old[1]

    # By age: traffic.retention_days (here 5) keeps the last five days.
    done = loraflow(
        "traffic",
        "purge",
        "--expired",
        "--json",
        cwd=isolated_env,
        env={"LORAFLOW_TRAFFIC__RETENTION_DAYS": "5"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["records_deleted"], result["before"]) == (1, (NOW.date() - timedelta(days=4)).isoformat())
    assert store.find_request(old[1]["request_id"]) is None
    assert [r["request_id"] for r in store.read("requests")] == [
        recent[0]["request_id"],
        recent[1]["request_id"],
    ]


@pytest.mark.unit
def test_purge_refuses_bad_input_and_deletes_nothing(redactor: Redactor) -> None:
    store = TrafficStore(load_settings().resolved_traffic_uri)
    write_traffic(store, "requests", [request("support", NOW - timedelta(days=30), "old")], redactor)
    for args in (["--before", "yesterday"], ["--before", NOW.date().isoformat(), "--expired"], []):
        assert_one_line_error(CliRunner().invoke(app, ["traffic", "purge", *args]), 2)
    as_json = CliRunner().invoke(app, ["traffic", "purge", "--before", "yesterday", "--json"])
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["error"]["param"] == "before"
    assert len(list(store.read("requests"))) == 1
