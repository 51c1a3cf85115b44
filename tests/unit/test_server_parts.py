"""Gateway parts without an engine: residency, the per-version load lock, routing, SSE rewriting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import pytest

from loraflow.registry import domain
from loraflow.registry.errors import EngineUnavailableError, NotFoundError, OverloadedError
from loraflow.server.engine.cache import engine_name_of
from loraflow.server.engine.protocol import EngineFailure
from loraflow.server.gateway import Gateway
from loraflow.server.metrics import GatewayMetrics
from loraflow.server.replicas import Replica, ReplicaSet
from loraflow.server.routing import RoutingTable, Snapshot, Target
from loraflow.server.transcript import Transcript

pytestmark = pytest.mark.unit


class FakeEngine:
    """An Engine at the true boundary: records loads and unloads; loading takes a moment."""

    def __init__(self, url: str = "http://fake") -> None:
        self.url = url
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.up = True

    async def health(self) -> bool:
        return self.up

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        yield b""

    async def load_adapter(self, name: str) -> None:
        await asyncio.sleep(0)  # a load yields to the loop: other requests run meanwhile
        self.loads.append(name)

    async def unload_adapter(self, name: str) -> None:
        self.unloads.append(name)

    async def loaded_adapters(self) -> list[str]:
        return []

    async def aclose(self) -> None:
        pass


def test_concurrent_requests_for_a_cold_version_load_it_once() -> None:
    async def run() -> FakeEngine:
        engine = FakeEngine()
        replica = Replica(engine, max_resident=4)
        await asyncio.gather(*(replica.ensure_loaded("a@v1+x", pinned=set()) for _ in range(20)))
        return engine

    assert asyncio.run(run()).loads == ["a@v1+x"]


def test_residency_is_lru_bounded_and_spares_pinned_and_in_flight() -> None:
    async def run() -> tuple[FakeEngine, Replica]:
        engine = FakeEngine()
        replica = Replica(engine, max_resident=3)
        for name in ("p", "a", "b"):
            await replica.ensure_loaded(name, pinned={"p"})
        async with replica.using("a"):
            await replica.ensure_loaded("c", pinned={"p"})  # evicts b: p is pinned, a is in use
        await replica.ensure_loaded("a", pinned={"p"})  # a is now most recent
        await replica.ensure_loaded("d", pinned={"p"})  # evicts c, the least recent unpinned
        return engine, replica

    engine, replica = asyncio.run(run())
    assert engine.unloads == ["b", "c"]
    assert list(replica.resident) == ["p", "a", "d"]


def test_more_pinned_versions_than_fit_evict_the_least_recent_idle_one_and_count_it() -> None:
    async def run() -> tuple[FakeEngine, Replica]:
        engine = FakeEngine()
        replica = Replica(engine, max_resident=2)
        pinned = {"p", "q", "r"}
        for name in ("p", "q"):
            await replica.ensure_loaded(name, pinned=pinned)
        async with replica.using("p"):  # p is older, but in use: q goes
            await replica.ensure_loaded("r", pinned=pinned)
        return engine, replica

    engine, replica = asyncio.run(run())
    assert engine.unloads == ["q"]
    assert list(replica.resident) == ["p", "r"] and replica.pinned_evictions == 1


def test_a_version_no_alias_points_at_never_unloads_a_pinned_one() -> None:
    async def run() -> None:
        replica = Replica(FakeEngine(), max_resident=1)
        await replica.ensure_loaded("p", pinned={"p"})
        await replica.ensure_loaded("q", pinned={"p"})

    with pytest.raises(OverloadedError, match="aliased versions kept for their traffic") as info:
        asyncio.run(run())
    assert "http://fake" not in info.value.message  # a client never reads a replica's URL


def test_every_resident_version_in_use_is_overload_for_now() -> None:
    async def run() -> None:
        replica = Replica(FakeEngine(), max_resident=1)
        await replica.ensure_loaded("p", pinned={"p", "q"})
        async with replica.using("p"):
            await replica.ensure_loaded("q", pinned={"p", "q"})

    with pytest.raises(OverloadedError, match="all are in use; retry shortly"):
        asyncio.run(run())


class SlowUnloadEngine(FakeEngine):
    """Holds exactly what was loaded and not yet unloaded; an unload waits for the test's go."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: set[str] = set()
        self.unloading: set[str] = set()
        self.unload_started = asyncio.Event()
        self.finish_unloads = asyncio.Event()

    async def load_adapter(self, name: str) -> None:
        await asyncio.sleep(0)
        self.loaded.add(name)

    async def unload_adapter(self, name: str) -> None:
        self.unloading.add(name)
        self.unload_started.set()
        await self.finish_unloads.wait()
        self.loaded.discard(name)
        self.unloading.discard(name)


