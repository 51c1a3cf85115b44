"""API keys for the gateway: created once, stored as a sha256 hash, optionally limited to adapters."""

from __future__ import annotations

import hashlib
import secrets

from loraflow.registry import domain
from loraflow.registry.refs import check_name
from loraflow.registry.service import Registry

KEY_PREFIX = "lf-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    registry: Registry, name: str, adapters: list[str] | None = None
) -> tuple[str, domain.ApiKeyInfo]:
    """Returns (the key, shown only now, and its record)."""
    check_name(name, param="name")
    for adapter in adapters or []:
        check_name(adapter, param="adapter")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    info = registry.store.create_api_key(
        name=name,
        prefix=key[:10],
        key_hash=hash_key(key),
        adapters=sorted(set(adapters)) if adapters else None,
        actor=registry.actor,
    )
    return key, info
