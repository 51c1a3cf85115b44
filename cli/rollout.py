"""`adapters rollout …`: progressive delivery of an adapter version (shadow, then canary steps).

The gateways' controller advances and rolls back a running rollout on its own; these commands
start one, show where it stands and what its figures say, and pause, resume or abort it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.cli.refs import JsonFlag, adapter_ref, resolve_version
from loraflow.registry.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from loraflow.registry import domain
    from loraflow.registry.rollouts import Decision

app: typer.Typer = typer.Typer(
    name="rollout",
    help="Roll a version out on live traffic: shadow, then canary steps, advanced or rolled back on "
    "the live figures by the gateways.",
    no_args_is_help=True,
)

NameArg = Annotated[
    str | None,
    typer.Argument(metavar="NAME", help="The adapter (default: default_adapter).", show_default=False),
]
Percent = Annotated[float | None, typer.Option(min=0, max=100, show_default=False)]


def _name(ctx: typer.Context, text: str | None) -> str:
    ref = adapter_ref(ctx, text, param="NAME")
    if ref.version is not None or ref.alias is not None:
        raise InvalidArgumentError(f"a rollout is named by its adapter: write {ref.name}", param="NAME")
    return ref.name


def _steps(
    ctx: typer.Context, shadow: float | None, canary: float | None, policy: str | None
) -> list[domain.RolloutStep] | None:
    """The steps ``--shadow``/``--canary`` ask for, followed by the later steps of ``--policy`` when
    one is named too; None: the policy's own steps."""
    from loraflow.registry.domain import RolloutStep

    if not shadow and not canary:
        if shadow == 0 or canary == 0:
            raise InvalidArgumentError(
                "--shadow 0 and --canary 0 send the candidate nothing: give one a share above 0",
                param="canary" if canary == 0 else "shadow",
            )
        return None
    steps = ([RolloutStep(shadow=shadow)] if shadow else []) + (
        [RolloutStep(canary=canary)] if canary else []
    )
    if policy is not None:  # the policy's steps beyond the ones asked for
        top = canary or 0.0
        more = state(ctx).get_settings().rollout.policy(policy).steps
        steps += [step for step in more if step.canary > top]
    return steps


