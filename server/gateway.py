"""The serving path shared by /v1/chat/completions and /v1/completions.

auth (the key, then whether it may call ``model``: README, "Keys and scopes") -> resolve
``model`` to an immutable version (a rollout's split for a bare ``NAME``) -> admission (429) -> pick a
replica -> make sure the version is resident -> forward with the engine's name
for the version -> rewrite the response's ``model`` to ``NAME@vN`` and add the
``x-loraflow-model`` header. Streams are passed through event by event, as
they arrive.

Failures, by when they happen:

- before the first byte reaches the client, a replica's failure
  (:class:`EngineFailure`) is retried once on another healthy replica; if none
  is left, the client gets 503 with ``Retry-After``. A replica that answers 404
  for a version we thought it held no longer has it and its resolver could not
  fetch it again (an engine that merely restarted resolves it by itself): it is
  forgotten there and the one retry loads it again, or fails as a 503.
- after the first byte of a stream, the status line is gone, so the error is one
  more SSE event in OpenAI's error shape, followed by ``data: [DONE]``.
- anything unexpected is a 500 in OpenAI's shape; the traceback goes to the log.
- a client that closes the connection before its body has arrived is counted as
  nginx's 499 and logged in one line: the client's doing, not a gateway error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from loraflow.registry import domain
from loraflow.registry.errors import (
    EngineUnavailableError,
    InvalidArgumentError,
    LoraflowError,
    OverloadedError,
)
from loraflow.registry.settings import ServerSettings, TrafficSettings
from loraflow.registry.traffic import new_request_id
from loraflow.server.auth import authenticate, authorize_model
from loraflow.server.body import json_object, read_capped
from loraflow.server.engine.protocol import EngineDown, EngineFailure, EngineRequestError
from loraflow.server.errors import (
    CLIENT_CLOSED_REQUEST,
    INTERNAL_ERROR_CODE,
    client_closed,
    error_response,
    from_exception,
    sse_error,
)
from loraflow.server.http import TimedStreamingResponse
from loraflow.server.metrics import GatewayMetrics
from loraflow.server.ratelimit import Admission, KeyLimiter
from loraflow.server.replicas import Replica, ReplicaSet
from loraflow.server.rollouts import Rollouts
from loraflow.server.routing import RoutingTable, Target
from loraflow.server.shadow import Shadow
from loraflow.server.traffic.live import LiveDrift
from loraflow.server.traffic.recorder import Exchange, TrafficRecorder
from loraflow.server.transcript import Transcript

MODEL_HEADER = "x-loraflow-model"
REQUEST_ID_HEADER = "x-request-id"
_RECORDED_FIELDS = (
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "n",
    "seed",
    "response_format",
    "tools",
    "tool_choice",
)
log = logging.getLogger("loraflow.gateway")


def split_key(body: dict[str, Any], key: domain.ApiKeyInfo | None, request_id: str) -> str:
    """What a rollout's split hashes: the request's ``user`` (an end user stays on one side), else
    the key and the request id (each request on its own)."""
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user\x00{user}"
    return f"request\x00{key.name if key else ''}\x00{request_id}"


@dataclass
class _Call:
    """One request, from its arrival to its last byte: what recording and drift need."""

    request_id: str
    at: datetime
    started: float
    endpoint: str
    record: bool  # False: the client opted out
    body: dict[str, Any] = field(default_factory=dict)
    body_bytes: int = 0
    target: Target | None = None
    key: domain.ApiKeyInfo | None = None
    admission: Admission | None = None  # what the key's limits charged it
    transcript: Transcript = field(default_factory=Transcript)
    ttft_s: float | None = None  # a stream's first token, seconds after arrival
    split_key: str = ""  # what a rollout's split and shadow share hash (see split_key())


@dataclass
class _Stream:
    """A stream whose first chunk has arrived: from here on, failures are SSE events."""

    replica: Replica
    first: bytes
    chunks: AsyncIterator[bytes]
    attempt: AsyncExitStack  # the replica's in-flight count for the version; closes ``chunks``


class Gateway:
    def __init__(
        self,
        settings: ServerSettings,
        routes: RoutingTable,
        replicas: ReplicaSet,
        metrics: GatewayMetrics,
        *,
        traffic_settings: TrafficSettings,
        recorder: TrafficRecorder | None = None,
        live: LiveDrift | None = None,
        limiter: KeyLimiter | None = None,
        rollouts: Rollouts | None = None,
        shadow: Shadow | None = None,
    ):
        self.settings = settings
        self.routes = routes
        self.replicas = replicas
        self.metrics = metrics
        self.traffic_settings = traffic_settings
        self.recorder = recorder
        self.live = live
        self.limiter = limiter
        self.rollouts = rollouts
        self.shadow = shadow
        self.in_flight = 0
        self._extras = frozenset(settings.engine_extra_fields)

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

    async def _body(self, request: Request, fields: frozenset[str], call: _Call) -> dict[str, Any]:
        """The body (at most ``server.max_body_bytes``), checked where the gateway reads it
        (``model``, ``stream``, ``stream_options``, the caps) and for fields nobody defined,
        which OpenAI's API refuses too; the engine validates the values of the rest."""
        raw = await read_capped(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
        call.body_bytes = len(raw)
        body = json_object(raw)
        unknown = sorted(set(body) - fields - self._extras)
        if unknown:
            raise InvalidArgumentError(
                f"unrecognized request argument supplied: {unknown[0][:80]!r} (a vLLM extra is forwarded "
                "only when server.engine_extra_fields lists it)",
                param=unknown[0][:80],
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError("'model' is required and must be a string", param="model")
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise InvalidArgumentError("'stream' must be true or false", param="stream")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise InvalidArgumentError("'stream_options' must be an object", param="stream_options")
        s = self.settings
        for name, cap, setting in (
            ("n", s.max_n, "server.max_n"),
            ("best_of", s.max_best_of, "server.max_best_of"),
            ("max_tokens", s.max_tokens, "server.max_tokens"),
            ("max_completion_tokens", s.max_tokens, "server.max_tokens"),
        ):
            value = body.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
                raise InvalidArgumentError(
                    f"'{name}' is {value:g}; this gateway allows at most {cap} ({setting})", param=name
                )
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > s.max_messages:
            raise InvalidArgumentError(
                f"{len(messages)} messages; this gateway allows at most {s.max_messages} "
                "(server.max_messages)",
                param="messages",
            )
        return body

    async def handle(self, request: Request, path: str, fields: frozenset[str]) -> Response:
        """Serve one request to ``path``, whose body may hold ``fields`` (OpenAI's) and the vLLM
        extras ``server.engine_extra_fields`` allows."""
        started = time.perf_counter()
        now = datetime.now(UTC)
        opt_out = request.headers.get(self.traffic_settings.opt_out_header, "").strip().lower()
        call = _Call(
            request_id=new_request_id(now),
            at=now,
            started=started,
            endpoint=path,
            record=opt_out not in ("1", "true", "yes"),
        )
        labels = ("-", "-")
        error: str | None = None
        try:
            snapshot = self.routes.loaded()
            key = call.key = (
                authenticate(request.headers.get("authorization"), snapshot) if self.settings.auth else None
            )
            # After the key: no key, 401, whatever the body.
            body = call.body = await self._body(request, fields, call)
            if key is not None:  # before resolving: an unknown name and a forbidden one look alike
                authorize_model(key, body["model"], self.routes.base_names)
            call.split_key = split_key(body, key, call.request_id)
            target = self.routes.resolve(body["model"], split_key=call.split_key)
            labels = (target.adapter or "-", f"v{target.version}" if target.version else "-")
            if key is not None and self.limiter is not None:
                call.admission = await self.limiter.admit(
                    key, self.limiter.estimate_tokens(body, call.body_bytes)
                )
            call.target = target  # authorized and within its limits: from here on, it is recorded
            response = await self._serve(body, target, path, labels, started, call)
        except LoraflowError as exc:
            response = from_exception(exc, retry_after_s=self.settings.retry_after_s)
            self.metrics.errors.labels(*labels, exc.code.value).inc()
            error = exc.code.value
        except ClientDisconnect:
            response = client_closed(request)  # counted as a 499 below: the client's doing, not ours
        except Exception:
            log.exception("unexpected error serving %s", path)
            response = error_response(500, "internal error in the gateway", code=INTERNAL_ERROR_CODE)
            self.metrics.errors.labels(*labels, INTERNAL_ERROR_CODE).inc()
            error = INTERNAL_ERROR_CODE
        self.metrics.requests.labels(*labels, path, str(response.status_code)).inc()
        response.headers[REQUEST_ID_HEADER] = call.request_id
        if call.admission is not None:
            response.headers.update(call.admission.headers)
        if not isinstance(response, StreamingResponse):  # a stream is finished by its relay
            self._finish(call, response.status_code, error)
        return response

    def _finish(self, call: _Call, status: int, error: str | None) -> None:
        """The request is over: settle the key's tokens, feed the drift window and the rollout's
        counts, and offer the exchange to the recorder, or to the shadow when the rollout shadows
        it (O(1), never waits)."""
        usage = call.transcript.usage
        if call.admission is not None and self.limiter is not None:
            used = (usage or {}).get("prompt_tokens", 0) + (usage or {}).get("completion_tokens", 0)
            self.limiter.settle(call.admission, used if usage else None)
        target = call.target
        if target is None or target.adapter is None or target.version is None:
            return  # the base model, or never got as far as a version
        if self.rollouts is not None and target.rollout is not None:
            self.rollouts.observe(
                target,
                status=status,
                failed=error is not None and status < 400,
                text=call.transcript.text,
                finish_reason=call.transcript.finish_reason,
                latency_s=time.perf_counter() - call.started,
                ttft_s=call.ttft_s,
            )
        served = status == 200 and error is None
        if served and self.live is not None:
            self.live.observe(target.adapter, target.version, call.transcript.text, call.transcript.usage)
        if not call.record:
            return  # opted out: neither recorded nor shadowed
        exchange = (
            Exchange(
                request_id=call.request_id,
                at=call.at,
                adapter=target.adapter,
                version=target.version,
                endpoint=call.endpoint,
                request={k: call.body[k] for k in _RECORDED_FIELDS if k in call.body},
                status=status,
                latency_s=time.perf_counter() - call.started,
                stream=bool(call.body.get("stream")),
                response=[call.transcript.choices[i] for i in sorted(call.transcript.choices)],
                usage={k: int(v) for k, v in usage.items() if isinstance(v, int)} if usage else None,
                error=error,
                key=call.key.name if call.key else None,
                size_bytes=call.body_bytes + sum(len(c["content"]) for c in call.transcript.choices.values()),
            )
            if self.recorder is not None
            else None
        )
        shadow_target = self.routes.shadow_of(target, call.split_key) if served and self.shadow else None
        if (
            shadow_target is not None
            and self.shadow is not None
            and self.shadow.offer(
                shadow_target,
                path=call.endpoint,
                body=call.body,
                production=call.transcript,
                exchange=exchange,
            )
        ):
            return  # recorded with the candidate's answer beside production's, once it arrives
        if exchange is not None and self.recorder is not None:
            self.recorder.offer(exchange)

    async def _serve(
        self,
        body: dict[str, Any],
        target: Target,
        path: str,
        labels: tuple[str, str],
        started: float,
        call: _Call,
    ) -> Response:
        # The key's slot, admission, then the replica's in-flight count; a stream's relay owns them.
        stack = AsyncExitStack()
        try:
            if call.key is not None and self.limiter is not None:
                await stack.enter_async_context(self.limiter.in_flight(call.key))
            await stack.enter_async_context(self._admitted())
            adapter_name = target.engine_model if target.adapter else None
            body = body | {"model": target.engine_model}
            wants_usage = False
            if body.get("stream"):
                # We ask for usage on our own behalf (to count tokens) and hide it unless asked.
                wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            exclude: list[Replica] = []
            failure: EngineFailure | None = None
            retried = False
            while True:
                replica = self._pick(adapter_name, exclude, failure)
                try:
                    response = await self._attempt(
                        replica, adapter_name, body, target, path, labels, started, call.transcript
                    )
                    break
                except EngineFailure as exc:
                    self.metrics.engine_failures.labels(replica.url, "before_first_byte").inc()
                    if isinstance(exc, EngineDown):
                        replica.healthy = False  # until the next health check says otherwise
                    if retried:
                        log.warning("%s; the retry failed too", exc.detail)
                        raise
                    log.warning("%s; retrying once on another replica", exc.detail)
                    exclude.append(replica)
                    failure = exc
                except EngineRequestError as exc:
                    if exc.status != 404 or adapter_name is None or retried:
                        raise
                    # The engine does not hold a version we thought it did, and its resolver did not
                    # get it back. Forget it there; the one retry loads it again, or is a 503.
                    replica.forget(adapter_name)
                    self.metrics.engine_failures.labels(replica.url, "lost_adapter").inc()
                retried = True
        except BaseException:
            await stack.aclose()
            raise
        if isinstance(response, _Stream):
            await stack.enter_async_context(response.attempt)
            return TimedStreamingResponse(
                self._relay(response, stack, target, labels, started, wants_usage, call),
                media_type="text/event-stream",
                headers={MODEL_HEADER: target.public},
                send_timeout_s=self.settings.send_timeout_s,
            )
        await stack.aclose()
        return response

    def _pick(
        self, adapter_name: str | None, exclude: list[Replica], failure: EngineFailure | None
    ) -> Replica:
        try:
            return self.replicas.pick(adapter_name, exclude=exclude)
        except EngineUnavailableError:
            if failure is not None:
                raise EngineUnavailableError(
                    f"{failure.message}, and no other replica is available to retry on; retry shortly"
                ) from failure
            raise

    async def _attempt(
        self,
        replica: Replica,
        adapter_name: str | None,
        body: dict[str, Any],
        target: Target,
        path: str,
        labels: tuple[str, str],
        started: float,
        transcript: Transcript,
    ) -> Response | _Stream:
        """One try on one replica. Any failure here happens before a byte reaches the client."""
        attempt = AsyncExitStack()
        await attempt.enter_async_context(replica.using(adapter_name))
        try:
            await self.routes.ensure_loaded(replica, target)
            if not body.get("stream"):
                data = await replica.engine.post_json(path, body)
                data["model"] = target.public
                transcript.add_response(data)
                self._count_usage(data.get("usage"), labels)
                self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
                await attempt.aclose()
                return JSONResponse(data, headers={MODEL_HEADER: target.public})
            chunks = replica.engine.stream(path, body)
            attempt.push_async_callback(chunks.aclose)  # a client gone mid-stream closes the engine's
            first = await chunks.__anext__()
        except StopAsyncIteration:
            await attempt.aclose()
            raise EngineFailure(replica.url, "the stream ended before its first event") from None
        except BaseException:
            await attempt.aclose()
            raise
        return _Stream(replica=replica, first=first, chunks=chunks, attempt=attempt)

    async def _relay(
        self,
        opened: _Stream,
        stack: AsyncExitStack,
        target: Target,
        labels: tuple[str, str],
        started: float,
        wants_usage: bool,
        call: _Call,
    ) -> AsyncIterator[bytes]:
        replica, chunks = opened.replica, opened.chunks
        buffer, first_token = b"", True
        ended = False  # the stream ran to its end (or to an error event): not a client gone mid-way
        error: str | None = None
        try:
            chunk: bytes | None = opened.first
            while chunk is not None:
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    out = self._rewrite(event, target, labels, wants_usage, call.transcript)
                    if out is None:
                        continue
                    if first_token:
                        call.ttft_s = time.perf_counter() - started
                        self.metrics.ttft.labels(*labels).observe(call.ttft_s)
                        first_token = False
                    yield out + b"\n\n"
                chunk = await anext(chunks, None)
            if buffer.strip():
                yield buffer
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
            ended = True
        except Exception as exc:
            # The status line has gone out; the error becomes the stream's last event.
            if isinstance(exc, LoraflowError):
                code = exc.code.value
                log.warning("stream from %s broke: %s", replica.url, getattr(exc, "detail", exc.message))
                message = f"the engine failed mid-stream: {exc.message}"
                if isinstance(exc, EngineDown):
                    replica.healthy = False  # until the next health check says otherwise
            else:
                code = INTERNAL_ERROR_CODE
                log.exception("unexpected error relaying a stream from %s", replica.url)
                message = "internal error in the gateway"
            if isinstance(exc, EngineFailure):
                self.metrics.engine_failures.labels(replica.url, "mid_stream").inc()
            self.metrics.errors.labels(*labels, code).inc()
            error = code
            yield sse_error(message, code=code)
            yield b"data: [DONE]\n\n"
        finally:
            await stack.aclose()
            # A client that left mid-stream got part of an answer: nginx's 499, so that part is
            # neither counted as the version's answer nor shadowed, nor recorded as a good one.
            self._finish(call, 200 if ended or error else CLIENT_CLOSED_REQUEST, error)

    def _rewrite(
        self, event: bytes, target: Target, labels: tuple[str, str], wants_usage: bool, transcript: Transcript
    ) -> bytes | None:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            data = json.loads(event[6:])
        except json.JSONDecodeError:
            return event
        if isinstance(data, dict):
            data["model"] = target.public
            transcript.add_chunk(data)
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
