"""`adapters …`: the registry's command line (also mounted as `loraflow adapters …`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.registry import domain
from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.refs import DEFAULT_ALIAS, parse_ref, parse_version

app = typer.Typer(
    name="adapters",
    help="Register, inspect, promote and roll back versioned LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
AliasOpt = Annotated[str, typer.Option("--alias", "-a", help="The alias to move.")]


def _load_json_file(path: Path | None, param: str) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidArgumentError(f"{param}: no such file {str(path)!r}", param=param) from exc
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"{param}: {path} is not valid JSON ({exc})", param=param) from exc
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{param}: {path} must hold a JSON object", param=param)
    return data


def _name_and_version(ctx: typer.Context, first: str | None, second: str | None) -> tuple[str, int]:
    """`promote NAME vN` or, with default_adapter set, `promote vN`."""
    if second is None:
        if first is None:
            raise InvalidArgumentError("a version is required, e.g. v3", param="version")
        return _default_name(ctx), parse_version(first)
    return parse_ref(first or "", param="name").name, parse_version(second)


def _default_name(ctx: typer.Context, given: str | None = None) -> str:
    if given:
        return parse_ref(given, param="name").name
    name = state(ctx).get_settings().default_adapter
    if not name:
        raise InvalidArgumentError(
            "no adapter name given, and no default_adapter is set in loraflow.toml", param="name"
        )
    return name


def _version_json(v: domain.VersionInfo, template_matches: bool | None = None) -> dict[str, Any]:
    return {
        "version": v.version,
        "digest": v.digest,
        "status": v.status,
        "dataset": v.dataset,
        "metrics": v.metrics,
        "template_matches": template_matches,
        "created_at": v.created_at.isoformat(),
    }


def _adapter_json(a: domain.AdapterInfo, matches: dict[int, bool | None]) -> dict[str, Any]:
    return {
        "name": a.name,
        "base_model": a.base_model,
        "aliases": a.aliases,
        "versions": [_version_json(v, matches.get(v.version)) for v in a.versions],
    }


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "NO"


def _aliases_of(a: domain.AdapterInfo, version: int) -> str:
    return ", ".join(name for name, v in a.aliases.items() if v == version)


@app.command()
@guarded
def register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Adapter name; a new one is created on first register.")],
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="PEFT adapter folder.")],
    base: Annotated[str, typer.Option("--base", help="Base model: local directory or Hugging Face id.")],
    task: Annotated[str | None, typer.Option(help="What the adapter is for.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset version it was trained on: NAME@vN.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="JSON file of metrics.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of the training config.")] = None,
    eval_report: Annotated[Path | None, typer.Option(help="JSON file of the eval report.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Import an existing PEFT LoRA adapter as the next version of NAME."""
    version = state(ctx).registry.register(
        name,
        directory,
        base_model=base,
        task=task,
        dataset=dataset,
        metrics=_load_json_file(metrics, "metrics"),
        training_config=_load_json_file(config, "config"),
        eval_report=_load_json_file(eval_report, "eval_report"),
    )
    if as_json:
        matches = state(ctx).registry.template_matches(state(ctx).registry.get(name))
        print_json({"name": version.adapter, **_version_json(version, matches[version.version])})
    else:
        out.print(
            f"registered {version.ref} (digest {version.digest[:12]}, r={version.rank}, "
            f"{version.size_bytes} bytes)"
        )


