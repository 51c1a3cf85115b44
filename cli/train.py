"""`loraflow train`: train a LoRA/QLoRA adapter on a registered dataset and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraflow.cli.common import guarded, out, print_json, state


@guarded
def train(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML, TOML or JSON run config; its keys: docs/train-config.md."),
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter name; registers its next version.")] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base-model", "--base", help="Base model: local folder or hub id. Default: trainer.base_model."
        ),
    ] = None,
    data: Annotated[str | None, typer.Option(help="Dataset: NAME or NAME@vN.")] = None,
    qlora: Annotated[
        bool | None, typer.Option("--qlora/--no-qlora", help="4-bit NF4 base. Default: off.")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training split. Default: 3.")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps. Default: -1 (use --epochs).")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate. Default: 2e-4.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank. Default: 16.")] = None,
    alpha: Annotated[int | None, typer.Option(help="LoRA alpha. Default: 32.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per device step. Default: 8.")] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Gradient accumulation steps per optimizer step. Default: 1.")
    ] = None,
    eval_steps: Annotated[
        int | None, typer.Option(help="Evaluate on the validation split every N steps. Default: 20.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for initialisation and shuffling. Default: 0.")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Checkpoint folder. Default: $LORAFLOW_HOME/runs/ADAPTER.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the registered version, metrics and eval report as JSON.")
    ] = False,
) -> None:
    """Train on a registered dataset and register the adapter as its next version.

    Flags override the --config file; every key of that file, with its default, is in
    docs/train-config.md.

    Example: loraflow train --adapter support --data tickets --base-model ./tiny --epochs 2
    """
    from loraflow.trainer.config import build_config
    from loraflow.trainer.train import train as run_train

    app = state(ctx)
    settings = app.get_settings()
    cfg = build_config(
        config,
        {
            "adapter": adapter,
            "base": base or (None if config else settings.trainer.base_model),
            "data": data,
            "qlora": qlora,
            "epochs": epochs,
            "max_steps": max_steps,
            "learning_rate": lr,
            "r": r,
            "alpha": alpha,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "eval_steps": eval_steps,
            "seed": seed,
            "output_dir": output_dir,
        },
    )
    result = run_train(cfg, registry=app.registry, settings=settings, resume=resume)
    m, rep = result.metrics, result.eval_report
    if as_json:
        print_json(
            {"name": result.version.adapter, "ref": result.version.ref}
            | result.version.model_dump(mode="json", exclude={"adapter"})
        )
        return
    out.print(
        f"registered {result.version.ref}: eval_loss {m['eval_loss']} (base {m['base_eval_loss']}), "
        f"{m['steps']} steps, {m['tokens_per_second']} tokens/s, {m['wall_time_s']} s"
    )
    if rep.get("n"):
        a, b = rep["adapter"], rep["base"]
        out.print(
            f"held-out ({rep['n']}): exact {a['exact_match']} vs base {b['exact_match']}; "
            f"stops by itself {a['stop_rate']} vs {b['stop_rate']}"
            + (
                f"; valid JSON {a['json_valid']} vs {b.get('json_valid')}"
                if a.get("json_valid") is not None
                else ""
            )
        )
