"""`loraflow data …`: validate a training file, and prepare it into a registered dataset version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from loraflow.cli.common import guarded, out, print_json, state
from loraflow.registry.errors import InvalidArgumentError

if TYPE_CHECKING:
    from loraflow.trainer.data import Validation

app = typer.Typer(
    name="data", help="Validate and prepare training data.", no_args_is_help=True, add_completion=False
)

BaseOpt = Annotated[
    str | None, typer.Option("--base", help="Base model whose tokenizer and chat template count tokens.")
]
MaxLenOpt = Annotated[int | None, typer.Option("--max-length", help="Longest example in tokens.")]


def _validate(
    ctx: typer.Context, file: Path, base: str | None, max_length: int | None, *, need_base: bool
) -> Validation:
    """Structure always; token lengths too when a base is given or configured (trainer.base_model)."""
    from loraflow.trainer.data import validate_file, validate_for_base

    settings = state(ctx).get_settings()
    base = base or settings.trainer.base_model
    if not base:
        if need_base:
            raise InvalidArgumentError(
                "a base model is needed to count tokens: pass --base or set trainer.base_model "
                "in loraflow.toml",
                param="base",
            )
        return validate_file(file, system_prompt=settings.trainer.system_prompt)
    return validate_for_base(
        file,
        base,
        max_length=max_length or settings.trainer.max_length,
        system_prompt=settings.trainer.system_prompt,
    )


@app.command()
@guarded
def validate(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL or Parquet file.")],
    base: BaseOpt = None,
    max_length: MaxLenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Report every bad line (1-based) with its reason; for a good file, counts and token lengths.

    Without a base model (--base or trainer.base_model) it checks structure only.
    """
    result = _validate(ctx, file, base, max_length, need_base=False)
    summary = result.summary()
    if as_json:
        print_json(
            summary
            | {
                "token_lengths_checked": result.max_length is not None,
                "errors": [{"line": e.line, "reason": e.reason} for e in result.errors],
            }
        )
    else:
        for error in result.errors:
            out.print(f"{file}:{error.line}: {error.reason}", markup=False)
        tokens = summary["tokens"]
        out.print(
            f"{summary['examples']} good examples, {summary['bad_lines']} bad lines; "
            f"formats {summary['formats']}" + (f"; labels {summary['labels']}" if summary["labels"] else ""),
            markup=False,
        )
        if result.max_length is None:
            out.print("token lengths not checked: pass --base (or set trainer.base_model) to count them")
        elif tokens.get("total"):
            out.print(
                f"tokens per example: min {tokens['min']} p50 {tokens['p50']} p90 {tokens['p90']} "
                f"p99 {tokens['p99']} max {tokens['max']} (max_length {result.max_length}); "
                f"total training tokens {tokens['total']}"
            )
    if not result.ok:
        raise typer.Exit(2)


@app.command()
@guarded
def prepare(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL or Parquet file.")],
    name: Annotated[str, typer.Option("--name", help="Dataset name; registers its next version.")],
    base: BaseOpt = None,
    max_length: MaxLenOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Share held out for validation.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share held out for testing.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    near_duplicate_threshold: Annotated[float, typer.Option(help="MinHash Jaccard threshold.")] = 0.85,
    embeddings: Annotated[
        bool, typer.Option(help="Record an embedding profile of the training split.")
    ] = True,
) -> None:
    """Deduplicate, split, profile and register FILE as the next version of dataset NAME."""
    from loraflow.registry.refs import check_name
    from loraflow.trainer.prepare import prepare as run_prepare

    check_name(name, param="name")
    if not 0 < near_duplicate_threshold <= 1:
        raise InvalidArgumentError(
            "--near-duplicate-threshold must be in (0, 1]", param="near_duplicate_threshold"
        )
    result = _validate(ctx, file, base, max_length, need_base=True)
    for error in result.errors:
        out.print(f"{file}:{error.line}: {error.reason}", markup=False)
    embedder = None
    if embeddings:
        from loraflow.trainer.embed import Embedder

        embedder = Embedder()
    version, report = run_prepare(
        result,
        name=name,
        registry=state(ctx).registry,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        near_duplicate_threshold=near_duplicate_threshold,
        embedder=embedder,
    )
    out.print(
        f"registered dataset {version.ref} (digest {version.digest[:12]}): "
        f"train {version.counts['train']}, val {version.counts['val']}, test {version.counts['test']}; "
        f"dropped {report['exact_duplicates_dropped']} exact and {report['near_duplicates_dropped']} near "
        f"duplicates; split overlap {report['overlap_after_normalization']}"
    )
