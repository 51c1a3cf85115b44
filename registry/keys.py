"""API keys for the gateway: created once, stored as a sha256 hash, optionally limited to adapters."""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

from pydantic import ValidationError

from loraflow.registry import domain
from loraflow.registry.errors import ConflictError, InvalidArgumentError, first_error
from loraflow.registry.refs import check_name
from loraflow.registry.scopes import SCOPES, Scope
from loraflow.registry.service import Registry

KEY_PREFIX = "lf-"
# An imported key is a secret someone generated: shorter than this, it could be guessed.
MIN_IMPORTED_KEY_CHARS = 24


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    registry: Registry,
    name: str,
    adapters: list[str] | None = None,
    scopes: list[str] | None = None,
    limits: dict[str, int | None] | None = None,
) -> tuple[str, domain.ApiKeyInfo]:
    """Returns (the key, shown only now, and its record). With no ``scopes``, the key may call
    only its adapters' aliases (least privilege). ``limits``: rpm, tpm, max_concurrency."""
    check_name(name, param="name")
    adapters = _checked_adapters(adapters)
    checked = checked_scopes(scopes)
    own = checked_limits(limits)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    info = registry.add_api_key(
        name=name, prefix=key[:10], key_hash=hash_key(key), adapters=adapters, scopes=checked, limits=own
    )
    return key, info


def checked_limits(limits: dict[str, int | None] | None) -> domain.KeyLimits:
    """``limits`` as :class:`domain.KeyLimits`, or :class:`InvalidArgumentError` naming the field."""
    try:
        return domain.KeyLimits.model_validate(limits or {})
    except ValidationError as exc:
        field, message = first_error(exc.errors(), default_field="limits")
        raise InvalidArgumentError(f"{field}: {message}", param=field) from None


def checked_scopes(scopes: list[str] | None) -> list[Scope]:
    """``scopes`` as :data:`Scope` values, or :class:`InvalidArgumentError` naming the bad one."""
    out: list[Scope] = []
    for scope in scopes or []:
        known = next((s for s in SCOPES if s == scope), None)
        if known is None:
            raise InvalidArgumentError(
                f"unknown scope {scope!r}; the scopes are: {', '.join(SCOPES)}", param="scope"
            )
        out.append(known)
    return sorted(set(out))


ImportOutcome = Literal["created", "unchanged"]


def import_keys(
    registry: Registry,
    keys: dict[str, str],
    adapters: list[str] | None = None,
    scopes: list[str] | None = None,
    limits: dict[str, int | None] | None = None,
) -> dict[str, ImportOutcome]:
    """Record keys made elsewhere (a Kubernetes Secret: name -> key), by their hash. Idempotent:
    a key already recorded under its name is ``unchanged``. Everything is checked before anything
    is written, so a bad entry changes nothing: a name taken by a different or revoked key, a key
    recorded under another name, or a key too short to be a secret (:class:`InvalidArgumentError`
    or :class:`ConflictError`, naming the entry). A key recorded already keeps its adapters and
    scopes: to change them, or to rotate, import the key under a new name and revoke the old."""
    adapters = _checked_adapters(adapters)
    checked = checked_scopes(scopes)
    own = checked_limits(limits)
    existing = {k.name: k for k in registry.api_keys()}
    by_hash = {k.key_hash: k.name for k in existing.values()}
    plan: dict[str, ImportOutcome] = {}
    for name, raw in sorted(keys.items()):
        check_name(name, param=f"keys[{name}]")
        key = raw.strip()
        if len(key) < MIN_IMPORTED_KEY_CHARS or any(ch.isspace() for ch in key):
            raise InvalidArgumentError(
                f"API key {name!r} is not a usable key: at least {MIN_IMPORTED_KEY_CHARS} characters "
                "with no spaces (e.g. `openssl rand -hex 32`)",
                param=f"keys[{name}]",
            )
        digest = hash_key(key)
        known = existing.get(name)
        if known is not None:
            if known.key_hash != digest:
                raise ConflictError(
                    f"API key {name!r} is recorded with a different key: to rotate, add the new key "
                    f"under a new name and revoke this one (loraflow keys revoke {name})",
                    param=f"keys[{name}]",
                )
            if known.revoked_at is not None:
                raise ConflictError(
                    f"API key {name!r} was revoked: import it under a new name", param=f"keys[{name}]"
                )
            plan[name] = "unchanged"
        elif digest in by_hash:
            raise ConflictError(
                f"API key {name!r} is the key recorded as {by_hash[digest]!r}", param=f"keys[{name}]"
            )
        else:
            by_hash[digest] = name
            plan[name] = "created"
    for name, outcome in plan.items():
        if outcome == "created":
            key = keys[name].strip()
            registry.add_api_key(
                name=name,
                prefix=key[:10],
                key_hash=hash_key(key),
                adapters=adapters,
                scopes=checked,
                limits=own,
            )
    return plan


def _checked_adapters(adapters: list[str] | None) -> list[str] | None:
    for adapter in adapters or []:
        check_name(adapter, param="adapter")
    return sorted(set(adapters)) if adapters else None
