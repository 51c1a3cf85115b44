"""`loraflow keys …`: gateway API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from loraflow.cli.common import err, guarded, out, print_json, state
from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.scopes import SCOPES

_SCOPE_HELP = (
    "Grant a scope (repeatable); without any, the key calls only its adapters by name or alias. "
    + "; ".join(f"{name}: {what}" for name, what in SCOPES.items())
    + "."
)

RpmOption = Annotated[
    int | None, typer.Option("--rpm", help="Requests per minute (default: server.key_rpm).", min=1)
]
TpmOption = Annotated[
    int | None,
    typer.Option("--tpm", help="Tokens per minute, prompt and completion (default: server.key_tpm).", min=1),
]
ConcurrencyOption = Annotated[
    int | None,
    typer.Option(
        "--max-concurrency", help="Requests in flight at once (default: server.key_max_concurrency).", min=1
    ),
]

app = typer.Typer(name="keys", help="Gateway API keys.", no_args_is_help=True, add_completion=False)


@app.command()
@guarded
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="Limit the key to this adapter (repeatable).")
    ] = None,
    scope: Annotated[list[str] | None, typer.Option("--scope", help=_SCOPE_HELP)] = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrency: ConcurrencyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its record as JSON.")] = False,
) -> None:
    """Create a key. It is printed once; only its hash is stored.

    Example: loraflow keys create ci-bot --adapter support --scope versions --rpm 600 --json

    An --adapter not registered yet is accepted with a warning (a tenant's key may come first)."""
    from loraflow.registry.keys import create_key

    registry = state(ctx).registry
    registered = {a.name for a in registry.adapters()}
    unknown = [a for a in adapter or [] if a not in registered]
    key, info = create_key(
        registry, name, adapter, scope, {"rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency}
    )
    if unknown:
        err.print(
            f"warning: no adapter named {', '.join(unknown)} is registered yet; the key will be accepted "
            "for it once one is",
            markup=False,
        )
    if as_json:
        print_json({"key": key} | info.model_dump(mode="json", exclude={"key_hash"}))
        return
    out.print(key, markup=False)
    adapters = ", ".join(info.adapters) if info.adapters else "all adapters"
    scopes = ", ".join(info.scopes) or "no scopes"
    err.print(
        f"created key {info.name} ({adapters}; {scopes}); store it now, it is not shown again", markup=False
    )


@app.command("import")
@guarded
def import_(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            help="One file per key: its name is the key's name, its content the key (a mounted Secret).",
        ),
    ],
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="Limit the keys to this adapter (repeatable).")
    ] = None,
    scope: Annotated[list[str] | None, typer.Option("--scope", help=_SCOPE_HELP)] = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    max_concurrency: ConcurrencyOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Record keys made elsewhere (e.g. a Kubernetes Secret) by their hash; run again, it changes nothing.

    Example: loraflow keys import /etc/loraflow/keys --adapter support
    """
    if not directory.is_dir():
        raise InvalidArgumentError(f"{directory} is not a folder", param="DIR")
    # A mounted Secret also holds the kubelet's ..data links and dot-folders; keys are plain names.
    keys = {
        p.name: p.read_text()
        for p in sorted(directory.iterdir())
        if not p.name.startswith(".") and p.is_file()
    }
    if not keys:
        raise InvalidArgumentError(f"{directory} holds no key files", param="DIR")
    from loraflow.registry.keys import import_keys

    outcome = import_keys(
        state(ctx).registry,
        keys,
        adapter,
        scope,
        {"rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency},
    )
    if as_json:
        print_json(outcome)
        return
    for name, what in outcome.items():
        out.print(f"{name}: {what}", markup=False)


@app.command("list")
@guarded
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (never the keys themselves). A key marked * was made before scopes existed and
    was given `base` and `versions` to keep working: replace it with one made with least privilege.
    A limit shown as - is the gateways' default (server.key_rpm, key_tpm, key_max_concurrency).

    Example: loraflow keys list --json
    """
    keys = state(ctx).existing_registry.api_keys()
    if as_json:
        print_json([k.model_dump(mode="json", exclude={"key_hash"}) for k in keys])
        return
    table = Table("name", "prefix", "adapters", "scopes", "rpm/tpm/in flight", "created", "revoked")
    for k in keys:
        table.add_row(
            escape(k.name),
            escape(k.prefix) + "…",
            escape(", ".join(k.adapters)) if k.adapters else "all",
            (", ".join(k.scopes) or "-") + (" *" if k.scopes_migrated else ""),
            "/".join(str(v) if v else "-" for v in (k.rpm, k.tpm, k.max_concurrency)),
            f"{k.created_at:%Y-%m-%d}",
            f"{k.revoked_at:%Y-%m-%d}" if k.revoked_at else "-",
        )
    out.print(table)
    if any(k.scopes_migrated and k.revoked_at is None for k in keys):
        err.print(
            "* scopes given by the upgrade to keep the key working as before (base, versions); "
            "replace the key with one created with only the scopes it needs",
            markup=False,
        )


@app.command()
@guarded
def revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="Print the revoked key's record as JSON.")] = False,
) -> None:
    """Revoke a key; gateways stop accepting it within a poll interval.

    Example: loraflow keys revoke ci-bot
    """
    info = state(ctx).registry.revoke_api_key(name)
    if as_json:
        print_json(info.model_dump(mode="json", exclude={"key_hash"}))
        return
    out.print(f"revoked key {name}", markup=False)
