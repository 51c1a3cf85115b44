"""API key checks against the routing snapshot (keys are reloaded when the registry revision moves)."""

from __future__ import annotations

from loraflow.registry import domain
from loraflow.registry.errors import PermissionDeniedError, UnauthenticatedError
from loraflow.registry.keys import hash_key
from loraflow.server.routing import Snapshot


def authenticate(header: str | None, snapshot: Snapshot) -> domain.ApiKeyInfo:
    """The key a ``Bearer`` header names; otherwise 401. The header is never echoed: it may be a secret."""
    if not header or not header.strip():
        raise UnauthenticatedError(
            "missing API key: send 'Authorization: Bearer <key>'", param="authorization"
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError(
            "malformed Authorization header: send 'Authorization: Bearer <key>'", param="authorization"
        )
    key = snapshot.keys.get(hash_key(token.strip()))
    if key is None:
        raise UnauthenticatedError("invalid or revoked API key", param="authorization")
    return key


def authorize(key: domain.ApiKeyInfo, adapter: str | None) -> None:
    if adapter is not None and not key.allows(adapter):
        raise PermissionDeniedError(f"this API key may not use adapter {adapter!r}", param="model")
