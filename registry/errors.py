"""Typed errors shared by every loraflow component.

Each error carries an :class:`ErrorCode` and, where it applies, the field
(``param``) the caller must change. The code is mapped to an HTTP status in
``server`` and to an exit code in ``cli``, each in exactly one table. Nothing
matches on error text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    INVALID_ADAPTER = "invalid_adapter"
    INTEGRITY = "integrity_error"
    SCHEMA_OUT_OF_DATE = "schema_out_of_date"
    MISSING_DEPENDENCY = "missing_dependency"
    UNAUTHENTICATED = "invalid_api_key"
    PERMISSION_DENIED = "permission_denied"
    OVERLOADED = "overloaded"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    GATE_REFUSED = "gate_refused"
    UNAVAILABLE = "unavailable"
    TOO_LARGE = "request_too_large"
    TIMEOUT = "request_timeout"
    RATE_LIMITED = "rate_limit_exceeded"


class LoraflowError(Exception):
    code: ErrorCode = ErrorCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments (a URL, a name): rebuild from the state
        # instead, so any of them crosses a process boundary (the traffic writer's) intact.
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: type[LoraflowError], args: tuple[Any, ...], state: dict[str, Any]) -> LoraflowError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidArgumentError(LoraflowError):
    """The caller passed something malformed; ``param`` names it."""

    code = ErrorCode.INVALID_ARGUMENT


class NotFoundError(LoraflowError):
    """An adapter, version, alias or dataset that does not exist."""

    code = ErrorCode.NOT_FOUND


class ConflictError(LoraflowError):
    """A concurrent change won, or the state forbids the change (e.g. archive while aliased)."""

    code = ErrorCode.CONFLICT


class InvalidAdapterError(LoraflowError):
    """Adapter files that the registry refuses to store (or the engine could not serve)."""

    code = ErrorCode.INVALID_ADAPTER


class IntegrityError(LoraflowError):
    """Stored bytes do not match their digest."""

    code = ErrorCode.INTEGRITY


class SchemaOutOfDateError(LoraflowError):
    """The registry database's schema is not the code's: behind it (run ``loraflow db upgrade``),
    newer than it (upgrade loraflow), or not one loraflow's migrations know."""

    code = ErrorCode.SCHEMA_OUT_OF_DATE


class MissingDependencyError(LoraflowError):
    """An optional extra is needed; the message names the ``pip install`` to run."""

    code = ErrorCode.MISSING_DEPENDENCY


class UnauthenticatedError(LoraflowError):
    """No API key, or one that is unknown or revoked."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(LoraflowError):
    """A valid API key that is not allowed this adapter."""

    code = ErrorCode.PERMISSION_DENIED


class OverloadedError(LoraflowError):
    """Too many requests in flight."""

    code = ErrorCode.OVERLOADED


class RequestTooLargeError(LoraflowError):
    """A request body past ``server.max_body_bytes``: refused before it is read whole."""

    code = ErrorCode.TOO_LARGE


class RateLimitedError(LoraflowError):
    """An API key past one of its limits (requests or tokens per minute, requests in flight)."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class RequestTimeoutError(LoraflowError):
    """A request body that did not arrive within ``server.body_timeout_s``."""

    code = ErrorCode.TIMEOUT


class EngineUnavailableError(LoraflowError):
    """No engine replica can take the request right now."""

    code = ErrorCode.ENGINE_UNAVAILABLE


class GateRefusedError(LoraflowError):
    """The promotion gate refused a version: no eval report, a stale one, or a rule it fails."""

    code = ErrorCode.GATE_REFUSED


class UnavailableError(LoraflowError):
    """A part of loraflow could not start or stopped (the traffic writer process)."""

    code = ErrorCode.UNAVAILABLE


def first_error(errors: Sequence[Mapping[str, Any]], *, default_field: str = "") -> tuple[str, str]:
    """The first of pydantic's validation errors (``ValidationError.errors()``) as (the dotted
    field, its message): what every edge reports of a bad value, one field at a time."""
    if not errors:
        return default_field, "invalid value"
    first = errors[0]
    field = ".".join(str(part) for part in first.get("loc", ())) or default_field
    return field, str(first.get("msg", "invalid value"))
