"""`adapters …`: the registry's command line (also mounted as `loraflow adapters …`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraflow.cli import rollout
from loraflow.cli.common import err, guarded, out, print_json, state
from loraflow.cli.refs import JsonFlag, adapter_ref, resolve_version
from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.refs import (
    DEFAULT_ALIAS,
    parse_ref,
    parse_version,
    version_ref,
)

if TYPE_CHECKING:  # pydantic models, for annotations only: start-up stays light
    from loraflow.registry import domain

app = typer.Typer(
    name="adapters",
    help="Register, inspect, promote and roll back versioned LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # also as the `adapters` console script
)

AliasOpt = Annotated[str, typer.Option("--alias", "-a", help="The alias to move.")]
app.add_typer(rollout.app, name="rollout")


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


def _legacy_name_and_version(
    ctx: typer.Context, first: str | None, second: str | None, *, param: str
) -> tuple[str, int]:
    """``NAME vN`` (the older two-word form) or one reference (see :func:`resolve_version`)."""
    if second is None:
        return resolve_version(ctx, first, param=param)
    return parse_ref(first or "", param="name").name, parse_version(second, param=param)


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
    base: Annotated[
        str,
        typer.Option(
            "--base-model",
            "--base",
            help="Base model: local directory or Hugging Face id (--base also works).",
        ),
    ],
    task: Annotated[str | None, typer.Option(help="What the adapter is for.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset version it was trained on: NAME@vN.")] = None,
    metrics: Annotated[Path | None, typer.Option(help="JSON file of metrics.")] = None,
    config: Annotated[Path | None, typer.Option(help="JSON file of the training config.")] = None,
    eval_report: Annotated[Path | None, typer.Option(help="JSON file of the eval report.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Import an existing PEFT LoRA adapter as the next version of NAME.

    Example: loraflow adapters register support ./out/adapter --base-model Qwen/Qwen2.5-0.5B-Instruct
    """
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
    """List adapters with their aliases and latest version.

    Example: loraflow adapters list --json
    """
    reg = state(ctx).existing_registry  # reads: a missing SQLite file is named, not created
    adapters = reg.adapters()
    if as_json:
        print_json([_adapter_json(a, reg.template_matches(a)) for a in adapters])
        return
    table = Table("name", "base model", "latest", "aliases", "versions")
    for a in adapters:
        latest = f"v{a.latest.version}" if a.latest else "-"
        aliases = ", ".join(f"{k}=v{v}" for k, v in a.aliases.items()) or "-"
        table.add_row(a.name, escape(a.base_model), latest, aliases, str(len(a.versions)))
    if not adapters:
        out.print(f"no adapters registered in {state(ctx).database()}", markup=False)
        return
    out.print(table)


