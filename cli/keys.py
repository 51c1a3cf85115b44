"""`loraflow keys …`: gateway API keys."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.registry.keys import create_key

app = typer.Typer(name="keys", help="Gateway API keys.", no_args_is_help=True, add_completion=False)


@app.command()
@guarded
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="Limit the key to this adapter (repeatable).")
    ] = None,
) -> None:
    """Create a key. It is printed once; only its hash is stored."""
    key, info = create_key(state(ctx).registry, name, adapter)
    out.print(key, markup=False)
    scope = ", ".join(info.adapters) if info.adapters else "all adapters"
    typer.echo(f"created key {info.name} ({scope}); store it now, it is not shown again", err=True)


@app.command("list")
@guarded
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (never the keys themselves)."""
    keys = state(ctx).registry.store.list_api_keys()
    if as_json:
        print_json([k.model_dump(mode="json", exclude={"key_hash"}) for k in keys])
        return
    table = Table("name", "prefix", "adapters", "created", "revoked")
    for k in keys:
        table.add_row(
            k.name,
            k.prefix + "…",
            ", ".join(k.adapters) if k.adapters else "all",
            f"{k.created_at:%Y-%m-%d}",
            f"{k.revoked_at:%Y-%m-%d}" if k.revoked_at else "-",
        )
    out.print(table)


@app.command()
@guarded
def revoke(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Revoke a key; gateways stop accepting it within a poll interval."""
    state(ctx).registry.store.revoke_api_key(name=name, actor=state(ctx).registry.actor)
    out.print(f"revoked key {name}")
