"""`loraflow dev …`: tools for development and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from loraflow.cli.common import guarded, out

app = typer.Typer(name="dev", help="Development tools.", no_args_is_help=True, add_completion=False)


@app.command("tiny-model")
@guarded
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR")],
    seed: Annotated[int, typer.Option()] = 0,
    max_position_embeddings: Annotated[
        int, typer.Option(min=64, help="Its context length (config.json max_position_embeddings).")
    ] = 1024,
    force: Annotated[
        bool, typer.Option("--force", help="Write into OUT_DIR even if it holds files.")
    ] = False,
) -> None:
    """Build a tiny random Llama model with a trained tokenizer and chat template (no network).

    OUT_DIR must be a new or empty folder (or pass --force).

    Example: loraflow dev tiny-model ./models/tiny-llama
    """
    from loraflow.trainer.tiny import build_tiny_model

    build_tiny_model(out_dir, seed=seed, max_position_embeddings=max_position_embeddings, overwrite=force)
    out.print(f"tiny Llama model written to {out_dir}", markup=False)
