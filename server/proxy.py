"""The serving path shared by /v1/chat/completions and /v1/completions.

auth -> resolve ``model`` to an immutable version -> admission (429) -> pick a
replica -> make sure the version is resident -> forward with ``model=NAME@vN``
-> rewrite the response's ``model`` to ``NAME@vN`` and add the
``x-loraflow-model`` header. Streams are passed through event by event, as
they arrive.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraflow.registry.errors import InvalidArgumentError, LoraflowError, OverloadedError
from loraflow.registry.settings import ServerSettings
from loraflow.server.auth import authenticate, authorize
from loraflow.server.engine.vllm_http import EngineRequestError
from loraflow.server.errors import from_exception
from loraflow.server.metrics import GatewayMetrics
from loraflow.server.replicas import ReplicaSet
from loraflow.server.routing import Router, Target

MODEL_HEADER = "x-loraflow-model"


class Gateway:
    def __init__(
        self, settings: ServerSettings, router: Router, replicas: ReplicaSet, metrics: GatewayMetrics
    ):
        self.settings = settings
        self.router = router
        self.replicas = replicas
        self.metrics = metrics
        self.in_flight = 0

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        if self.in_flight >= self.settings.max_concurrency:
            raise OverloadedError(
                f"the gateway is at its limit of {self.settings.max_concurrency} requests "
                "in flight; retry shortly"
            )
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"the request body is not valid JSON ({exc})", param="body") from exc
        if not isinstance(body, dict):
            raise InvalidArgumentError("the request body must be a JSON object", param="body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError("'model' is required and must be a string", param="model")
        return body

    async def handle(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        labels = ("-", "-")
        try:
            body = await self._body(request)
            key = (
                authenticate(request.headers.get("authorization"), self.router.snapshot)
                if self.settings.auth
                else None
            )
            target = self.router.resolve(body["model"])
            labels = (target.adapter or "-", f"v{target.version}" if target.version else "-")
            if key is not None:
                authorize(key, target.adapter)
            response = await self._serve(body, target, path, labels, started)
        except LoraflowError as exc:
            response = from_exception(exc, retry_after_s=self.settings.retry_after_s)
            self.metrics.errors.labels(*labels, exc.code.value).inc()
        self.metrics.requests.labels(*labels, path, str(response.status_code)).inc()
        return response

    async def _serve(
        self, body: dict[str, Any], target: Target, path: str, labels: tuple[str, str], started: float
    ) -> Response:
        stack = AsyncExitStack()
        await stack.enter_async_context(self._admitted())
        try:
            adapter_name = target.engine_model if target.adapter else None
            replica = self.replicas.pick(adapter_name)
            await stack.enter_async_context(replica.using(adapter_name))
            await self.router.ensure_loaded(replica, target)
            body = body | {"model": target.engine_model}
            headers = {MODEL_HEADER: target.public}
            if not body.get("stream"):
                status, data = await replica.engine.post_json(path, body)
                if status != 200:
                    raise EngineRequestError(status, data)
                data["model"] = target.public
                self._count_usage(data.get("usage"), labels)
                self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
                await stack.aclose()
                return JSONResponse(data, headers=headers)
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            chunks = replica.engine.stream(path, body).__aiter__()
            first = await chunks.__anext__()  # engine errors surface here, as a proper HTTP error
        except BaseException:
            await stack.aclose()
            raise
        return StreamingResponse(
            self._relay(first, chunks, stack, target, labels, started, wants_usage),
            media_type="text/event-stream",
            headers=headers,
        )

    async def _relay(
        self,
        first: bytes,
        chunks: AsyncIterator[bytes],
        stack: AsyncExitStack,
        target: Target,
        labels: tuple[str, str],
        started: float,
        wants_usage: bool,
    ) -> AsyncIterator[bytes]:
        buffer, first_token = b"", True
        try:
            chunk: bytes | None = first
            while chunk is not None:
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    out = self._rewrite(event, target, labels, wants_usage)
                    if out is None:
                        continue
                    if first_token:
                        self.metrics.ttft.labels(*labels).observe(time.perf_counter() - started)
                        first_token = False
                    yield out + b"\n\n"
                chunk = await anext(chunks, None)
            if buffer.strip():
                yield buffer
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
        finally:
            await stack.aclose()

    def _rewrite(
        self, event: bytes, target: Target, labels: tuple[str, str], wants_usage: bool
    ) -> bytes | None:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            data = json.loads(event[6:])
        except json.JSONDecodeError:
            return event
        if isinstance(data, dict):
            data["model"] = target.public
            if data.get("usage"):
                self._count_usage(data["usage"], labels)
                if not wants_usage:
                    if not data.get("choices"):
                        return None  # the usage-only chunk we asked for on our own behalf
                    data["usage"] = None
        return b"data: " + json.dumps(data, separators=(",", ":")).encode()

    def _count_usage(self, usage: dict[str, Any] | None, labels: tuple[str, str]) -> None:
        if usage:
            self.metrics.prompt_tokens.labels(*labels).inc(usage.get("prompt_tokens") or 0)
            self.metrics.completion_tokens.labels(*labels).inc(usage.get("completion_tokens") or 0)
