"""The gateway under engine faults, over a fake vLLM at the HTTP boundary (``httpx.MockTransport``).

Everything above the transport is real: the app, the routing table polling a real SQLite
registry, ``VLLMHttpEngine``, and the official ``openai`` client for streams.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from loraflow.registry.keys import create_key
from loraflow.server.engine.cache import engine_name_of
from tests.factories import make_adapter
from tests.fake_vllm import BASE_ID, CHAT, Setup, gateway, home_order, ready, wait

pytestmark = pytest.mark.unit


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def _metric(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("fail", ["connect", "500", "html500"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_replica_is_retried_once_on_another(gateway_setup: Setup, fail: str, stream: bool) -> None:
    # Health checks only at the start: one that ran between breaking the replica and the request
    # would take an unreachable replica out first, and there would be nothing to retry (a CI flake).
    with gateway(gateway_setup, n_replicas=2, poll_interval_s=30) as client:
        ready(client)
        first, second = home_order(client, gateway_setup, "support", 1)  # the order they are tried in
        first.fail = fail
        body = {"model": "support", **CHAT, "stream": stream}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert second.url in r.text and first.url not in r.text
        assert len(first.requests) == (0 if fail == "connect" else 1) and len(second.requests) == 1
        failures = f'loraflow_engine_failures_total{{phase="before_first_byte",replica="{first.url}"}}'
        assert _metric(client, failures) == 1.0
        # A replica that cannot be reached is taken out until a health check finds it again; one
        # that answers its health checks stays in.
        wait(lambda: client.get("/ready").status_code == 200, "a health check round")
        r2 = client.post("/v1/chat/completions", json=body)
        assert r2.status_code == 200
        assert len(first.requests) == (0 if fail == "connect" else 2)


@pytest.mark.parametrize("stream", [False, True])
def test_with_no_other_replica_a_failure_is_503_with_retry_after(gateway_setup: Setup, stream: bool) -> None:
    with gateway(gateway_setup, n_replicas=1) as client:
        ready(client)
        gateway_setup.engines[0].fail = "500"
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT, "stream": stream})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        error = _error(r)
        assert error["type"] == "service_unavailable_error" and error["code"] == "engine_unavailable"
        assert "no other replica" in error["message"]
        # What the engine said, and where it runs, stay in the gateway's log.
        assert "illegal memory access" not in r.text and "replica-0" not in r.text


def test_when_every_replica_fails_the_client_gets_503_not_500(gateway_setup: Setup) -> None:
    with gateway(gateway_setup, n_replicas=2) as client:
        ready(client)
        for engine in gateway_setup.engines:
            engine.fail = "html500"
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert sum(len(e.requests) for e in gateway_setup.engines) == 2  # one try, one retry
        gateway_setup.engines[0].fail = "empty-stream"
        gateway_setup.engines[1].fail = "empty-stream"
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT, "stream": True})
        assert r.status_code == 503 and _error(r)["code"] == "engine_unavailable"


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_event(gateway_setup: Setup) -> None:
    with gateway(gateway_setup) as client:
        ready(client)
        gateway_setup.engines[0].break_stream_after = 1
        with client.stream(
            "POST", "/v1/chat/completions", json={"model": "support", **CHAT, "stream": True}
        ) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line]
        assert len(events) == 3, events
        assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "from"
        error = json.loads(events[1][6:])["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_unavailable" and "mid-stream" in error["message"]
        assert "replica-0" not in events[1]
        assert events[2] == "data: [DONE]"
        failures = 'loraflow_engine_failures_total{phase="mid_stream",replica="http://replica-0"}'
        assert _metric(client, failures) == 1.0

        # The broken connection took the replica out until a health check finds it again.
        wait(lambda: client.get("/ready").status_code == 200, "the replica to be back")
        oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="x", http_client=client, max_retries=0)
        stream = oai.chat.completions.create(model="support", stream=True, **CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.APIError, match="mid-stream"):
            list(stream)


def test_a_replica_that_lost_a_version_resolves_it_again_by_name(gateway_setup: Setup) -> None:
    with gateway(gateway_setup) as client:
        ready(client)
        engine = gateway_setup.engines[0]
        name = engine_name_of(gateway_setup.registry.get_version("support", 1))
        assert engine.resolved.count(name) == 1  # preloaded once, by name
        engine.loaded.clear()  # it restarted between two health checks
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT})
        assert r.status_code == 200 and r.json()["model"] == "support@v1"
        assert engine.resolved.count(name) == 2  # the request named it, and the engine fetched it itself


def test_a_version_the_engine_refuses_is_a_503_after_one_retry(gateway_setup: Setup, tmp_path: Path) -> None:
    """An artifact whose bytes do not match its digest: the engine's resolver refuses it (404 on the
    load), the gateway tries the other replica, then answers 503 with Retry-After, never a 500."""
    reg = gateway_setup.registry
    name = engine_name_of(
        reg.register("support", make_adapter(tmp_path / "a3", seed=3), base_model=str(gateway_setup.base))
    )
    with gateway(gateway_setup, n_replicas=2) as client:
        ready(client)
        for engine in gateway_setup.engines:
            engine.refuse.add(name)
        r = client.post("/v1/chat/completions", json={"model": "support@v2", **CHAT})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        error = _error(r)
        assert error["code"] == "engine_unavailable" and "support@v2" in error["message"]
        assert name not in error["message"] and "replica-" not in error["message"]
        assert all(not e.requests for e in gateway_setup.engines)  # never sent a completion
        assert all(r.healthy for r in client.app.state.gateway.replicas.replicas)  # type: ignore[attr-defined]
        assert client.post("/v1/chat/completions", json={"model": "support", **CHAT}).status_code == 200


def test_unexpected_errors_are_500s_in_openai_shape_without_a_traceback(gateway_setup: Setup) -> None:
    with gateway(gateway_setup) as client:
        ready(client)
        # An engine answer the gateway cannot read (usage is not an object) breaks the gateway's own code.
        gateway_setup.engines[0].usage = "garbled"
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT})
        assert r.status_code == 500
        error = _error(r)
        assert error == {
            "message": "internal error in the gateway",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }

        def boom() -> None:
            raise RuntimeError("secret detail")

        client.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
        r = client.get("/boom")
        assert r.status_code == 500 and _error(r)["code"] == "internal_error"
        assert "secret detail" not in r.text and "Traceback" not in r.text


def test_ready_is_status_only_and_the_detail_is_in_metrics(gateway_setup: Setup) -> None:
    client = gateway(gateway_setup, n_replicas=2)
    for engine in gateway_setup.engines:
        engine.load_delay_s = 0.05  # before the lifespan starts, so the preloads take it
    window_started = time.perf_counter()
    with client:
        ready(client)
        r = client.get("/ready")
        assert r.json() == {"status": "ready"}
        assert "replica" not in r.text and "support" not in r.text
        metrics = client.get("/metrics").text
        assert 'loraflow_replica_up{replica="http://replica-0"} 1.0' in metrics
        assert (
            'loraflow_resident_versions{adapter="support",replica="http://replica-1",version="v1"} 1.0'
            in metrics
        )
        assert _metric(client, 'loraflow_replica_adapter_loads{replica="http://replica-0"}') == 2.0
        load_s = _metric(client, 'loraflow_replica_adapter_load_seconds{replica="http://replica-0"}')
        window_s = time.perf_counter() - window_started
        # Two loads of at least 0.05 s each, in seconds: both ran inside the window seen here, so
        # their sum is at most twice it, however loaded the machine (no speed is claimed).
        assert 0.1 <= load_s <= 2 * window_s, (load_s, window_s)
        assert _metric(client, "loraflow_registry_revision") == gateway_setup.registry.revision()
        for engine in gateway_setup.engines:
            engine.up = False
        wait(lambda: client.get("/ready").status_code == 503, "/ready to turn 503")
        assert client.get("/ready").json() == {"status": "not ready"}
        assert 'loraflow_replica_up{replica="http://replica-0"} 0.0' in client.get("/metrics").text


def test_models_lists_only_what_the_key_may_use(gateway_setup: Setup) -> None:
    billing_key, _ = create_key(gateway_setup.registry, "billing-team", ["billing"])
    all_key, _ = create_key(gateway_setup.registry, "ops")
    with gateway(gateway_setup, auth=True) as client:
        ready(client)

        def ids(key: str) -> list[str]:
            r = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200
            return [m["id"] for m in r.json()["data"]]

        assert ids(billing_key) == ["billing"]  # the base needs the base scope
        assert ids(all_key) == ["billing", "support"]
        assert client.get("/v1/models").status_code == 401


def test_before_its_first_routing_snapshot_models_is_503_to_a_valid_key_not_401(
    gateway_setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraflow.server.routing import Snapshot

    key, _ = create_key(gateway_setup.registry, "ops")
    with gateway(gateway_setup, auth=True) as client:
        ready(client)
        routes = client.app.state.gateway.routes  # type: ignore[attr-defined]
        monkeypatch.setattr(routes.registry, "revision", lambda: -1)
        loaded, routes.snapshot = routes.snapshot, Snapshot()  # as a worker that has not polled yet
        r = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        routes.snapshot = loaded
        assert client.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200


def test_models_show_whether_each_version_matches_the_served_chat_template(
    gateway_setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = hashlib.sha256((gateway_setup.base / "chat_template.jinja").read_bytes()).hexdigest()
    gateway_setup.registry.register(
        "support",
        make_adapter(tmp_path / "a3", seed=3),
        base_model=str(gateway_setup.base),
        chat_template_hash=served,
    )
    gateway_setup.registry.register(
        "support",
        make_adapter(tmp_path / "a4", seed=4),
        base_model=str(gateway_setup.base),
        chat_template_hash="0" * 64,
    )
    with caplog.at_level("WARNING", logger="loraflow.routing"), gateway(gateway_setup) as client:
        ready(client)
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    matches = {v["id"]: v["template_matches"] for v in models["support"]["versions"]}
    assert matches == {"support@v1": None, "support@v2": True, "support@v3": False}
    assert "support@v3 was trained with a different chat template" in caplog.text
    assert "support@v2 was" not in caplog.text


def test_models_is_openais_list_shape(gateway_setup: Setup) -> None:
    with gateway(gateway_setup) as client:
        ready(client)
        body = client.get("/v1/models").json()
        oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="x", http_client=client, max_retries=0)
        listed = oai.models.list()
    assert body["object"] == "list"
    for card in body["data"]:
        assert (
            card["object"] == "model" and card["owned_by"] == "loraflow" and isinstance(card["created"], int)
        )
    base, *adapters = body["data"]
    assert base["id"] == BASE_ID and base["parent"] is None and base["aliases"] is None
    assert [a["parent"] for a in adapters] == [BASE_ID, BASE_ID]
    assert [m.owned_by for m in listed] == ["loraflow"] * 3


def test_metrics_token_keeps_the_replica_detail_private(gateway_setup: Setup) -> None:
    with gateway(gateway_setup, metrics_token="scrape-me") as client:
        ready(client)
        refused = client.get("/metrics")
        assert refused.status_code == 401 and "replica-0" not in refused.text
        assert client.get("/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics", headers={"authorization": "Basic scrape-me"}).status_code == 401
        # The scheme is case-insensitive (RFC 9110), as for API keys; spaces around are not the token.
        for header in ("Bearer scrape-me", "bearer scrape-me", "BEARER  scrape-me "):
            allowed = client.get("/metrics", headers={"authorization": header})
            assert allowed.status_code == 200 and 'replica="http://replica-0"' in allowed.text, header


def test_a_load_the_engine_already_finished_counts_as_loaded(gateway_setup: Setup) -> None:
    """A load that timed out on our side but finished on the engine's (or one made by another
    gateway) is not an error: the engine holds that exact version under its immutable name."""
    with gateway(gateway_setup) as client:
        ready(client)
        (replica,) = client.app.state.gateway.replicas.replicas  # type: ignore[attr-defined]
        name = next(n for n in replica.resident if n.startswith("support@v1+"))
        replica.forget(name)  # the gateway lost track; the engine did not
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT})
        assert r.status_code == 200 and name in replica.resident


def test_before_its_first_routing_snapshot_a_gateway_answers_503_not_404(
    gateway_setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraflow.server.routing import Snapshot

    client = gateway(gateway_setup)
    with client:
        ready(client)
        routes = client.app.state.gateway.routes  # type: ignore[attr-defined]
        monkeypatch.setattr(routes.registry, "revision", lambda: -1)  # its polls find nothing new
        loaded, routes.snapshot = routes.snapshot, Snapshot()  # as a worker that has not polled yet
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["code"] == "unavailable"
        routes.snapshot = loaded
        assert client.post("/v1/chat/completions", json={"model": "support", **CHAT}).status_code == 200