@app.command()
@guarded
def show(
    ctx: typer.Context,
    ref: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME|NAME@vN|NAME:ALIAS",
            help="An adapter, or one version of it (default: default_adapter).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show an adapter and its versions, or a summary of one version.

    A version's summary has its key metrics, its loss at the start and end of training, the
    latest `loraflow eval` headline and the gate's verdict; --json has everything (training
    config, loss curves, eval reports and the stored evaluations, newest first).

    Example: loraflow adapters show support@v3   (or support:production)
    """
    parsed = adapter_ref(ctx, ref, param="NAME[@vN]")
    reg = state(ctx).existing_registry
    adapter = reg.get(parsed.name)
    matches = reg.template_matches(adapter)
    if parsed.version is None and parsed.alias is None:
        if as_json:
            print_json(_adapter_json(adapter, matches))
            return
        _print_adapter(adapter, matches)
        return
    v = reg.resolve(parsed)
    evaluations = list(reversed(reg.evaluations(v.adapter, v.version)))
    decision = reg.gate(v.adapter, v.version)
    if as_json:
        print_json(
            {
                "name": v.adapter,
                "base_model": adapter.base_model,
                "aliases": [k for k, n in adapter.aliases.items() if n == v.version],
                **v.model_dump(mode="json", exclude={"adapter"}),
                "template_matches": matches[v.version],
                "evaluations": [e.model_dump(mode="json") for e in evaluations],
                "gate": decision.to_json() | {"message": decision.message()},
            }
        )
        return
    _print_version_summary(adapter, v, matches[v.version], evaluations, decision.message())


def _print_adapter(adapter: domain.AdapterInfo, matches: dict[int, bool | None]) -> None:
    out.print(
        f"[bold]{adapter.name}[/bold]  base: {escape(adapter.base_model)}  "
        f"task: {escape(adapter.task or '-')}"
    )
    table = Table("version", "status", "aliases", "digest", "rank", "dataset", "template", "created")
    for v in adapter.versions:
        table.add_row(
            f"v{v.version}",
            v.status,
            _aliases_of(adapter, v.version) or "-",
            v.digest[:12],
            str(v.rank),
            escape(v.dataset or "-"),
            _yes_no(matches[v.version]),
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(table)


KEY_METRICS = ("eval_loss", "base_eval_loss", "best_eval_loss", "train_loss", "steps", "epochs")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(x) for x in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _curve(points: Any) -> str | None:
    """``[[step, loss], ...]`` as "2.31 (step 1) -> 0.52 (step 30)"; None for anything else (metrics
    registered with `adapters register --metrics` may hold any JSON)."""
    if not isinstance(points, list) or not points:
        return None
    ends = points[0], points[-1]
    if not all(isinstance(p, list | tuple) and len(p) == 2 for p in ends):
        return None
    (s0, l0), (s1, l1) = ends
    return f"{_fmt(l0)} (step {s0}) -> {_fmt(l1)} (step {s1}), {len(points)} points"


def _print_version_summary(
    adapter: domain.AdapterInfo,
    v: domain.VersionInfo,
    template: bool | None,
    evaluations: list[domain.EvaluationInfo],
    verdict: str,
) -> None:
    from loraflow.cli.eval_report import headline

    def line(label: str, value: str) -> None:
        out.print(f"  {label}: {value}", markup=False)

    out.print(f"[bold]{v.ref}[/bold]  {v.status}  aliases: {_aliases_of(adapter, v.version) or '-'}")
    line("base model", f"{adapter.base_model} (chat template matches: {_yes_no(template)})")
    line("weights", f"r={v.rank} alpha={_fmt(v.alpha)} on {_fmt(v.target_modules)}, {v.size_bytes} bytes")
    line("digest", v.digest)
    line("dataset", v.dataset or "- (not recorded)")
    line("created", f"{v.created_at:%Y-%m-%d %H:%M:%S %Z} by {v.created_by}")
    metrics = v.metrics or {}
    shown = [k for k in KEY_METRICS if k in metrics] or [
        k for k, x in metrics.items() if isinstance(x, int | float | str | bool)
    ]
    if shown:
        line("metrics", ", ".join(f"{k} {_fmt(metrics[k])}" for k in shown))
    for label, key in (("training loss", "loss_curve"), ("eval loss", "eval_curve")):
        curve = _curve(metrics.get(key))
        if curve:
            line(label, curve)
    report = v.eval_report or {}
    if report.get("n") and isinstance(report.get("adapter"), dict):
        base = report["base"] if isinstance(report.get("base"), dict) else {}
        scores = ", ".join(
            f"{k} {_fmt(x)} (base {_fmt(base.get(k))})"
            for k, x in report["adapter"].items()
            if isinstance(x, int | float)
        )
        line(f"held out at training ({report['n']} generations)", scores or "-")
    if evaluations:
        latest = evaluations[0]
        line(
            f"latest eval (evaluation {latest.id}, {latest.created_at:%Y-%m-%d %H:%M})",
            headline(latest.report),
        )
        if len(evaluations) > 1:
            line("earlier evals", ", ".join(str(e.id) for e in evaluations[1:]))
    else:
        line("latest eval", f"none yet: loraflow eval {v.ref}")
    line("gate", verdict)
    line(
        "full reports",
        f"loraflow adapters show {v.ref} --json (training config, curves, eval reports, "
        f"evaluations); loraflow eval {v.ref} --html FILE",
    )


@app.command()
@guarded
def history(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="Default: default_adapter.", show_default=False)
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Alias moves and audit events of an adapter, oldest first.

    Example: loraflow adapters history support --json
    """
    h = state(ctx).existing_registry.history(adapter_ref(ctx, name, param="name").name)
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
    """An audit event's before/after as ``key=value`` words; a gate decision as its verdict."""
    if not data:
        return "-"
    words = []
    for k, v in data.items():
        if k == "gate" and isinstance(v, dict):
            words.append(f"gate={'passed' if v.get('passed') else 'refused'}")
        elif isinstance(v, str) and len(v) == 64:
            words.append(f"{k}={v[:12]}")
        else:
            words.append(f"{k}={_fmt(v)}")
    return " ".join(words)


