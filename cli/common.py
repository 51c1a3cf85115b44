"""What every command shares: settings and registry from the context, and error mapping.

Typed errors become a one-line message on stderr and an exit code from
:data:`EXIT_CODES`, the only place that mapping lives.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer
import typer.exceptions
from rich.console import Console

from loraflow.registry.errors import ErrorCode, LoraflowError, first_error

if TYPE_CHECKING:  # settings (pydantic) and the registry (SQLAlchemy) load in the commands that use them
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings

EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 2,  # the same code Click uses for usage errors
    ErrorCode.TOO_LARGE: 2,  # an input past a size limit: a usage error too
    ErrorCode.TIMEOUT: 10,  # like an overload: try again
    ErrorCode.RATE_LIMITED: 10,
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
    ErrorCode.UNAVAILABLE: 10,  # also: the registry database cannot be reached
}
# Anything else that escapes a command: one line, and the traceback only with this set.
UNEXPECTED_EXIT_CODE = 1
DEBUG_ENV = "LORAFLOW_DEBUG"

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
            from pydantic import ValidationError

            from loraflow.registry.settings import load_settings, setting_source, unknown_env_vars

            unknown = unknown_env_vars(os.environ)
            if unknown:
                err.print(
                    f"warning: ignoring {', '.join(unknown)}: not a loraflow setting (the settings "
                    "are listed under Configuration in README.md)",
                    markup=False,
                )
            try:
                self.settings = load_settings()
            except ValidationError as exc:
                where, message = first_error(exc.errors())
                raise LoraflowError(
                    f"invalid setting {where}: {message.removeprefix('Value error, ')} "
                    f"(set in {setting_source(where)})",
                    param=where,
                ) from exc
        return self.settings

    @property
    def registry(self) -> Registry:
        """The registry, created if it is not there yet: for commands that write."""
        if self._registry is None:
            from loraflow.registry.service import Registry

            self._registry = Registry.open(self.get_settings())
        return self._registry

    @property
    def existing_registry(self) -> Registry:
        """The registry for commands that only read: a SQLite database that is not there is an error
        naming the path it looked for (a mistyped LORAFLOW_HOME would otherwise read as empty)."""
        if self._registry is None:
            from loraflow.registry.service import Registry

            self._registry = Registry.open(self.get_settings(), create=False)
        return self._registry

    def database(self) -> str:
        """The registry database, fit to print (password hidden): say which one a command read."""
        from loraflow.registry.db import describe_url

        return describe_url(self.get_settings().resolved_database_url)

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
    """Turn a LoraflowError into one line on stderr and its exit code. With ``--json`` (a parameter
    named ``as_json``) the error is ``{"error": {"message", "code", "param"}}`` on stdout instead,
    so a script reads one JSON document from stdout either way; the exit code is the same."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except LoraflowError as exc:
            if kwargs.get("as_json"):  # --json: the error as JSON on stdout, same exit code
                print_json({"error": {"message": exc.message, "code": str(exc.code), "param": exc.param}})
            else:
                err.print(f"error: {exc.message}", markup=False)
            raise typer.Exit(EXIT_CODES.get(exc.code, UNEXPECTED_EXIT_CODE)) from exc
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):
            raise  # typer.Exit and usage errors (Typer's own Click's): Click prints and exits
        except Exception as exc:  # the last resort: no traceback unless asked for
            if os.environ.get(DEBUG_ENV):
                raise
            _reraise_click(exc)
            err.print(
                f"error: unexpected {type(exc).__name__}: {exc} ({DEBUG_ENV}=1 shows the traceback)",
                markup=False,
            )
            raise typer.Exit(UNEXPECTED_EXIT_CODE) from exc

    return wrapper


def _reraise_click(exc: Exception) -> None:
    """An exception of the ``click`` package (a library's, or a helper written for Click) as its
    Typer equivalent: Typer vendors its own Click and would show the package's as a traceback. A
    ClickException keeps its message and exit code (2 for usage errors); Exit and Abort are kept."""
    import sys

    click = sys.modules.get("click")  # not imported: nothing can have raised one
    if click is None:
        return
    if isinstance(exc, click.exceptions.Exit):
        raise typer.Exit(exc.exit_code) from exc
    if isinstance(exc, click.exceptions.Abort):
        raise typer.Abort() from exc
    if isinstance(exc, click.ClickException):
        err.print(f"error: {exc.format_message()}", markup=False)
        raise typer.Exit(exc.exit_code) from exc


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
