"""The one interface the gateway has to an engine replica, and the errors it raises.

Errors say whose fault a failure is, because the gateway acts on that:

- :class:`EngineRequestError`: the engine refused *this request* (a 4xx such as a bad
  sampling field). The client gets the engine's answer as it is.
- :class:`EngineFailure`: the replica failed (a 5xx, a timeout, a malformed answer).
  Before the first byte reached the client, the gateway retries once on another healthy
  replica, and otherwise answers 503 with ``Retry-After``.
- :class:`EngineDown`: the replica could not be reached, or dropped the connection. As
  above, and it is marked unhealthy until its next health check.
- :class:`AdapterLoadFailure`: the replica could not fetch, verify or load a version.
  As :class:`EngineFailure`; the replica stays in the routing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from loraflow.registry.errors import EngineUnavailableError, LoraflowError


class EngineRequestError(LoraflowError):
    """The engine answered this request with a client error, which is passed on as it is."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        error = body.get("error", body) if isinstance(body, dict) else {}
        error = error if isinstance(error, dict) else {}
        param = error.get("param")
        if isinstance(param, str) and param.startswith("body."):
            param = param[5:]  # vLLM reports FastAPI locations; clients know the field name
        super().__init__(str(error.get("message") or body), param=param if isinstance(param, str) else None)
        self.status = status
        self.body = body


class EngineFailure(EngineUnavailableError):
    """A replica failed a request: its fault, not the client's.

    ``message`` is what a client may read; it never names the replica's private URL or
    repeats what the engine said. ``detail`` is for the gateway's log.
    """

    def __init__(self, url: str, detail: str) -> None:
        super().__init__("an engine replica failed while serving this request")
        self.url = url
        self.detail = f"engine {url} failed: {detail}"


class EngineDown(EngineFailure):
    """A replica could not be reached, or dropped the connection."""


class AdapterLoadFailure(EngineFailure):
    """A replica could not load a version: its resolver found no files for the digest, the files
    did not match it, or vLLM refused them. A server-side fault (503), retried like any failure."""

    def __init__(self, url: str, name: str, detail: str) -> None:
        super().__init__(url, detail)
        self.message = f"the engine could not load {name.partition('+')[0]}; retry shortly"


class Engine(Protocol):
    """A vLLM replica. Adapter names it sees are immutable versions: ``NAME@vN+digest``."""

    url: str

    async def health(self) -> bool: ...

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming OpenAI call: the engine's JSON object. Raises the errors above."""
        ...

    def stream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        """A streaming OpenAI call: the raw SSE bytes, chunk by chunk. Raises the errors above.
        The caller ``aclose()``s it when it stops early, which closes the engine connection."""
        ...

    async def load_adapter(self, name: str) -> None:
        """Have the replica fetch (from the artifact store), verify and load ``name``."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    async def loaded_adapters(self) -> list[str]: ...

    async def aclose(self) -> None: ...