@app.command()
@guarded
def diff(
    ctx: typer.Context,
    a: Annotated[str, typer.Argument(metavar="A", help="NAME@vN, NAME:ALIAS (or NAME in NAME vA vB).")],
    b: Annotated[str, typer.Argument(metavar="B", help="NAME@vN or NAME:ALIAS (or vA).")],
    c: Annotated[str | None, typer.Argument(metavar="vB", show_default=False)] = None,
    as_json: JsonFlag = False,
) -> None:
    """Config, metrics, weights and dataset differences between two versions of one adapter.

    Example: loraflow adapters diff support@v1 support@v2   (also: support v1 v2, support:production @v3)
    """
    reg = state(ctx).existing_registry  # opened first: the versions below are resolved in it
    if c is not None:
        name = parse_ref(a, param="name").name
        va, vb = parse_version(b, param="vA"), parse_version(c, param="vB")
    else:
        name, va = resolve_version(ctx, a, param="A")
        other, vb = resolve_version(ctx, b, param="B")
        if other != name:
            raise InvalidArgumentError(
                f"diff compares two versions of one adapter, not {name} and {other}", param="B"
            )
    changes = reg.diff(name, va, vb)
    if as_json:
        print_json(
            {
                section: {k: {"a": x, "b": y} for k, (x, y) in keys.items()}
                for section, keys in changes.items()
            }
        )
        return
    if not changes:
        out.print(f"no differences between {version_ref(name, va)} and {version_ref(name, vb)}")
        return
    table = Table("section", "key", f"v{va}", f"v{vb}")
    for section, keys in changes.items():
        for key, (x, y) in keys.items():
            table.add_row(section, escape(key), escape(json.dumps(x)), escape(json.dumps(y)))
    out.print(table)


def _move_json(move: domain.AliasMoveInfo, **extra: Any) -> dict[str, Any]:
    return move.model_dump(mode="json") | extra