@app.command("list")
@guarded
def list_(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List adapters with their aliases and latest version."""
    reg = state(ctx).registry
    adapters = reg.list()
    if as_json:
        print_json([_adapter_json(a, reg.template_matches(a)) for a in adapters])
        return
    table = Table("name", "base model", "latest", "aliases", "versions")
    for a in adapters:
        latest = f"v{a.latest.version}" if a.latest else "-"
        aliases = ", ".join(f"{k}=v{v}" for k, v in a.aliases.items()) or "-"
        table.add_row(a.name, a.base_model, latest, aliases, str(len(a.versions)))
    out.print(table if adapters else "no adapters registered")


@app.command()
@guarded
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME[@vN]")],
    as_json: JsonFlag = False,
) -> None:
    """Show an adapter and its versions, or one version in full."""
    parsed = parse_ref(ref, param="NAME[@vN]")
    if parsed.alias is not None:
        raise InvalidArgumentError(f"show takes NAME or NAME@vN, not an alias ({ref})", param="NAME[@vN]")
    reg = state(ctx).registry
    adapter = reg.get(parsed.name)
    matches = reg.template_matches(adapter)
    if parsed.version is not None:
        v = reg.get_version(parsed.name, parsed.version)
        if as_json:
            print_json(
                {
                    "name": v.adapter,
                    "base_model": adapter.base_model,
                    "aliases": [k for k, n in adapter.aliases.items() if n == v.version],
                    **v.model_dump(mode="json", exclude={"adapter"}),
                    "template_matches": matches[v.version],
                }
            )
            return
        out.print(f"[bold]{v.ref}[/bold]  {v.status}  aliases: {_aliases_of(adapter, v.version) or '-'}")
        out.print(f"  template_matches: {_yes_no(matches[v.version])}", markup=False)
        for key in (
            "digest",
            "rank",
            "alpha",
            "target_modules",
            "size_bytes",
            "dataset",
            "chat_template_hash",
            "created_by",
            "created_at",
        ):
            out.print(f"  {key}: {getattr(v, key)}", markup=False)
        for section in ("metrics", "training_config", "eval_report"):
            value = getattr(v, section)
            if value:
                out.print(f"  {section}: {json.dumps(value, sort_keys=True)}", markup=False)
        return
    if as_json:
        print_json(_adapter_json(adapter, matches))
        return
    out.print(f"[bold]{adapter.name}[/bold]  base: {adapter.base_model}  task: {adapter.task or '-'}")
    table = Table("version", "status", "aliases", "digest", "rank", "dataset", "template", "created")
    for v in adapter.versions:
        table.add_row(
            f"v{v.version}",
            v.status,
            _aliases_of(adapter, v.version) or "-",
            v.digest[:12],
            str(v.rank),
            v.dataset or "-",
            _yes_no(matches[v.version]),
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)


@app.command()
@guarded
def history(ctx: typer.Context, name: Annotated[str, typer.Argument()], as_json: JsonFlag = False) -> None:
    """Alias moves and audit events of an adapter, oldest first."""
    h = state(ctx).registry.history(parse_ref(name, param="name").name)
    if as_json:
        print_json(h.model_dump(mode="json"))
        return
    for e in h.events:
        change = f"{_brief(e.before)} -> {_brief(e.after)}" if e.before else _brief(e.after)
        out.print(
            f"r{e.revision:<5} {e.at:%Y-%m-%d %H:%M:%S}  {e.actor:<10} {e.action:<17} {e.target:<28} "
            f"{change}",
            markup=False,
        )


def _brief(data: dict[str, Any] | None) -> str:
    if not data:
        return "-"
    return " ".join(f"{k}={(v[:12] if isinstance(v, str) and len(v) == 64 else v)}" for k, v in data.items())


@app.command()
@guarded
def diff(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    a: Annotated[str, typer.Argument(metavar="vA")],
    b: Annotated[str, typer.Argument(metavar="vB")],
    as_json: JsonFlag = False,
) -> None:
    """Config, metrics, weights and dataset differences between two versions."""
    changes = state(ctx).registry.diff(
        parse_ref(name, param="name").name, parse_version(a, param="vA"), parse_version(b, param="vB")
    )
    if as_json:
        print_json(
            {
                section: {k: {"a": x, "b": y} for k, (x, y) in keys.items()}
                for section, keys in changes.items()
            }
        )
        return
    if not changes:
        out.print("no differences")
        return
    table = Table("section", "key", a, b)
    for section, keys in changes.items():
        for key, (x, y) in keys.items():
            table.add_row(section, key, json.dumps(x), json.dumps(y))
    out.print(table)


@app.command()
@guarded
def promote(
    ctx: typer.Context,
    first: Annotated[str | None, typer.Argument(metavar="[NAME]", show_default=False)] = None,
    second: Annotated[str | None, typer.Argument(metavar="vN", show_default=False)] = None,
    alias: AliasOpt = DEFAULT_ALIAS,
    expect: Annotated[
        str | None,
        typer.Option(help="Compare-and-swap: refuse unless the alias still points at this version."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Override the promotion gate (needs --reason; audited).")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why the gate is overridden (with --force).")] = None,
) -> None:
    """Point an alias (default: production) at version vN.

    A gated alias (gate.aliases, default production) first checks the version's latest
    eval report (`loraflow eval NAME@vN`) against the gate policy, and refuses with
    exit code 4 naming each rule that fails and by how much.
    """
    name, version = _name_and_version(ctx, first, second)
    expected = parse_version(expect, param="expect") if expect is not None else None
    reg = state(ctx).registry
    move = reg.promote(name, version, alias=alias, expect=expected, force=force, reason=reason)
    before = f"v{move.from_version}" if move.from_version is not None else "nothing"
    out.print(f"{name}:{alias} -> v{move.to_version} (was {before}; revision {move.revision})")
    if force:
        out.print(f"forced past the gate: {reason}", markup=False)


@app.command()
@guarded
def rollback(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", show_default=False)] = None,
    alias: AliasOpt = DEFAULT_ALIAS,
) -> None:
    """Move an alias back to the version it pointed at before its last move."""
    adapter = _default_name(ctx, name)
    move = state(ctx).registry.rollback(adapter, alias=alias)
    out.print(
        f"{adapter}:{alias} -> v{move.to_version} (rolled back from v{move.from_version}; "
        f"revision {move.revision})"
    )


@app.command()
@guarded
def archive(ctx: typer.Context, ref: Annotated[str, typer.Argument(metavar="NAME@vN")]) -> None:
    """Archive a version so it can no longer be promoted or served."""
    parsed = parse_ref(ref, param="NAME@vN")
    if parsed.version is None:
        raise InvalidArgumentError(f"archive takes NAME@vN, got {ref!r}", param="NAME@vN")
    v = state(ctx).registry.archive(parsed.name, parsed.version)
    out.print(f"archived {v.ref}")


def main() -> None:
    app()
