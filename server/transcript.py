"""What a version answered to one request, per choice: from the engine's JSON, or assembled from its
stream events as the gateway relays them (no extra pass over the engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Transcript:
    """The answer of one request, per choice, from the engine's JSON or assembled from its stream
    events as they are relayed (no extra pass over the engine)."""

    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None

    def _choice(self, index: int) -> dict[str, Any]:
        return self.choices.setdefault(index, {"index": index, "content": "", "finish_reason": None})

    def add_response(self, data: dict[str, Any]) -> None:
        for c in data.get("choices") or []:
            choice = self._choice(int(c.get("index") or 0))
            message = c.get("message")
            choice["content"] = (message or {}).get("content") if isinstance(message, dict) else c.get("text")
            choice["content"] = choice["content"] or ""
            choice["finish_reason"] = c.get("finish_reason")
        self.usage = data.get("usage") or self.usage

    def add_chunk(self, data: dict[str, Any]) -> None:
        for c in data.get("choices") or []:
            choice = self._choice(int(c.get("index") or 0))
            delta = c.get("delta")
            piece = (delta or {}).get("content") if isinstance(delta, dict) else c.get("text")
            if piece:
                choice["content"] += piece
            if c.get("finish_reason"):
                choice["finish_reason"] = c["finish_reason"]
        if data.get("usage"):
            self.usage = data["usage"]

    @property
    def text(self) -> str:
        first = self.choices.get(0)
        return str(first["content"]) if first else ""

    @property
    def finish_reason(self) -> str | None:
        first = self.choices.get(0)
        return str(first["finish_reason"]) if first and first["finish_reason"] else None
