"""The one interface the gateway has to an engine replica."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class EngineResponse(Protocol):
    status_code: int


class Engine(Protocol):
    """A vLLM replica. Adapter names it sees are immutable versions: ``NAME@vN``."""

    url: str

    async def health(self) -> bool: ...

    async def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A non-streaming OpenAI call: (status, JSON body)."""
        ...

    def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """A streaming OpenAI call: the raw SSE bytes, chunk by chunk."""
        ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def loaded_adapters(self) -> list[str]: ...

    async def aclose(self) -> None: ...