def _rollout_json(r: domain.RolloutInfo, verdict: Decision | None = None) -> dict[str, Any]:
    data = r.model_dump(mode="json")
    data["current"] = r.current.model_dump(mode="json")
    if verdict is not None:
        data["now"] = {"action": verdict.action, "reason": verdict.reason, "figures": verdict.figures}
    return data


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _print_status(r: domain.RolloutInfo, verdict: Decision | None) -> None:
    name = escape(r.adapter)
    steps = ", ".join(
        f"{'[bold]' if i == r.step else ''}{s}{'[/bold]' if i == r.step else ''}"
        for i, s in enumerate(r.steps)
    )
    out.print(
        f"[bold]{name}[/bold]: v{r.baseline} (production) -> v{r.candidate}, rollout #{r.id}, "
        f"policy {escape(r.policy)}, {r.state}"
    )
    out.print(
        f"steps: {steps}; at step {r.step + 1} of {len(r.steps)} since {r.step_started_at:%Y-%m-%d %H:%M:%S}"
    )
    if verdict is not None:
        figures = verdict.figures
        table = Table(box=box.SIMPLE, pad_edge=False, collapse_padding=True)
        table.add_column("figure", no_wrap=True)
        table.add_column(f"v{r.candidate}", justify="right", no_wrap=True)
        table.add_column(f"v{r.baseline} (prod)", justify="right", no_wrap=True)
        table.add_column("cand - prod", justify="right", no_wrap=True)
        table.add_column("margin", justify="right", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        for guard in figures["guards"]:
            interval = guard["interval"]
            table.add_row(
                guard["name"],
                f"{_pct(guard['candidate'])}/{guard['n'][0]}",
                f"{_pct(guard['production'])}/{guard['n'][1]}",
                f"{interval[0]:+.2f}..{interval[1]:+.2f}" if interval else "-",
                f"{guard['margin']:g}",
                guard["verdict"],
            )
        cand, prod = figures["candidate"], figures["production"]
        for key, label, fmt in (
            ("requests", "requests", str),
            ("latency_p50_s", "latency p50", _seconds),
            ("latency_p99_s", "latency p99", _seconds),
            ("ttft_p99_s", "TTFT p99", _seconds),
            ("refusal_rate", "refusals", _pct),
        ):
            table.add_row(label, fmt(cand[key]), fmt(prod[key]), "", "", "")
        if figures.get("agreement") is not None:
            table.add_row("same answer", _pct(figures["agreement"]), "", "", "", "")
        out.print(table)
        out.print("Rates: share/count; cand - prod: the always-valid interval of the difference.")
        out.print(f"now: [bold]{verdict.action}[/bold]: {escape(verdict.reason)}")
    for d in r.decisions[-5:]:
        reason = f": {escape(d.reason)}" if d.reason else ""
        out.print(f"  {d.at:%H:%M:%S} {d.action} at step {d.step + 1} by {escape(d.actor)}{reason}")


@app.command()
@guarded
def start(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="NAME@vN", help="The candidate version.")],
    shadow: Percent = None,
    canary: Percent = None,
    policy: Annotated[
        str | None,
        typer.Option(help="A policy of [rollout.policies] (default: default).", show_default=False),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start past the offline gate (needs --reason; audited).")
    ] = False,
    reason: Annotated[str | None, typer.Option(help="Why the gate is overridden (with --force).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Start rolling a version out from production, checked by the offline gate like `promote`.

    Without --shadow/--canary the policy's steps apply (default: shadow 10%, then canary 5%, 25%,
    100%). --canary 20 alone holds at 20%: it still rolls back on its own, and goes further when
    asked (`rollout resume NAME --to 100`) or when --policy names more steps.

    Example: loraflow adapters rollout start support@v3 --shadow 10 --canary 5 --policy default
    """
    name, version = resolve_version(ctx, ref, param="NAME@vN")
    steps = _steps(ctx, shadow, canary, policy)
    started = state(ctx).registry.start_rollout(
        name, version, policy=policy or "default", steps=steps, force=force, reason=reason
    )
    if as_json:
        print_json(_rollout_json(started))
        return
    out.print(
        f"rollout #{started.id} of {escape(name)}: v{started.baseline} -> v{started.candidate}, "
        f"steps {', '.join(str(s) for s in started.steps)}"
    )
    if force:
        out.print(f"forced past the gate: {reason}", markup=False)
    out.print(f"follow it with: adapters rollout status {escape(name)}")


@app.command()
@guarded
def status(ctx: typer.Context, name: NameArg = None, as_json: JsonFlag = False) -> None:
    """Show the rollout's step, weights, and each guard with its interval and verdict.

    The figures are those the controller decides on: every gateway's counts of the current step,
    each rate guard with its always-valid interval of candidate minus production, and what they
    say now (advance, rollback, wait, hold). Without a running rollout, the adapter's last one.
    The policy's margins are read from this command's settings, so keep [rollout.policies] the
    same on the gateways and where you run it.

    Example: loraflow adapters rollout status support --json
    """
    adapter = _name(ctx, name)
    reg = state(ctx).registry
    rollouts = reg.rollouts(adapter)
    if not rollouts:
        reg.get(adapter)  # an unknown adapter is its own error
        raise NotFoundError(
            f"{adapter} has had no rollout: start one with `adapters rollout start`", param="NAME"
        )
    latest = rollouts[-1]
    verdict = reg.rollout_verdict(latest, now=datetime.now(UTC)) if latest.active else None
    if as_json:
        print_json(_rollout_json(latest, verdict))
        return
    _print_status(latest, verdict)


@app.command()
@guarded
def pause(ctx: typer.Context, name: NameArg = None, as_json: JsonFlag = False) -> None:
    """Hold the rollout where it is: its weights stay, nothing advances or rolls back on its own.

    Example: loraflow adapters rollout pause support
    """
    paused = state(ctx).registry.pause_rollout(_name(ctx, name))
    if as_json:
        print_json(_rollout_json(paused))
        return
    out.print(f"rollout #{paused.id} of {escape(paused.adapter)} paused at {paused.current}")


@app.command()
@guarded
def resume(
    ctx: typer.Context,
    name: NameArg = None,
    to: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=100,
            help="Add a last step at this canary percent, taken when the current step passes.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Let a paused or held rollout move on again.

    --to 100 adds a last step at full traffic to a held rollout: once its guards pass there, the
    candidate becomes production.

    Example: loraflow adapters rollout resume support --to 100
    """
    resumed = state(ctx).registry.resume_rollout(_name(ctx, name), to=to)
    if as_json:
        print_json(_rollout_json(resumed))
        return
    out.print(f"rollout #{resumed.id} of {escape(resumed.adapter)} running at {resumed.current}")


@app.command()
@guarded
def abort(
    ctx: typer.Context,
    name: NameArg = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the audit log).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """End the rollout now; production stays where it is.

    Example: loraflow adapters rollout abort support --reason "wrong dataset"
    """
    ended = state(ctx).registry.abort_rollout(_name(ctx, name), reason=reason)
    if as_json:
        print_json(_rollout_json(ended))
        return
    out.print(f"rollout #{ended.id} of {escape(ended.adapter)} aborted; production stays v{ended.baseline}")
