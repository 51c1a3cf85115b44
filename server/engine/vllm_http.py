"""An Engine backed by vLLM's OpenAI server over HTTP (its private, admin-enabled port)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol

import httpx

from loraflow.server.engine.http1 import (
    ConnectFailed,
    ConnectionLost,
    Http1Pool,
    HttpError,
    ProtocolError,
    ReadTimeout,
)
from loraflow.server.engine.protocol import AdapterLoadFailure, EngineDown, EngineFailure, EngineRequestError


def _parse_error(status: int, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        return data
    return {"error": {"message": raw[:500].decode(errors="replace") or f"HTTP {status}"}}


class _Answer(Protocol):
    status: int

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None: ...


class _Poster(Protocol):
    """What completion calls go through: :class:`Http1Pool`, or httpx over an injected transport."""

    async def post(self, path: str, body: bytes) -> _Answer: ...

    async def aclose(self) -> None: ...


class _HttpxAnswer:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise _from_httpx(exc) from exc

    async def read(self) -> bytes:
        try:
            return await self._response.aread()  # MockTransport answers may hold their body already
        except httpx.HTTPError as exc:
            raise _from_httpx(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class _HttpxPoster:
    """Completion calls over an httpx transport: the unit tier's ``httpx.MockTransport``."""

    def __init__(self, url: str, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        self._url = url
        self._transport = transport
        self._timeout = timeout.as_dict()

    async def post(self, path: str, body: bytes) -> _Answer:
        request = httpx.Request(
            "POST", self._url + path, content=body, headers=_JSON, extensions={"timeout": self._timeout}
        )
        try:
            return _HttpxAnswer(await self._transport.handle_async_request(request))
        except httpx.HTTPError as exc:
            raise _from_httpx(exc) from exc

    async def aclose(self) -> None:
        pass  # the transport is the caller's, closed with the engine's admin client


def _from_httpx(exc: httpx.HTTPError) -> HttpError:
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return ConnectFailed(str(exc))
    if isinstance(exc, httpx.TimeoutException):
        return ReadTimeout(str(exc))
    if isinstance(exc, httpx.DecodingError):
        return ProtocolError(str(exc))
    return ConnectionLost(f"{type(exc).__name__}: {exc}")


_JSON = {"content-type": "application/json"}


class VLLMHttpEngine:
    """A vLLM replica over HTTP. Completion calls go through :class:`Http1Pool` (the hot path;
    see its module for why), admin calls through an httpx client. With ``transport`` (tests),
    both go through that httpx transport."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 120.0,
        load_timeout_s: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        self.load_timeout_s = load_timeout_s
        timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=transport)
        self._completions: _Poster = (
            _HttpxPoster(self.url, transport, timeout)
            if transport is not None
            else Http1Pool(self.url, connect_timeout_s=5.0, read_timeout_s=timeout_s)
        )

    def __repr__(self) -> str:
        return f"VLLMHttpEngine({self.url})"

    def _transport_error(self, exc: httpx.HTTPError | HttpError, doing: str) -> EngineFailure:
        what = f"{type(exc).__name__} while {doing}: {exc}"
        slow = isinstance(exc, ReadTimeout | ProtocolError) or (
            isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout)
        )
        if slow:
            return EngineFailure(self.url, what)  # slow or garbled, not necessarily gone
        return EngineDown(self.url, what)

    def _status_error(self, status: int, raw: bytes) -> EngineRequestError | EngineFailure:
        data = _parse_error(status, raw)
        if status >= 500:
            return EngineFailure(self.url, f"HTTP {status}: {EngineRequestError(status, data).message}")
        return EngineRequestError(status, data)

    async def health(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _post(self, path: str, body: dict[str, Any]) -> _Answer:
        return await self._completions.post(path, json.dumps(body, separators=(",", ":")).encode())

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await self._post(path, body)
            try:
                raw = await answer.read()
            finally:
                await answer.aclose()
        except HttpError as exc:
            raise self._transport_error(exc, f"calling {path}") from exc
        if answer.status != 200:
            raise self._status_error(answer.status, raw)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineFailure(self.url, f"{path} answered 200 with a body that is not JSON") from exc
        if not isinstance(data, dict):
            raise EngineFailure(self.url, f"{path} answered 200 with JSON that is not an object")
        return data

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        try:
            answer = await self._post(path, body)
            try:
                if answer.status != 200:
                    raise self._status_error(answer.status, await answer.read())
                async for chunk in answer.chunks():
                    yield chunk
            finally:
                await answer.aclose()
        except HttpError as exc:
            raise self._transport_error(exc, f"streaming {path}") from exc

    async def load_adapter(self, name: str) -> None:
        """Make the engine load ``name`` (``NAME@vN+DIGEST``) by naming it in a request.

        vLLM asks its resolvers for a name it does not hold; the loraflow resolver fetches the
        files from the artifact store and verifies them there, on the engine's host. The
        cheapest request that does so is ``/tokenize``. Idempotent: a loaded name resolves
        at once.
        """
        try:
            response = await self._client.post(
                "/tokenize",
                json={"model": name, "prompt": "."},
                timeout=httpx.Timeout(self.load_timeout_s, connect=5.0),
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, f"loading {name}") from exc
        if response.status_code == 200:
            return
        detail = f"loading {name}: HTTP {response.status_code} {response.text[:300]}"
        if response.status_code >= 500:
            raise EngineFailure(self.url, detail)
        # 404: no resolver produced it (not in the store, or its bytes do not match the digest);
        # 400: vLLM could not load what was fetched. Either way the engine's log says which.
        raise AdapterLoadFailure(self.url, name, detail)

    async def unload_adapter(self, name: str) -> None:
        try:
            response = await self._client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, f"unloading {name}") from exc
        if response.status_code >= 500:  # a 404 means it is not loaded: the outcome we want
            raise EngineFailure(self.url, f"unloading {name}: HTTP {response.status_code}")

    async def loaded_adapters(self) -> list[str]:
        try:
            response = await self._client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, "listing models") from exc
        if response.status_code != 200:
            raise EngineFailure(self.url, f"/v1/models answered HTTP {response.status_code}")
        try:
            data = response.json()
            return [m["id"] for m in data.get("data", []) if m.get("parent")]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise EngineFailure(self.url, "/v1/models did not answer with a model list") from exc

    async def aclose(self) -> None:
        await self._completions.aclose()
        await self._client.aclose()