def test_a_version_being_unloaded_is_reloaded_not_sent_to_the_engine() -> None:
    """The eviction race: while `a` is being unloaded to make room for `b`, a request for `a`
    must wait and load it again, not be sent to an engine that is dropping it."""

    async def run() -> tuple[SlowUnloadEngine, Replica, list[tuple[bool, bool]]]:
        engine = SlowUnloadEngine()
        replica = Replica(engine, max_resident=2)
        for name in ("a", "c"):
            await replica.ensure_loaded(name, pinned=set())
        loading_b = asyncio.create_task(replica.ensure_loaded("b", pinned=set()))
        await engine.unload_started.wait()  # b's load is evicting a, the least recently used
        request_a = asyncio.create_task(replica.ensure_loaded("a", pinned=set()))
        when_ready: list[tuple[bool, bool]] = []  # what a request for `a` finds when it is sent
        request_a.add_done_callback(
            lambda _: when_ready.append(("a" in engine.loaded, "a" in engine.unloading))
        )
        for _ in range(20):  # request_a runs until it waits (no I/O: a few turns of the loop)
            await asyncio.sleep(0)
        assert when_ready == []  # it waits while a is being dropped
        engine.finish_unloads.set()  # the engine drops a
        await asyncio.gather(request_a, loading_b)
        return engine, replica, when_ready

    engine, replica, when_ready = asyncio.run(run())
    assert when_ready == [(True, False)]  # loaded, and not being dropped
    assert set(replica.resident) == engine.loaded == {"a", "b"}


def test_a_failed_unload_keeps_the_version_resident() -> None:
    """If the engine did not confirm the unload, it may still hold the version: the replica must
    not later ask it to load what it has."""

    class FailingUnload(FakeEngine):
        async def unload_adapter(self, name: str) -> None:
            raise EngineFailure(self.url, "HTTP 500")

    async def run() -> Replica:
        replica = Replica(FailingUnload(), max_resident=1)
        await replica.ensure_loaded("a", pinned=set())
        with pytest.raises(EngineFailure):
            await replica.ensure_loaded("b", pinned=set())
        return replica

    replica = asyncio.run(run())
    assert list(replica.resident) == ["a"]


def test_concurrent_loads_never_exceed_the_replica_capacity() -> None:
    async def run() -> tuple[SlowUnloadEngine, Replica, list[BaseException | None]]:
        engine = SlowUnloadEngine()
        engine.finish_unloads.set()
        replica = Replica(engine, max_resident=2)
        results = await asyncio.gather(
            *(replica.ensure_loaded(n, pinned=set()) for n in ("a", "b", "c")), return_exceptions=True
        )
        return engine, replica, results

    engine, replica, results = asyncio.run(run())
    assert set(replica.resident) == engine.loaded and len(engine.loaded) <= 2
    assert [type(r) for r in results].count(OverloadedError) == 3 - len(engine.loaded)


def test_pick_prefers_resident_then_healthy() -> None:
    one, two = FakeEngine("http://one"), FakeEngine("http://two")
    replicas = ReplicaSet([one, two], max_resident=4)
    with pytest.raises(EngineUnavailableError):
        replicas.pick(None)
    asyncio.run(replicas.check_health())
    replicas.replicas[1].resident["x"] = None
    assert replicas.pick("x").url == "http://two"
    two.up = False
    asyncio.run(replicas.check_health())
    assert replicas.pick("x").url == "http://one"


def _version(name: str, n: int, status: str = "registered") -> domain.VersionInfo:
    return domain.VersionInfo(
        adapter=name,
        version=n,
        digest=f"{n:064d}",
        rank=8,
        alpha=16,
        target_modules=["q_proj"],
        size_bytes=1,
        dataset=None,
        training_config=None,
        metrics=None,
        eval_report=None,
        chat_template_hash=None,
        status=status,  # type: ignore[arg-type]
        created_by="t",
        created_at=datetime.now(UTC),
    )


