"""Per-key limits: requests and tokens per minute and requests in flight, shared by every gateway
through leases of budget slices from the registry (server/ratelimit.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loraflow.registry.errors import RateLimitedError
from loraflow.registry.keys import create_key
from loraflow.server.ratelimit import KeyLimiter
from tests.fake_vllm import Setup, gateway, ready, wait
from tests.fake_vllm import gateway_setup as gateway_setup

pytestmark = pytest.mark.unit

CHAT = [{"role": "user", "content": "hi"}]
NO_TRAFFIC = {"sample_rate": 0.0}  # no writer to start: these tests are about admission


def _chat(client: TestClient, key: str, **extra: Any) -> Any:
    return client.post(
        "/v1/chat/completions",
        json={"model": "support", "messages": CHAT, **extra},
        headers={"authorization": f"Bearer {key}"},
    )


def _serving(client: TestClient, key: str) -> None:
    ready(client)
    headers = {"authorization": f"Bearer {key}"}
    wait(lambda: client.get("/v1/models", headers=headers).status_code == 200, "keys")


def test_a_key_past_its_requests_per_minute_gets_429s_across_gateways_and_others_do_not(
    gateway_setup: Setup,
) -> None:
    flood, _ = create_key(gateway_setup.registry, "flood", ["support"], limits={"rpm": 10})
    calm, _ = create_key(gateway_setup.registry, "calm", ["support"])
    with (
        gateway(gateway_setup, auth=True, traffic=NO_TRAFFIC) as a,
        gateway(gateway_setup, auth=True, traffic=NO_TRAFFIC) as b,
    ):
        _serving(a, flood)
        _serving(b, flood)
        answers = [_chat(client, flood) for _ in range(10) for client in (a, b)]
        ok = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code == 429]
        assert len(ok) == 10 and len(refused) == 10  # the limit, summed over both gateways
        first = ok[0].headers
        assert first["x-ratelimit-limit-requests"] == "10" and first["x-ratelimit-reset-requests"].endswith(
            "s"
        )
        assert int(ok[-1].headers["x-ratelimit-remaining-requests"]) <= 1
        error = refused[0].json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused[0].headers["retry-after"]) <= 60
        assert all(_chat(a, calm).status_code == 200 for _ in range(15))  # another key is untouched
        leases = next(
            float(line.split()[-1])
            for line in a.get("/metrics").text.splitlines()
            if line.startswith("loraflow_ratelimit_leases_total")
        )
        assert 1 <= leases <= 12  # slices of 1 (5% of 10), and a flood refused from memory


def test_tokens_per_minute_charge_an_estimate_and_settle_to_the_usage(gateway_setup: Setup) -> None:
    key, _ = create_key(gateway_setup.registry, "tokens", ["support"], limits={"tpm": 1000})
    with gateway(gateway_setup, auth=True, traffic=NO_TRAFFIC) as client:
        _serving(client, key)
        too_big = _chat(client, key, max_tokens=5000)  # its estimate alone is past the limit
        assert too_big.status_code == 429 and "1000 tokens per minute" in too_big.json()["error"]["message"]
        # each asks for 300 and uses 5 (the fake engine's usage): settling frees the rest here
        answers = [_chat(client, key, max_tokens=300) for _ in range(6)]
        assert [r.status_code for r in answers] == [200] * 6
        assert answers[0].headers["x-ratelimit-limit-tokens"] == "1000"


def test_requests_in_flight_are_limited_across_gateways_and_given_back(gateway_setup: Setup) -> None:
    from loraflow.registry.settings import ServerSettings

    _, info = create_key(gateway_setup.registry, "busy", ["support"], limits={"max_concurrency": 2})
    now = [1000.0]
    settings = ServerSettings(slot_lease_ttl_s=30)
    one = KeyLimiter(settings, gateway_setup.registry, clock=lambda: now[0])
    two = KeyLimiter(settings, gateway_setup.registry, clock=lambda: now[0])

    async def scenario() -> None:
        async with one.in_flight(info), two.in_flight(info):
            with pytest.raises(RateLimitedError):  # a third, on either gateway
                async with one.in_flight(info):
                    pass
        # Both finished; the slots stay leased a moment (a steady load writes nothing) ...
        writes = one.leases
        async with one.in_flight(info):
            assert one.leases == writes
        # ... then go back at the next tidy, so the other gateway may take both.
        now[0] += 10
        await one.tidy()
        await two.tidy()
        async with two.in_flight(info), two.in_flight(info):
            assert two.slots["busy"].held == 2

    asyncio.run(scenario())
    one.close()
    two.close()


def test_no_minute_admits_more_than_the_limit_and_budget_comes_back_as_the_minute_slides(
    gateway_setup: Setup,
) -> None:
    from loraflow.registry.settings import ServerSettings

    _, info = create_key(gateway_setup.registry, "steady", ["support"], limits={"rpm": 10})
    now = [6000.0]  # the start of a 5-second bucket
    limiter = KeyLimiter(ServerSettings(), gateway_setup.registry, clock=lambda: now[0])

    async def admitted(n: int) -> int:
        ok = 0
        for _ in range(n):
            try:
                await limiter.admit(info, tokens=1)
                ok += 1
            except RateLimitedError:
                pass
        return ok

    async def scenario() -> None:
        assert await admitted(15) == 10
        for later in (5.0, 30.0, 59.9):  # still within the minute of those 10: nothing more
            now[0] = 6000.0 + later
            assert await admitted(3) == 0, later
        now[0] = 6065.0  # their bucket has left every minute that ends now
        assert await admitted(15) == 10

    asyncio.run(scenario())
    limiter.close()
