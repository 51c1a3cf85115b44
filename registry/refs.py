"""Parsing of the names users type: ``NAME``, ``NAME@vN``, ``NAME:ALIAS`` and ``vN``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraflow.registry.errors import InvalidArgumentError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
VERSION_RE = re.compile(r"^v?([1-9][0-9]*)$")

DEFAULT_ALIAS = "production"


@dataclass(frozen=True)
class Ref:
    """A reference to an adapter: by exact version, by alias, or (neither) its default alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        if self.alias is not None:
            return f"{self.name}:{self.alias}"
        return self.name


def version_ref(name: str, version: int) -> str:
    """The one spelling of an exact version, ``NAME@vN`` (what :class:`Ref` prints)."""
    return str(Ref(name, version=version))


def check_name(name: str, *, param: str = "name") -> str:
    if not NAME_RE.match(name):
        raise InvalidArgumentError(
            f"invalid name {name!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)",
            param=param,
        )
    return name


def check_alias(alias: str, *, param: str = "alias") -> str:
    if not ALIAS_RE.match(alias):
        raise InvalidArgumentError(
            f"invalid alias {alias!r}: use a lowercase slug such as 'production', 'staging' or 'canary'",
            param=param,
        )
    return alias


def parse_version(text: str, *, param: str = "version") -> int:
    match = VERSION_RE.match(text.strip())
    if not match:
        raise InvalidArgumentError(f"invalid version {text!r}: expected vN, e.g. v3", param=param)
    return int(match.group(1))


def parse_target(text: str, *, default_name: str | None, param: str, version_first: bool = False) -> Ref:
    """A reference as commands take it: ``NAME``, ``NAME@vN`` or ``NAME:ALIAS``; with a default
    adapter also ``@vN`` and ``:ALIAS``, and where a version is expected (``version_first``) a bare
    ``vN``. ``default_name`` is None when no default adapter is set."""
    short = text.startswith(("@", ":")) or (version_first and VERSION_RE.match(text.strip()) is not None)
    if not short:
        return parse_ref(text, param=param)
    if not default_name:
        raise InvalidArgumentError(
            f"{text!r} names no adapter, and no default_adapter is set in loraflow.toml: "
            f"write NAME{text if text[0] in '@:' else '@' + text}",
            param=param,
        )
    if text[0] in "@:":
        return parse_ref(default_name + text, param=param)
    return Ref(check_name(default_name, param=param), version=parse_version(text, param=param))


def parse_ref(text: str, *, param: str = "model") -> Ref:
    """Parse ``NAME``, ``NAME@vN`` or ``NAME:ALIAS``."""
    if "@" in text:
        name, _, version = text.partition("@")
        return Ref(check_name(name, param=param), version=parse_version(version, param=param))
    if ":" in text:
        name, _, alias = text.partition(":")
        return Ref(check_name(name, param=param), alias=check_alias(alias, param=param))
    return Ref(check_name(text, param=param))
