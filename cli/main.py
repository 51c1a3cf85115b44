"""`loraflow …`: the whole command line. Each noun is its own Typer app, mounted here."""

from __future__ import annotations

from typing import Annotated

import typer

from loraflow.cli import (
    adapters,
    config,
    data,
    db,
    demo,
    dev,
    drift,
    engine,
    evaluate,
    flywheel,
    keys,
    serve,
    traffic,
    train,
    ui,
)

app = typer.Typer(
    name="loraflow",
    help="Train, version and serve LoRA adapters over one base model.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"loraflow {version('loraflow')}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Train, version and serve LoRA adapters over one base model."""


app.add_typer(config.app, name="config")
app.add_typer(adapters.app, name="adapters")
app.add_typer(db.app, name="db")
app.add_typer(data.app, name="data")
app.add_typer(dev.app, name="dev")
app.add_typer(keys.app, name="keys")
app.add_typer(traffic.app, name="traffic")
app.add_typer(flywheel.app, name="flywheel")
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("drift")(drift.drift)
app.command("serve")(serve.serve)
app.command("engine")(engine.engine)
app.command("demo")(demo.demo)
app.command("ui")(ui.ui)


def main() -> None:
    app()
