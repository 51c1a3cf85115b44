"""`loraflow data …`: validate a training file, and prepare it into a registered dataset version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from loraflow.cli.common import err, guarded, out, print_json, state
from loraflow.registry.errors import InvalidArgumentError

if TYPE_CHECKING:
    from loraflow.trainer.data import Validation

app = typer.Typer(
    name="data", help="Validate and prepare training data.", no_args_is_help=True, add_completion=False
)

BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        "--base",
        help="Base model whose tokenizer and chat template count tokens (default trainer.base_model).",
    ),
]
MaxLenOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        min=8,
        help="Longest example in tokens (default trainer.max_length); needs a base model to count them.",
    ),
]


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
                "a base model is needed to count tokens: pass --base-model or set trainer.base_model "
                "in loraflow.toml",
                param="base",
            )
        if max_length is not None:
            raise InvalidArgumentError(
                "--max-length is counted in the base model's tokens: pass --base-model too (or set "
                "trainer.base_model in loraflow.toml)",
                param="max_length",
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

    Without a base model (--base-model or trainer.base_model) it checks structure only.

    Example: loraflow data validate tickets.jsonl --base-model ./models/tiny-llama
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
            f"formats {_counts(summary['formats'])}"
            + (f"; labels {_counts(summary['labels'])}" if summary["labels"] else ""),
            markup=False,
        )
        if result.max_length is None:
            out.print("token lengths not checked: pass --base-model (or set trainer.base_model) to count")
        elif tokens.get("total"):
            out.print(
                f"tokens per example: min {tokens['min']} p50 {tokens['p50']} p90 {tokens['p90']} "
                f"p99 {tokens['p99']} max {tokens['max']} (max_length {result.max_length}); "
                f"total training tokens {tokens['total']}"
            )
    if not result.ok:
        raise typer.Exit(2)


def _refuse_bad_lines(file: Path, result: Validation) -> None:
    # On stderr, with the error they lead to: stdout stays the command's result (pure JSON with --json).
    for error in result.errors:
        err.print(f"{file}:{error.line}: {error.reason}", markup=False)
    if not result.ok:
        raise InvalidArgumentError(
            f"{file} has {len(result.errors)} bad lines (listed above) and {len(result.examples)} good "
            "examples; nothing was prepared",
            param="FILE",
        )


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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the dataset version and report as JSON.")
    ] = False,
) -> None:
    """Deduplicate, split, profile and register FILE as the next version of dataset NAME.

    Example: loraflow data prepare tickets.jsonl --name tickets --base-model Qwen/Qwen2.5-0.5B-Instruct
    """
    from loraflow.registry.refs import check_name
    from loraflow.trainer.data import validate_file
    from loraflow.trainer.prepare import check_fractions
    from loraflow.trainer.prepare import prepare as run_prepare

    # Everything that can be checked before a model is loaded (the tokenizer, the embedding model).
    check_name(name, param="name")
    if not 0 < near_duplicate_threshold <= 1:
        raise InvalidArgumentError(
            "--near-duplicate-threshold must be in (0, 1]", param="near_duplicate_threshold"
        )
    check_fractions(val_fraction, test_fraction)
    _refuse_bad_lines(
        file, validate_file(file, system_prompt=state(ctx).get_settings().trainer.system_prompt)
    )
    result = _validate(ctx, file, base, max_length, need_base=True)  # token lengths: the tokenizer only
    _refuse_bad_lines(file, result)
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
    if as_json:
        print_json({"ref": version.ref} | version.model_dump(mode="json") | {"report": report})
        return
    out.print(
        f"registered dataset {version.ref} (digest {version.digest[:12]}): "
        f"train {version.counts['train']}, val {version.counts['val']}, test {version.counts['test']}; "
        f"dropped {report['exact_duplicates_dropped']} exact and {report['near_duplicates_dropped']} near "
        f"duplicates; split overlap {report['overlap_after_normalization']}"
    )


def _counts(counts: dict[str, int]) -> str:
    """``{"messages": 48}`` as ``messages 48``."""
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


@app.command("list")
@guarded
def list_(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered datasets (what `data prepare` and `flywheel build-dataset` made).

    Example: loraflow data list --json
    """
    versions = state(ctx).existing_registry.datasets()  # reads: a missing database is named, not made
    if as_json:
        print_json([{"ref": v.ref} | v.model_dump(mode="json") for v in versions])
        return
    if not versions:
        out.print(
            f"no datasets registered in {state(ctx).database()}: `loraflow data prepare FILE --name NAME` "
            "registers one",
            markup=False,
        )
        return
    from rich.table import Table

    latest: dict[str, list[Any]] = {}
    for v in versions:
        latest.setdefault(v.name, []).append(v)
    table = Table("name", "latest", "versions", "train", "val", "test", "source", "created")
    for name, vs in latest.items():
        v = vs[-1]
        table.add_row(
            name,
            f"v{v.version}",
            str(len(vs)),
            *(str(v.counts.get(split, 0)) for split in ("train", "val", "test")),
            escape(_source(v.lineage)),
            f"{v.created_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)


def _source(lineage: dict[str, Any]) -> str:
    if lineage.get("kind") == "file":
        return str(lineage.get("source", "file"))
    if lineage.get("kind") == "traffic":
        return f"traffic of {lineage.get('adapter')}"
    return str(lineage.get("kind") or "-")


@app.command()
@guarded
def show(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(metavar="NAME[@vN]", help="A dataset (its latest version) or one version.")
    ],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A dataset version: its splits, lineage (where it came from) and profile.

    Example: loraflow data show tickets@v2
    """
    from loraflow.registry.refs import parse_ref

    parsed = parse_ref(ref, param="NAME[@vN]")
    if parsed.alias is not None:
        raise InvalidArgumentError(f"datasets have no aliases: write {parsed.name}@vN", param="NAME[@vN]")
    reg = state(ctx).existing_registry
    versions = reg.datasets(parsed.name)
    v = reg.get_dataset(ref)
    if as_json:
        print_json({"ref": v.ref} | v.model_dump(mode="json") | {"versions": [x.version for x in versions]})
        return

    def line(label: str, value: str) -> None:
        out.print(f"  {label}: {value}", markup=False)

    out.print(f"[bold]{v.ref}[/bold]  versions: {', '.join(f'v{x.version}' for x in versions)}")
    line("digest", v.digest)
    line("splits", _counts(v.counts))
    line("created", f"{v.created_at:%Y-%m-%d %H:%M:%S %Z} by {v.created_by}")
    for key, value in v.lineage.items():
        line(f"lineage {key}", _plain(value))
    profile = v.profile.to_json() if v.profile else {}
    if not profile:
        line("profile", "none recorded")
    for key, value in profile.items():
        if key == "embedding" and isinstance(value, dict):
            spread = (value.get("cosine_to_centroid") or {}).get("mean")
            line(
                "profile embedding",
                f"{value.get('model')} ({value.get('dim')} dims, n={value.get('n')}); "
                f"mean cosine to centroid {_plain(spread)}",
            )
        elif key == "lengths" and isinstance(value, dict):
            line("profile lengths", f"histograms of {', '.join(value)} (see --json)")
        else:
            line(f"profile {key}", _plain(value))
    line("full record", f"loraflow data show {v.ref} --json")


def _plain(value: Any) -> str:
    """A value as words, never a Python repr."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(x)}" for k, x in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(_plain(x) for x in value) or "-"
    return str(value)
