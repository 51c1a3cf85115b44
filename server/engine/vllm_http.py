"""An Engine backed by vLLM's OpenAI server over HTTP (its private, admin-enabled port)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from loraflow.server.engine.protocol import AdapterLoadFailure, EngineDown, EngineFailure, EngineRequestError


def _parse_error(status: int, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        return data
    return {"error": {"message": raw[:500].decode(errors="replace") or f"HTTP {status}"}}


_JSON = {"content-type": "application/json"}


class VLLMHttpEngine:
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
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._transport = transport or httpx.AsyncHTTPTransport(limits=limits)
        timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout, transport=self._transport)
        self._request_timeout = timeout.as_dict()

    def __repr__(self) -> str:
        return f"VLLMHttpEngine({self.url})"

    def _transport_error(self, exc: httpx.HTTPError, doing: str) -> EngineFailure:
        what = f"{type(exc).__name__} while {doing}"
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return EngineFailure(self.url, what)  # slow, not necessarily gone
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

    async def _send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """A completion request straight to the transport, its body not yet read. The client's own
        layers (auth, redirects, cookies, URL merging, event hooks) do nothing for a call to our own
        engine; skipping them halved the gateway's CPU per proxied request on the null engine, from
        2.4 to 1.2 ms on a 2-core VM (bench/gateway_overhead.py, ``process_cpu_us_per_request``)."""
        request = httpx.Request(
            "POST",
            self.url + path,
            content=json.dumps(body, separators=(",", ":")).encode(),
            headers=_JSON,
            extensions={"timeout": self._request_timeout},
        )
        return await self._transport.handle_async_request(request)

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._send(path, body)
            try:
                raw = await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, f"calling {path}") from exc
        if response.status_code != 200:
            raise self._status_error(response.status_code, raw)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineFailure(self.url, f"{path} answered 200 with a body that is not JSON") from exc
        if not isinstance(data, dict):
            raise EngineFailure(self.url, f"{path} answered 200 with JSON that is not an object")
        return data

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            response = await self._send(path, body)
            try:
                if response.status_code != 200:
                    raise self._status_error(response.status_code, await response.aread())
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
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
        await self._client.aclose()
