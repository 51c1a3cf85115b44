"""An Engine backed by vLLM's OpenAI server over HTTP (its private, admin-enabled port)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from loraflow.registry.errors import EngineUnavailableError, InvalidArgumentError, LoraflowError


class EngineRequestError(LoraflowError):
    """The engine answered a request with an error we pass on (e.g. a bad sampling field)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", body) if isinstance(body, dict) else {}
        error = error if isinstance(error, dict) else {}
        param = error.get("param")
        if isinstance(param, str) and param.startswith("body."):
            param = param[5:]  # vLLM reports FastAPI locations; clients know the field name
        super().__init__(str(error.get("message") or body), param=param if isinstance(param, str) else None)
        self.status = status
        self.body = body


class VLLMHttpEngine:
    def __init__(
        self, url: str, *, timeout_s: float = 120.0, transport: httpx.AsyncBaseTransport | None = None
    ):
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"VLLMHttpEngine({self.url})"

    async def health(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"engine {self.url} is unreachable ({type(exc).__name__})") from exc
        try:
            data = response.json()
        except json.JSONDecodeError:
            data = {"error": {"message": response.text[:500]}}
        return response.status_code, data

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    try:
                        data = json.loads(raw)
                    except json.JSONDecodeError:
                        data = {"error": {"message": raw[:500].decode(errors="replace")}}
                    raise EngineRequestError(response.status_code, data)
                async for chunk in response.aiter_raw():
                    yield chunk
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"engine {self.url} is unreachable ({type(exc).__name__})") from exc

    async def load_adapter(self, name: str, path: str) -> None:
        try:
            response = await self._client.post(
                "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}
            )
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"engine {self.url} is unreachable while loading {name}") from exc
        if response.status_code >= 500:
            raise EngineUnavailableError(f"engine {self.url} failed to load {name}: {response.text[:300]}")
        if response.status_code != 200:
            raise InvalidArgumentError(
                f"engine {self.url} refused {name}: {response.text[:300]}", param="model"
            )

    async def unload_adapter(self, name: str) -> None:
        try:
            await self._client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"engine {self.url} is unreachable while unloading {name}") from exc

    async def loaded_adapters(self) -> list[str]:
        try:
            response = await self._client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise EngineUnavailableError(f"engine {self.url} is unreachable") from exc
        return [m["id"] for m in response.json().get("data", []) if m.get("parent")]

    async def aclose(self) -> None:
        await self._client.aclose()
