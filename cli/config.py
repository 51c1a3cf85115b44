"""`loraflow config show`: the effective settings, and where each value came from."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loraflow.cli.common import guarded, out, print_json, state

if TYPE_CHECKING:
    from pydantic import BaseModel

    from loraflow.registry.settings import Settings

app = typer.Typer(name="config", help="The effective settings.", no_args_is_help=True, add_completion=False)


def _mask(value: Any) -> Any:
    """A password in a URL (database_url, artifact_uri) is never printed."""
    from loraflow.registry.urls import mask_url  # the one masking rule, shared with the registry

    return mask_url(value) if isinstance(value, str) else value


def _leaves(model: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of every setting; a section (a nested settings object) is walked into."""
    from pydantic import BaseModel  # pydantic loads with the settings, not at start-up

    leaves: list[tuple[str, Any]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            leaves += _leaves(value, f"{prefix}{name}.")
        else:
            leaves.append((f"{prefix}{name}", value))
    return leaves


def _in_file(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def sources(settings: Settings) -> dict[str, tuple[Any, str]]:
    """Every setting of ``settings`` (as loaded): (effective value, where it came from: ``env VAR``,
    ``file PATH`` or ``default``)."""
    from loraflow.registry.settings import config_file, setting_source

    path = config_file()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        data = {}  # load_settings has already refused a file it cannot read
    result: dict[str, tuple[Any, str]] = {}
    for dotted, value in _leaves(settings):
        var = setting_source(dotted)  # its variable (or its section's), else the config file's path
        in_file = _in_file(data, dotted)
        where = f"env {var}" if var != str(path) else f"file {path}" if in_file else "default"
        result[dotted] = (value, where)
    return result


def _show(value: Any) -> str:
    import json

    if value is None:
        return "(unset)"
    if isinstance(value, str | Path):
        return str(_mask(str(value)))
    return json.dumps(value, default=str)


@app.command()
@guarded
def show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the settings as JSON.")] = False,
    changed: Annotated[
        bool, typer.Option("--changed", help="Only the settings set in the file or the environment.")
    ] = False,
) -> None:
    """Print every setting's effective value and where it came from: env, file or default.

    The config file is $LORAFLOW_CONFIG, else ./loraflow.toml; LORAFLOW_* variables win over it
    (a section is LORAFLOW_SECTION__KEY). Passwords in URLs are masked.

    Example: loraflow config show --changed
    """
    settings = state(ctx).get_settings()  # a bad setting is refused here, naming it
    from loraflow.registry.settings import config_file

    rows = {k: v for k, v in sources(settings).items() if not changed or v[1] != "default"}
    path = config_file()
    resolved = {
        "config_file": str(path) if path.is_file() else f"{path} (absent: every setting is env or default)",
        "database": _mask(settings.resolved_database_url),
        "artifacts": _mask(settings.resolved_artifact_uri),
    }
    if as_json:
        print_json(
            {
                "settings": {
                    k: {"value": _mask(str(v)) if isinstance(v, str | Path) else v, "source": where}
                    for k, (v, where) in rows.items()
                },
                "resolved": resolved,
            }
        )
        return
    width = max((len(k) for k in rows), default=0)
    for key, (value, where) in rows.items():
        out.print(f"{key:<{width}} = {_show(value)}  ({where})", markup=False)
    for key, value in resolved.items():
        out.print(f"# {key}: {value}", markup=False)
