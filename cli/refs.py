"""What users type to name an adapter, a version or an alias on the command line, as the registry's refs."""

from __future__ import annotations

from typing import Annotated

import typer

from loraflow.cli.common import state
from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.refs import VERSION_RE, Ref, parse_target

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _default_name(ctx: typer.Context) -> str | None:
    return state(ctx).get_settings().default_adapter or None


def adapter_ref(ctx: typer.Context, text: str | None, *, param: str, version_first: bool = False) -> Ref:
    """What the user typed, as a Ref: ``NAME``, ``NAME@vN``, ``NAME:ALIAS``; with default_adapter
    set also nothing at all, ``@vN``, ``:ALIAS`` and (``version_first``) a bare ``vN``."""
    if text is None:
        name = _default_name(ctx)
        if not name:
            raise InvalidArgumentError(
                "no adapter name given, and no default_adapter is set in loraflow.toml", param=param
            )
        return Ref(name)
    short = text.startswith(("@", ":")) or (version_first and VERSION_RE.match(text.strip()) is not None)
    return parse_target(
        text, default_name=_default_name(ctx) if short else None, param=param, version_first=version_first
    )


def resolve_version(ctx: typer.Context, text: str | None, *, param: str) -> tuple[str, int]:
    """The one way a command turns a reference into (name, version): ``NAME@vN``, ``NAME:ALIAS``
    (what the alias points at now), and the default-adapter short forms ``@vN``, ``:ALIAS``, ``vN``."""
    if text is None:
        raise InvalidArgumentError("a version is required, e.g. NAME@v3 or NAME:staging", param=param)
    ref = adapter_ref(ctx, text, param=param, version_first=True)
    if ref.version is not None:
        return ref.name, ref.version
    if ref.alias is None:
        raise InvalidArgumentError(
            f"{text!r} names no version: write {ref.name}@vN or {ref.name}:ALIAS", param=param
        )
    return ref.name, state(ctx).registry.resolve(ref).version
