"""API key checks against the routing snapshot (keys are reloaded when the registry revision moves)."""

from __future__ import annotations

from loraflow.registry import domain
from loraflow.registry.errors import LoraflowError, PermissionDeniedError, UnauthenticatedError
from loraflow.registry.keys import hash_key
from loraflow.registry.refs import parse_ref
from loraflow.server.routing import Snapshot, model_not_found


def bearer_token(header: str | None, what: str = "API key") -> str:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case, as RFC
    9110 has it); otherwise 401. The header is never echoed: it may be a secret."""
    if not header or not header.strip():
        raise UnauthenticatedError(
            f"missing {what}: send 'Authorization: Bearer <token>'", param="authorization"
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthenticatedError(
            "malformed Authorization header: send 'Authorization: Bearer <token>'", param="authorization"
        )
    return token.strip()


def authenticate(header: str | None, snapshot: Snapshot) -> domain.ApiKeyInfo:
    """The key a ``Bearer`` header names; otherwise 401."""
    key = snapshot.keys.get(hash_key(bearer_token(header)))
    if key is None:
        raise UnauthenticatedError("invalid or revoked API key", param="authorization")
    return key


def authorize_model(key: domain.ApiKeyInfo, model: str, base_names: tuple[str, ...]) -> None:
    """May ``key`` call ``model``? Decided from the name alone, before anything is resolved, so
    that a name the key may not use and a name that does not exist get the same 404: a key
    cannot probe which adapters or aliases exist. The base model needs the ``base`` scope and a
    pinned ``NAME@vN`` the ``versions`` scope (403, naming it)."""
    if model in base_names:
        if not key.has("base"):
            raise PermissionDeniedError(
                "this API key may not call the base model: that needs the 'base' scope", param="model"
            )
        return
    try:
        ref = parse_ref(model, param="model")
    except LoraflowError:
        return  # not a model name at all: resolving it answers the same 404 for everyone
    if not key.allows(ref.name):
        raise model_not_found(model)
    if ref.version is not None and not key.has("versions"):
        raise PermissionDeniedError(
            f"this API key may not call pinned versions such as {model!r}: that needs the "
            "'versions' scope; call the adapter by name or alias",
            param="model",
        )


def may_rate(key: domain.ApiKeyInfo, adapter: str, requested_by: str | None) -> bool:
    """Whether ``key`` may rate a request to ``adapter`` that the key named ``requested_by``
    made: its own requests, or any of its adapters' with the ``feedback-any`` scope."""
    return key.allows(adapter) and (requested_by == key.name or key.has("feedback-any"))
