"""Tenants stay apart: what a key's adapters and scopes let it call and rate, decided before
anything is resolved, so that a name a key may not use and a name that does not exist look alike."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraflow.registry.keys import create_key
from loraflow.registry.traffic import current_feedback, new_request_id
from tests.fake_vllm import BASE_ID, Setup, gateway, ready, wait
from tests.fake_vllm import gateway_setup as gateway_setup

pytestmark = pytest.mark.unit

CHAT = [{"role": "user", "content": "why was I charged twice?"}]


def _chat(client: TestClient, key: str, model: str) -> Any:
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": CHAT},
        headers={"authorization": f"Bearer {key}"},
    )


def _serving(client: TestClient, key: str) -> TestClient:
    ready(client)
    wait(
        lambda: client.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200,
        "keys",
    )
    return client


def test_a_name_the_key_may_not_use_and_a_missing_one_get_the_same_answer(gateway_setup: Setup) -> None:
    key, _ = create_key(gateway_setup.registry, "support-app", ["support"])
    gateway_setup.registry.promote("billing", 1, alias="staging", force=True, reason="test")
    with gateway(gateway_setup, auth=True) as client:
        _serving(client, key)
        calls = len(gateway_setup.engines[0].requests)
        for forbidden, missing in (
            ("billing", "nothing-here"),
            ("billing:staging", "nothing-here:staging"),
            ("billing@v1", "nothing-here@v1"),
        ):
            a, b = _chat(client, key, forbidden), _chat(client, key, missing)
            assert a.status_code == b.status_code == 404, (a.text, b.text)
            assert a.json()["error"]["message"].replace(forbidden, "X") == b.json()["error"][
                "message"
            ].replace(missing, "X")
            assert "staging" not in a.text.replace(forbidden, "")  # billing's aliases are not listed
        assert len(gateway_setup.engines[0].requests) == calls


def test_new_keys_get_least_privilege_and_scopes_open_the_base_and_pinned_versions(
    gateway_setup: Setup,
) -> None:
    reg = gateway_setup.registry
    plain, _ = create_key(reg, "plain", ["support"])
    pinned, _ = create_key(reg, "pinned", ["support"], ["versions"])
    base, _ = create_key(reg, "base", ["support"], ["base"])
    operator, _ = create_key(reg, "ops", ["billing"], ["operator"])
    with gateway(gateway_setup, auth=True) as client:
        _serving(client, plain)
        assert _chat(client, plain, "support").status_code == 200
        assert _chat(client, plain, "support:production").status_code == 200
        for model, scope in (("support@v1", "versions"), (BASE_ID, "base")):
            denied = _chat(client, plain, model)
            assert denied.status_code == 403 and f"'{scope}' scope" in denied.json()["error"]["message"]
        assert _chat(client, pinned, "support@v1").json()["model"] == "support@v1"
        assert _chat(client, pinned, BASE_ID).status_code == 403
        assert _chat(client, base, BASE_ID).status_code == 200
        assert _chat(client, base, "support@v1").status_code == 403
        for model in ("support@v1", BASE_ID, "billing"):  # operator: every scope, every adapter
            assert _chat(client, operator, model).status_code == 200

        def listed(key: str) -> dict[str, list[str]]:
            cards = client.get("/v1/models", headers={"authorization": f"Bearer {key}"}).json()["data"]
            return {c["id"]: [v["id"] for v in c.get("versions") or []] for c in cards}

        assert listed(plain) == {"support": []}
        assert listed(pinned) == {"support": ["support@v1"]}
        assert listed(base) == {BASE_ID: [], "support": []}
        assert set(listed(operator)) == {BASE_ID, "support", "billing"}


def test_only_the_requesting_key_rates_a_request_and_its_last_rating_counts(gateway_setup: Setup) -> None:
    reg = gateway_setup.registry
    mine, _ = create_key(reg, "tenant-a", ["support"])
    theirs, _ = create_key(reg, "tenant-b", ["support"])
    reviewer, _ = create_key(reg, "reviewer", ["support"], ["review"])
    traffic = {"sample_rate": 1.0, "flush_interval_s": 0.05}
    with gateway(gateway_setup, auth=True, traffic=traffic) as client:
        _serving(client, mine)
        first = _chat(client, mine, "support").headers["x-request-id"]
        second = _chat(client, mine, "support").headers["x-request-id"]

        def rate(key: str, rid: str, rating: int, correction: str | None = None) -> Any:
            body = {"request_id": rid, "rating": rating, "correction": correction}
            return client.post("/v1/feedback", json=body, headers={"authorization": f"Bearer {key}"})

        poisoned = rate(theirs, first, -1, "POISONED ANSWER")
        missing = new_request_id(datetime.now(UTC))
        unknown = rate(theirs, missing, -1)
        assert poisoned.status_code == unknown.status_code == 404  # another key's request does not exist
        assert poisoned.json()["error"]["message"].replace(first, "X") == unknown.json()["error"][
            "message"
        ].replace(missing, "X")
        for _ in range(3):
            assert rate(mine, first, -1).status_code == 200  # repeated: counted once
        assert rate(mine, second, 1).status_code == 200
        assert rate(reviewer, second, 1, "a reviewer's better answer").status_code == 200
        wait(lambda: len(list(reg.traffic.read("feedback"))) == 5, "the feedback")
        metrics = client.get("/metrics").text
    # first: -1 from its key (three times, one counts); second: +1 from its key and +1 from the reviewer
    assert 'loraflow_drift_negative_feedback_rate{adapter="support",version="v1"} 0.3333' in metrics
    stored = list(reg.traffic.read("feedback"))
    assert "POISONED ANSWER" not in json.dumps(stored)
    assert sorted(f["key"] for f in stored) == ["reviewer", "tenant-a", "tenant-a", "tenant-a", "tenant-a"]


def test_the_feedback_that_counts_is_each_keys_last_and_the_earlier_stay_on_record() -> None:
    def fb(rid: str, key: str, at: str, rating: int) -> dict[str, Any]:
        return {"request_id": rid, "key": key, "at": at, "rating": rating}

    given = [
        fb("r1", "a", "2026-12-02T10:00:02", -1),
        fb("r1", "a", "2026-12-02T10:00:01", 1),
        fb("r1", "b", "2026-12-02T10:00:00", 1),
        fb("r2", "a", "2026-12-02T10:00:00", -1),
    ]
    assert current_feedback(given) == [given[2], given[3], given[0]]
