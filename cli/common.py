"""What every command shares: settings and registry from the context, and error mapping.

Typed errors become a one-line message on stderr and an exit code from
:data:`EXIT_CODES`, the only place that mapping lives.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from loraflow.registry.errors import ErrorCode, LoraflowError
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings, load_settings

EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 2,  # the same code Click uses for usage errors
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.CONFLICT: 4,
    ErrorCode.INVALID_ADAPTER: 5,
    ErrorCode.INTEGRITY: 6,
    ErrorCode.SCHEMA_OUT_OF_DATE: 7,
    ErrorCode.MISSING_DEPENDENCY: 8,
    ErrorCode.UNAUTHENTICATED: 9,
    ErrorCode.PERMISSION_DENIED: 9,
    ErrorCode.OVERLOADED: 10,
    ErrorCode.ENGINE_UNAVAILABLE: 10,
    ErrorCode.GATE_REFUSED: 4,  # like a conflict: the registry's state forbids the move
    ErrorCode.UNAVAILABLE: 10,
}

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class AppState:
    """Built once per invocation by the root callback and kept in ``ctx.obj``."""

    settings: Settings | None = None
    _registry: Registry | None = field(default=None, repr=False)

    def get_settings(self) -> Settings:
        if self.settings is None:
            try:
                self.settings = load_settings()
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise LoraflowError(
                    f"invalid setting {where}: {first['msg']} (loraflow.toml or LORAFLOW_*)", param=where
                ) from exc
        return self.settings

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry.open(self.get_settings())
        return self._registry

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


def state(ctx: typer.Context) -> AppState:
    root = ctx.find_root()
    if not isinstance(root.obj, AppState):
        root.obj = AppState()
        root.call_on_close(root.obj.close)
    return root.obj


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a LoraflowError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except LoraflowError as exc:
            err.print(f"error: {exc.message}", markup=False)
            raise typer.Exit(EXIT_CODES.get(exc.code, 1)) from exc

    return wrapper


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