@app.command()
@guarded
def promote(
    ctx: typer.Context,
    first: Annotated[
        str | None,
        typer.Argument(
            metavar="REF", help="NAME@vN or NAME:ALIAS (older form: NAME vN).", show_default=False
        ),
    ] = None,
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
    as_json: JsonFlag = False,
) -> None:
    """Point an alias (default: production) at a version.

    A gated alias (gate.aliases, default production) first checks the version's latest
    eval report (`loraflow eval NAME@vN`) against the gate policy, and refuses with
    exit code 4 naming each rule that fails and by how much. An alias name the adapter
    does not have yet is created, with a warning that lists the existing ones.

    Example: loraflow adapters promote support@v3   (or: support:staging, support v3, v3 with default_adapter)
    """
    name, version = _legacy_name_and_version(ctx, first, second, param="version")
    expected = parse_version(expect, param="expect") if expect is not None else None
    reg = state(ctx).registry
    existing = reg.get(name).aliases
    created = alias not in existing
    move = reg.promote(name, version, alias=alias, expect=expected, force=force, reason=reason)
    if created and (existing or alias != DEFAULT_ALIAS):  # said once the alias exists (a typo shows)
        err.print(
            f"warning: created new alias '{alias}' on {name} "
            f"(existing: {', '.join(sorted(existing)) or 'none'})",
            markup=False,
        )
    if as_json:
        print_json(_move_json(move, created_alias=created, forced=force))
        return
    before = f"v{move.from_version}" if move.from_version is not None else "nothing"
    out.print(f"{name}:{alias} -> v{move.to_version} (was {before}; revision {move.revision})")
    if force:
        out.print(f"forced past the gate: {reason}", markup=False)


@app.command()
@guarded
def rollback(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME|NAME:ALIAS", help="Default: default_adapter.", show_default=False),
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(
            "--alias", "-a", help="The alias to move (default: production, or the one in NAME:ALIAS)."
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Move an alias back to the version it pointed at before its last move forward.

    Each rollback undoes one promotion that no earlier rollback undid, so repeated rollbacks
    walk back through history (v1 -> v2 -> v3, rollback -> v2, rollback -> v1); when there is
    nothing left to undo it exits 4 and changes nothing.

    Example: loraflow adapters rollback support   (or support:staging)
    """
    ref = adapter_ref(ctx, name, param="name")
    if ref.version is not None:
        raise InvalidArgumentError(
            f"rollback moves an alias: write {ref.name} or {ref.name}:ALIAS, not a version", param="name"
        )
    if ref.alias and alias and ref.alias != alias:
        raise InvalidArgumentError(
            f"{name} names alias {ref.alias!r} but --alias says {alias!r}", param="alias"
        )
    which = ref.alias or alias or DEFAULT_ALIAS
    move = state(ctx).registry.rollback(ref.name, alias=which)
    if as_json:
        print_json(_move_json(move))
        return
    out.print(
        f"{ref.name}:{which} -> v{move.to_version} (rolled back from v{move.from_version}; "
        f"revision {move.revision})"
    )


@app.command()
@guarded
def archive(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(metavar="NAME@vN", help="The version (also @vN with default_adapter).")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Archive a version so it can no longer be promoted or served.

    A version an alias points at is refused (exit 4): promote another version, or
    `adapters alias delete NAME:ALIAS`, first.

    Example: loraflow adapters archive support@v1
    """
    name, version = resolve_version(ctx, ref, param="NAME@vN")
    v = state(ctx).registry.archive(name, version)
    if as_json:
        print_json({"name": v.adapter, **_version_json(v)})
        return
    out.print(f"archived {v.ref}")


alias_app = typer.Typer(name="alias", help="Manage an adapter's aliases.", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


@alias_app.command("delete")
@guarded
def alias_delete(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(metavar="NAME:ALIAS", help="The alias (also :ALIAS with default_adapter).")
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Needed for production and the gated aliases (gate.aliases).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Delete an alias (audited; its moves stay in `history`). A later promote creates it afresh.

    production (what requests for NAME are served by) and the gated aliases need --force.

    Example: loraflow adapters alias delete support:prod
    """
    parsed = adapter_ref(ctx, ref, param="NAME:ALIAS")
    if parsed.alias is None:
        raise InvalidArgumentError(f"alias delete takes NAME:ALIAS, got {ref!r}", param="NAME:ALIAS")
    version = state(ctx).registry.delete_alias(parsed.name, parsed.alias, force=force)
    if as_json:
        print_json({"adapter": parsed.name, "alias": parsed.alias, "version": version, "deleted": True})
        return
    out.print(f"deleted {parsed.name}:{parsed.alias} (pointed at v{version})")


def main() -> None:
    app()
