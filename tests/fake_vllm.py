"""A fake vLLM at the HTTP boundary (``httpx.MockTransport``) and a gateway over it, for the unit tier.

Everything above the transport is real: the app, the routing table polling a real SQLite
registry, and ``VLLMHttpEngine``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from loraflow.registry.service import Registry
from loraflow.registry.settings import RolloutSettings, ServerSettings, Settings, TrafficSettings
from loraflow.server.app import create_app
from loraflow.server.embedded import serve_in_thread
from loraflow.server.engine.cache import engine_name_of, parse_engine_name
from loraflow.server.engine.supervisor import free_port
from loraflow.server.engine.vllm_http import VLLMHttpEngine
from tests.factories import FORCED, make_adapter

BASE_ID = "tiny"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class FakeVLLM:
    """A loraflow engine (vLLM + the resolver plugin) as the gateway sees it: health, models,
    runtime LoRA by name (``/tokenize`` naming a version resolves it), completions."""

    url: str
    base: str
    loaded: set[str] = field(default_factory=set)
    up: bool = True
    fail: str | None = None  # "connect" (unreachable), "500", "html500", "empty-stream" (completions)
    break_stream_after: int | None = None  # events sent before the connection drops
    requests: list[dict[str, Any]] = field(default_factory=list)  # each completion request's body
    refuse: set[str] = field(default_factory=set)  # engine names its resolver refuses (bad digest)
    # engine name -> how many more loads of it never answer (the gateway's load timeout fires)
    stall: Counter[str] = field(default_factory=Counter)
    resolved: list[str] = field(default_factory=list)  # every load, in order
    load_delay_s: float = 0.0  # how long a load of a name it does not hold takes
    answer: Callable[[dict[str, Any]], str] | None = None  # request body -> reply; default "from URL"
    fail_if: Callable[[dict[str, Any]], bool] | None = None  # request body -> answer it with a 500
    delay: Callable[[dict[str, Any]], float] | None = None  # request body -> seconds before answering
    usage: Any = field(
        default_factory=lambda: {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    )

    def _resolve(self, name: str) -> bool:
        """What vLLM does for a name it does not hold: ask the resolver (here: any engine name)."""
        if name in self.loaded:
            return True
        if parse_engine_name(name) is None or name in self.refuse:
            return False
        self.loaded.add(name)
        self.resolved.append(name)
        return True

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if not self.up or self.fail == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            data = [{"id": self.base, "parent": None}] + [{"id": n, "parent": self.base} for n in self.loaded]
            return httpx.Response(200, json={"object": "list", "data": data})
        body = json.loads(request.content)
        if path == "/tokenize" and self.stall[body["model"]] > 0:
            self.stall[body["model"]] -= 1
            raise httpx.ReadTimeout("timed out", request=request)
        if path == "/tokenize":
            if self.load_delay_s and body["model"] not in self.loaded | {self.base}:
                await asyncio.sleep(self.load_delay_s)
            if body["model"] == self.base or self._resolve(body["model"]):
                return httpx.Response(200, json={"tokens": [1], "count": 1})
            return httpx.Response(
                404, json={"error": {"message": f"The model `{body['model']}` does not exist."}}
            )
        if path == "/v1/unload_lora_adapter":
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="ok")
        if self.delay is not None:
            await asyncio.sleep(self.delay(body))
        return self._complete(request, body)

    def _complete(self, request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        model = body["model"]
        self.requests.append(body)
        if self.fail == "500" or (self.fail_if is not None and self.fail_if(body)):
            return httpx.Response(500, json={"error": {"message": "CUDA error: an illegal memory access"}})
        if self.fail == "html500":
            return httpx.Response(500, text="<html>Internal Server Error</html>")
        if model != self.base and not self._resolve(model):
            return httpx.Response(404, json={"error": {"message": f"The model `{model}` does not exist."}})
        text = self.answer(body) if self.answer else f"from {self.url}"
        if not body.get("stream"):
            return httpx.Response(
                200,
                json={
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self.usage,
                },
            )
        events = [
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            for word in text.split(" ")
        ]
        events.append(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=self._sse(request, events)
        )

    async def _sse(self, request: httpx.Request, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        if self.fail == "empty-stream":
            return
        for i, event in enumerate(events):
            if self.break_stream_after is not None and i >= self.break_stream_after:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"


@dataclass
class Setup:
    registry: Registry
    engines: list[FakeVLLM]
    base: Path
    settings: Settings


@pytest.fixture
def gateway_setup(tmp_path: Path, base_dir: Path) -> Iterator[Setup]:
    (base_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.05))
    reg = Registry.open(settings)
    reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    reg.register("billing", make_adapter(tmp_path / "a2", seed=2), base_model=str(base_dir))
    reg.promote("support", 1, force=True, reason=FORCED)
    reg.promote("billing", 1, force=True, reason=FORCED)
    yield Setup(registry=reg, engines=[], base=base_dir, settings=settings)
    reg.close()


def wait(predicate: Any, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gateway(
    s: Setup,
    n_replicas: int = 1,
    *,
    traffic: dict[str, Any] | None = None,
    rollout: RolloutSettings | None = None,
    **server: Any,
) -> TestClient:
    s.engines = [FakeVLLM(f"http://replica-{i}", str(s.base)) for i in range(n_replicas)]
    validated = ServerSettings.model_validate(s.settings.server.model_dump() | server)
    update: dict[str, Any] = {"server": validated}
    # The thread writer unless a test asks for the process one: a writer process per gateway
    # would cost each test seconds. The process writer has tests of its own (test_traffic_writer).
    traffic = {"writer": "thread"} | (traffic or {})
    update["traffic"] = TrafficSettings.model_validate(s.settings.traffic.model_dump() | traffic)
    if rollout is not None:
        update["rollout"] = rollout
    settings = s.settings.model_copy(update=update)
    app = create_app(
        settings,
        registry=s.registry,
        engines=[VLLMHttpEngine(e.url, transport=e.transport()) for e in s.engines],
        base_model=str(s.base),
        base_model_id=BASE_ID,
    )
    return TestClient(app, raise_server_exceptions=False)


def ready(client: TestClient) -> TestClient:
    wait(lambda: client.get("/ready").status_code == 200, "/ready")
    return client


def home_order(client: TestClient, s: Setup, adapter: str, version: int) -> list[FakeVLLM]:
    """The fake engines in the order the gateway prefers them for ``adapter@v<version>`` (its home set)."""
    name = engine_name_of(s.registry.get_version(adapter, version))
    urls = [r.url for r in client.app.state.gateway.replicas.home(name)]  # type: ignore[attr-defined]
    return sorted(s.engines, key=lambda e: urls.index(e.url) if e.url in urls else len(urls))


@dataclass
class Served:
    """A gateway behind a real uvicorn server (sockets, its deadlines), over one fake engine."""

    url: str
    port: int
    app: Any


@contextmanager
def served(s: Setup, engine: FakeVLLM, **server: Any) -> Iterator[Served]:
    """The gateway of ``s`` over ``engine`` on a real uvicorn server (for what TestClient cannot
    show: connections, partial requests, clients that stop reading), with no traffic writer."""
    settings = s.settings.model_copy(
        update={
            "server": ServerSettings(poll_interval_s=0.05, **server),
            "traffic": TrafficSettings(sample_rate=0.0),  # no writer: nothing to wait for
        }
    )
    app = create_app(
        settings,
        registry=s.registry,
        engines=[VLLMHttpEngine(engine.url, transport=engine.transport())],
        base_model=str(s.base),
        base_model_id=BASE_ID,
    )
    port = free_port()
    with serve_in_thread(app, port, timeout_s=60) as url:
        yield Served(url, port, app)