def _routes() -> RoutingTable:
    versions = [_version("support", 1), _version("support", 2), _version("support", 3, "archived")]
    adapter = domain.AdapterInfo(
        name="support",
        base_model="b",
        base_model_fingerprint="f",
        task=None,
        created_by="t",
        created_at=datetime.now(UTC),
        aliases={"production": 1, "staging": 2},
        versions=versions,
    )
    routes = RoutingTable(
        registry=None,
        replicas=ReplicaSet([], max_resident=1),  # type: ignore[arg-type]
        base_model_id="tiny",
        engine_base_name="/models/tiny",
        poll_interval_s=1,
    )
    routes.snapshot = Snapshot(
        revision=1, adapters={"support": adapter}, versions={v.ref: v for v in versions}
    )
    return routes


@pytest.mark.parametrize(
    ("model", "public"),
    [
        ("support", "support@v1"),
        ("support:staging", "support@v2"),
        ("support@v2", "support@v2"),
        ("tiny", "tiny"),
        ("/models/tiny", "tiny"),
    ],
)
def test_resolve(model: str, public: str) -> None:
    target = _routes().resolve(model)
    assert target.public == public
    if target.adapter:
        assert target.engine_model == engine_name_of(_routes().snapshot.versions[public])
        assert target.engine_model.startswith(public + "+")
    else:
        assert target.engine_model == "/models/tiny"


@pytest.mark.parametrize("model", ["ghost", "support@v3", "support@v9", "support:canary", "bad name!"])
def test_resolve_unknown_or_archived_is_404(model: str) -> None:
    with pytest.raises(NotFoundError) as info:
        _routes().resolve(model)
    assert info.value.param == "model"


def test_sse_rewrite_names_the_version_and_hides_injected_usage() -> None:
    from loraflow.registry.settings import ServerSettings, TrafficSettings

    routes = _routes()
    gw = Gateway(
        ServerSettings(), routes, routes.replicas, GatewayMetrics(routes), traffic_settings=TrafficSettings()
    )
    target = Target(public="support@v1", engine_model="support@v1+abc", adapter="support", version=1)
    labels = ("support", "v1")
    chunk = b'data: {"model": "support@v1+abc", "choices": [{"text": "hi"}]}'
    assert (
        gw._rewrite(chunk, target, labels, False, transcript := Transcript())
        == b'data: {"model":"support@v1","choices":[{"text":"hi"}]}'
    )
    usage_only = b'data: {"model": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}'
    assert gw._rewrite(usage_only, target, labels, False, transcript) is None
    assert b'"usage"' in (gw._rewrite(usage_only, target, labels, True, Transcript()) or b"")
    # what the relay assembled for the traffic record, with no extra pass over the engine
    assert transcript.text == "hi" and transcript.usage == {"prompt_tokens": 3, "completion_tokens": 5}
    assert gw._rewrite(b"data: [DONE]", target, labels, False, Transcript()) == b"data: [DONE]"


def test_chat_template_mismatch_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    routes = _routes()
    snap = routes.snapshot
    trained_with = {"support@v1": "a" * 64, "support@v2": "b" * 64}
    versions = {
        ref: v.model_copy(update={"chat_template_hash": trained_with.get(ref)})
        for ref, v in snap.versions.items()
    }
    routes.base_template_hash = "a" * 64
    with caplog.at_level("WARNING", logger="loraflow.routing"):
        routes._warn_template_mismatches(Snapshot(revision=2, adapters=snap.adapters, versions=versions))
    assert [routes.template_matches(versions[r]) for r in ("support@v1", "support@v2", "support@v3")] == [
        True,
        False,
        None,
    ]
    assert "support@v2 was trained with a different chat template" in caplog.text
    assert "support@v1" not in caplog.text


def test_an_adapter_load_the_engine_never_answers_is_abandoned_after_its_own_timeout() -> None:
    """A socket that accepts and never answers: the load gives up at load_timeout_s (not the much
    longer engine_timeout_s) as an EngineFailure, which the preload logs and the request path retries."""
    from loraflow.server.engine.vllm_http import VLLMHttpEngine

    async def main() -> float:
        done = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await done.wait()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        engine = VLLMHttpEngine(f"http://127.0.0.1:{port}", timeout_s=120, load_timeout_s=0.5)
        started = asyncio.get_running_loop().time()
        try:
            with pytest.raises(EngineFailure) as info:
                await engine.load_adapter("support@v1+" + "0" * 64)
            assert "loading support@v1" in info.value.detail
            return asyncio.get_running_loop().time() - started
        finally:
            await engine.aclose()
            done.set()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) < 5
