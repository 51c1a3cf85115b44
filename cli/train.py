"""`loraflow train`: train a LoRA/QLoRA adapter on a registered dataset and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraflow.cli.common import guarded, out, state


@guarded
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="YAML or TOML run config.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter name.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (local folder or hub id).")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset: NAME or NAME@vN.")] = None,
    qlora: Annotated[bool | None, typer.Option("--qlora/--no-qlora", help="4-bit NF4 base.")] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank.")] = None,
    alpha: Annotated[int | None, typer.Option(help="LoRA alpha.")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    grad_accum: Annotated[int | None, typer.Option()] = None,
    eval_steps: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Checkpoint folder.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
) -> None:
    """Train on a registered dataset and register the adapter as its next version."""
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
    out.print(
        f"registered {result.version.ref}: eval_loss {m['eval_loss']} (base {m['base_eval_loss']}), "
        f"{m['steps']} steps, {m['tokens_per_second']} tokens/s, {m['wall_time_s']} s"
    )
    if rep.get("n"):
        a, b = rep["adapter"], rep["base"]
        out.print(
            f"held-out ({rep['n']}): exact {a['exact_match']} vs base {b['exact_match']}; "
            f"stops by itself {a['stop_rate']} vs {b['stop_rate']}; "
            f"valid JSON {a.get('json_valid')} vs {b.get('json_valid')}"
        )
