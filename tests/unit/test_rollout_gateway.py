"""Rollouts through a real gateway over fake engines: the canary split, the controller deciding on
live counts, the lease passing between gateways, and shadow traffic (server/rollouts.py,
server/shadow.py; the rules themselves: test_rollout_rules.py)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraflow.registry.domain import RolloutInfo, RolloutStep
from loraflow.registry.keys import create_key
from loraflow.registry.refs import version_ref
from loraflow.registry.settings import RolloutPolicy, RolloutSettings
from loraflow.registry.traffic import answer_text
from tests.factories import FORCED, make_adapter, register_dataset
from tests.fake_vllm import Setup, gateway, ready, wait

pytestmark = pytest.mark.unit

CHAT = [{"role": "user", "content": "Refund order 1234 for jane.doe@example.com please"}]
GOOD = '{"intent": "refund", "order": 1234}'
FAST = {"interval_s": 0.05, "lease_ttl_s": 1.0}


def _settings(**policy: Any) -> RolloutSettings:
    return RolloutSettings(
        policies={"default": RolloutPolicy(**({"min_requests": 50, "min_seconds": 0} | policy))}, **FAST
    )


@pytest.fixture
def setup(gateway_setup: Setup, tmp_path: Path) -> Setup:
    """``intake``: v1 in production and v2, both trained on a dataset whose answers are JSON (so the
    format guard applies)."""
    reg = gateway_setup.registry
    register_dataset(reg, "tickets", tmp_path / "ds", profile={"format": {"json_share": 1.0}})
    for seed in (1, 2):
        reg.register(
            "intake",
            make_adapter(tmp_path / f"intake{seed}", seed=10 + seed),
            base_model=str(gateway_setup.base),
            dataset="tickets@v1",
        )
    reg.promote("intake", 1, force=True, reason=FORCED)
    return gateway_setup


def _start(s: Setup, *steps: RolloutStep) -> RolloutInfo:
    return s.registry.start_rollout("intake", 2, steps=list(steps), force=True, reason=FORCED)


def _engines_answer(s: Setup, candidate: Callable[[dict[str, Any]], str], production: str = GOOD) -> None:
    for engine in s.engines:
        engine.answer = lambda body: candidate(body) if body["model"].startswith("intake@v2") else production


def _chat(client: TestClient, **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "intake", "messages": CHAT} | extra)


def _in_rollout(client: TestClient, rollout: RolloutInfo) -> None:
    """Wait until the gateway routes by the rollout (its routing snapshot has it)."""
    routes = client.app.state.gateway.routes  # type: ignore[attr-defined]

    def routed() -> bool:
        now = routes.snapshot.rollouts.get("intake")
        return now is not None and (now.id, now.seq) == (rollout.id, rollout.seq)

    wait(routed, "the rollout in the routing table")


def _ended(s: Setup) -> RolloutInfo:
    (last,) = [r for r in s.registry.rollouts("intake")][-1:]
    return last


# -- the split -----------------------------------------------------------------------------------


def test_the_canary_split_is_within_tolerance_sticky_per_user_and_explicit_refs_bypass_it(
    setup: Setup,
) -> None:
    with gateway(setup, rollout=_settings()) as client:
        ready(client)
        _engines_answer(setup, lambda body: GOOD)
        rollout = _start(setup, RolloutStep(canary=20))  # one step below 100: held there
        _in_rollout(client, rollout)

        answers = [_chat(client) for _ in range(2000)]
        assert all(r.status_code == 200 for r in answers)
        for r in answers[:50]:  # the body and the header both say which version answered
            assert r.json()["model"] == r.headers["x-loraflow-model"]
        served = Counter(r.headers["x-loraflow-model"] for r in answers)
        assert set(served) == {"intake@v1", "intake@v2"}
        share = served["intake@v2"] / 2000
        assert abs(share - 0.20) < 0.03  # 3.4 standard deviations of a binomial share at n=2000

        # Sticky per end user: each user's requests all go one way; the users split 20/80 too.
        by_user: dict[str, set[str]] = {}
        for i in range(300):
            for _ in range(2):
                r = _chat(client, user=f"user-{i}")
                by_user.setdefault(f"user-{i}", set()).add(r.headers["x-loraflow-model"])
        assert all(len(versions) == 1 for versions in by_user.values())
        on_candidate = sum(versions == {"intake@v2"} for versions in by_user.values()) / 300
        assert 0.12 < on_candidate < 0.28

        for model in ("intake@v1", "intake:production", "intake@v2"):
            names = {
                client.post("/v1/chat/completions", json={"model": model, "messages": CHAT}).headers[
                    "x-loraflow-model"
                ]
                for _ in range(40)
            }
            assert names == {"intake@v2" if model == "intake@v2" else "intake@v1"}
    assert setup.registry.rollout("intake") is not None  # held at 20%: nothing moved on its own


# -- the controller --------------------------------------------------------------------------------


def _drive(client: TestClient, s: Setup, *, limit: int, until: Callable[[], bool]) -> int:
    """Send requests until ``until()`` (checked every 10), at most ``limit``; returns how many."""
    for sent in range(1, limit + 1):
        _chat(client)
        if sent % 10 == 0 and until():
            return sent
    return limit


def _canary(setup: Setup, candidate: str, *, failing: bool = False) -> RolloutInfo:
    """A canary at 50% whose candidate answers ``candidate`` (or a 500), under requests until the
    rollout ends (400 at most); the ended rollout."""
    with gateway(setup, rollout=_settings()) as client:
        ready(client)
        _engines_answer(setup, lambda body: candidate)
        if failing:
            for engine in setup.engines:
                engine.fail_if = lambda body: body["model"].startswith(version_ref("intake", 2))
        rollout = _start(setup, RolloutStep(canary=50), RolloutStep(canary=100))
        _in_rollout(client, rollout)
        _drive(client, setup, limit=400, until=lambda: setup.registry.rollout("intake") is None)
    ended = _ended(setup)
    assert ended.state == "rolled_back" and setup.registry.get("intake").aliases["production"] == 1
    return ended


def _guard(decision: Any, name: str) -> dict[str, Any]:
    (guard,) = [g for g in decision.figures["guards"] if g["name"] == name]
    return guard  # type: ignore[no-any-return]


def test_a_canary_that_answers_errors_is_rolled_back_within_40_of_its_requests(setup: Setup) -> None:
    decision = _canary(setup, GOOD, failing=True).decisions[-1]
    assert decision.action == "rollback" and decision.reason and decision.reason.startswith("error_rate")
    errors = _guard(decision, "error_rate")
    assert errors["verdict"] == "fail" and errors["n"][0] <= 40  # the candidate's requests it took
    assert decision.figures["candidate"]["error_rate"] == 1.0  # type: ignore[index]
    events = [e for e in setup.registry.history("intake").events if e.action == "rollout.rollback"]
    assert len(events) == 1


def test_a_canary_that_answers_prose_instead_of_json_is_rolled_back_on_format(setup: Setup) -> None:
    decision = _canary(setup, "Sure! I have refunded order 1234.").decisions[-1]
    fmt = _guard(decision, "format_invalid")
    assert fmt["verdict"] == "fail" and fmt["n"][0] <= 40
    assert decision.figures["candidate"]["json_valid"] == 0.0  # type: ignore[index]


def test_a_good_canary_advances_step_by_step_and_reaches_production_on_its_own(setup: Setup) -> None:
    with gateway(setup, rollout=_settings()) as client:
        ready(client)
        _engines_answer(setup, lambda body: GOOD)
        rollout = _start(setup, RolloutStep(canary=50), RolloutStep(canary=100))
        _in_rollout(client, rollout)
        sent = _drive(client, setup, limit=3000, until=lambda: setup.registry.rollout("intake") is None)
    ended = _ended(setup)
    assert ended.state == "succeeded", (sent, ended.decisions[-1])
    assert setup.registry.get("intake").aliases["production"] == 2
    assert [d.action for d in ended.decisions] == ["start", "advance", "succeed"]
    last = ended.decisions[-1].figures or {}
    assert {g["name"]: g["verdict"] for g in last["guards"]} == {
        "error_rate": "pass",
        "format_invalid": "pass",
        "truncated": "pass",
        "negative_feedback": "insufficient",  # nobody rated: too few ratings to gate on
    }
    assert last["production"]["requests"] > 0  # at 100%: compared with production's previous step


def test_killing_the_controllers_gateway_hands_the_lease_over_and_the_rollout_goes_on(setup: Setup) -> None:
    settings = _settings(min_requests=30)
    a = gateway(setup, rollout=settings)
    b = gateway(setup, rollout=settings)
    a.__enter__()
    with b:
        ready(a)
        ready(b)
        _engines_answer(setup, lambda body: GOOD)
        rollout = _start(setup, RolloutStep(canary=50), RolloutStep(canary=100))
        _in_rollout(a, rollout)
        _in_rollout(b, rollout)
        holders = {
            a.app.state.rollouts.holder: "a",  # type: ignore[attr-defined]
            b.app.state.rollouts.holder: "b",  # type: ignore[attr-defined]
        }
        wait(
            lambda: (r := setup.registry.rollout("intake")) is not None and r.controller in holders, "a lease"
        )
        first = setup.registry.rollout("intake")
        assert first is not None and first.step == 0
        controller = a if holders[first.controller or ""] == "a" else b
        survivor = b if controller is a else a
        # That gateway is killed: no last write, no lease let go (a graceful stop lets it go at once).
        controller.app.state.rollouts.close = lambda: None  # type: ignore[attr-defined]
        controller.__exit__(None, None, None)
        # The survivor takes the lease within lease_ttl_s and carries the rollout to its end.
        survivor_holder = survivor.app.state.rollouts.holder  # type: ignore[attr-defined]
        wait(
            lambda: (r := setup.registry.rollout("intake")) is not None and r.controller == survivor_holder,
            "the survivor's lease",
            timeout_s=5,
        )
        _drive(survivor, setup, limit=3000, until=lambda: setup.registry.rollout("intake") is None)
        ended = _ended(setup)
        assert ended.state == "succeeded", ended.decisions[-1]
        assert ended.decisions[-1].actor.endswith(f"(rollout controller {survivor_holder})")
        assert setup.registry.get("intake").aliases["production"] == 2
    if controller is b:
        a.__exit__(None, None, None)


# -- shadow ----------------------------------------------------------------------------------------


def _engine_calls(s: Setup, version: int) -> list[dict[str, Any]]:
    return [b for e in s.engines for b in e.requests if b["model"].startswith(version_ref("intake", version))]


def test_shadow_leaves_the_clients_bytes_alone_and_records_both_answers_whatever_the_sampling(
    setup: Setup,
) -> None:
    traffic = {"sample_rate": 1e-9, "flush_interval_s": 0.05}  # recording on, sampling next to nothing
    with gateway(setup, traffic=traffic, rollout=_settings(min_requests=10_000)) as client:
        ready(client)
        answer = '{"intent": "refund", "order": 1234, "email": "jane.doe@example.com"}'
        _engines_answer(setup, lambda body: answer, production=answer)
        before_json = [_chat(client).content for _ in range(3)]
        before_stream = _chat(client, stream=True).content
        rollout = _start(setup, RolloutStep(shadow=100))
        _in_rollout(client, rollout)
        after = [_chat(client) for _ in range(3)]
        assert [r.content for r in after] == before_json  # byte for byte: shadow changes nothing
        assert all(r.headers["x-loraflow-model"] == "intake@v1" for r in after)
        assert _chat(client, stream=True).content == before_stream
        opted_out = client.post(
            "/v1/chat/completions",
            json={"model": "intake", "messages": CHAT},
            headers={"x-loraflow-no-log": "1"},
        )
        assert opted_out.status_code == 200
        wait(lambda: len(_engine_calls(setup, 2)) == 4, "four shadow calls")
        ids = {r.headers["x-request-id"] for r in after}
        wait(lambda: len(list(setup.registry.traffic.read("requests", adapter="intake"))) >= 4, "records")
        time.sleep(0.3)  # nothing more is coming: the opted-out request was not shadowed
    assert len(_engine_calls(setup, 2)) == 4  # three JSON, one stream: never the opted-out one
    shadow_calls = _engine_calls(setup, 2)
    assert all("stream" not in b and "stream_options" not in b for b in shadow_calls)
    records = list(setup.registry.traffic.read("requests", adapter="intake"))
    assert len(records) == 4 and ids <= {r["request_id"] for r in records}  # none sampled: shadow kept
    for record in records:
        assert record["version"] == 1 and record["shadow"]["version"] == 2 and record["sampled"] is False
        assert record["shadow"]["status"] == 200 and record["shadow"]["response"][0]["content"]
        text = json.dumps(record)
        assert "jane.doe@example.com" not in text  # redacted, the candidate's answer included
        assert "<EMAIL_ADDRESS_" in record["shadow"]["response"][0]["content"]
        assert answer_text(record) == record["response"][0]["content"]  # what a dataset reads: production's
    tallies = setup.registry.tallies(setup.registry.rollouts("intake")[-1])
    # The same words: agreed, except the stream (the fake engine streams it without its spaces).
    assert tallies["shadow"].requests == 4 and tallies["shadow"].agreed == 3


def test_shadow_calls_do_not_count_against_the_clients_rate_limit(setup: Setup) -> None:
    key, _ = create_key(setup.registry, "tight", ["intake"], limits={"rpm": 10})
    with gateway(setup, auth=True, traffic={"sample_rate": 0.0}, rollout=_settings()) as client:
        ready(client)
        headers = {"authorization": f"Bearer {key}"}
        wait(lambda: client.get("/v1/models", headers=headers).status_code == 200, "the key")
        _engines_answer(setup, lambda body: GOOD)
        rollout = _start(setup, RolloutStep(shadow=100))
        _in_rollout(client, rollout)
        answers = [
            client.post("/v1/chat/completions", json={"model": "intake", "messages": CHAT}, headers=headers)
            for _ in range(11)
        ]
        wait(lambda: len(_engine_calls(setup, 2)) == 10, "ten shadow calls")
    assert [r.status_code for r in answers] == [200] * 10 + [429]  # the shadows took none of the ten


def test_shadow_is_bounded_per_replica_dropped_under_load_and_each_drop_counted(setup: Setup) -> None:
    settings = _settings().model_copy(update={"shadow_max_in_flight": 2})
    with gateway(setup, traffic={"sample_rate": 1e-9}, rollout=settings) as client:
        ready(client)
        _engines_answer(setup, lambda body: GOOD)
        release = threading.Event()
        for engine in setup.engines:  # the candidate hangs until released; production is instant
            engine.delay = lambda body: (
                0.0 if not body["model"].startswith("intake@v2") or release.is_set() else 2.0
            )
        rollout = _start(setup, RolloutStep(shadow=100))
        _in_rollout(client, rollout)
        started = time.perf_counter()
        answers = [_chat(client) for _ in range(12)]
        elapsed = time.perf_counter() - started
        assert all(r.status_code == 200 for r in answers)
        assert elapsed < 1.5  # the clients never waited for the hanging candidate (2 s per call)
        shadow = client.app.state.gateway.shadow  # type: ignore[attr-defined]
        assert sum(shadow.in_flight.values()) == 2
        metrics = client.get("/metrics").text
        # A shadowed request's record waits for the candidate; feedback on it is taken meanwhile.
        rated = client.post(
            "/v1/feedback", json={"request_id": answers[0].headers["x-request-id"], "rating": 1}
        )
        assert rated.status_code == 200, rated.text
        release.set()
    assert 'loraflow_rollout_shadow_dropped_total{adapter="intake",reason="replica_busy"} 10.0' in metrics
    assert "loraflow_rollout_shadow_in_flight 2.0" in metrics
    assert 'loraflow_rollout_weight_percent{adapter="intake",kind="shadow"} 100.0' in metrics
    # The rollback series exists at 0 before any rollback, so Prometheus's increase() sees the first.
    assert 'loraflow_rollout_decisions_total{action="rollback",adapter="intake"} 0.0' in metrics


def test_counts_are_written_whole_late_requests_included_and_a_request_is_rated_once(setup: Setup) -> None:
    from loraflow.server.routing import Target

    with gateway(setup, traffic={"sample_rate": 0.0}, rollout=_settings()) as client:
        ready(client)
        rollouts = client.app.state.rollouts  # type: ignore[attr-defined]
        first = _start(setup, RolloutStep(canary=50), RolloutStep(canary=100))
        _in_rollout(client, first)
        late = Target("intake@v2", "x", adapter="intake", version=2, rollout=first, arm="candidate")

        def answered() -> None:
            rollouts.observe(
                late, status=200, failed=False, text=GOOD, finish_reason="stop", latency_s=0.1, ttft_s=None
            )

        for _ in range(5):
            answered()
        for _ in range(3):  # one request rated three times counts once
            rollouts.observe_feedback("intake", 2, -1, request_id="req-1")
        rollouts.flush()
        moved = setup.registry.advance_rollout("intake", expect_seq=first.seq)
        _in_rollout(client, moved)
        answered()  # a request of step 1 that finished after the rollout moved on
        rollouts.flush()
        step_one = setup.registry._step_tallies(first.id, 0)["candidate"]
        assert (step_one.requests, step_one.rated, step_one.negative) == (6, 1, 1)
        setup.registry.abort_rollout("intake")
        wait(lambda: "intake" not in client.app.state.gateway.routes.snapshot.rollouts, "the abort")  # type: ignore[attr-defined]
        rollouts.flush()
        assert rollouts.counts == {}  # an ended rollout's counts are dropped
