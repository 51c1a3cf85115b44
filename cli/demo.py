"""`loraflow demo`: the main job on the embedded default (SQLite + local artifact store).

From nothing to a promoted adapter, on CPU with no downloads:
build the tiny local Llama, write a synthetic extraction dataset, validate and
prepare it, train two adapter versions, then promote (with compare-and-swap),
diff, roll back, and fetch the production version verified against its digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import guarded, out, state
from registry.errors import ConflictError
from registry.refs import Ref


@guarded
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the demo model and data; default $LORAFLOW_HOME/demo.")
    ] = None,
    name: Annotated[str, typer.Option(help="Adapter (and dataset) name.")] = "demo-orders",
) -> None:
    """Train, register, promote and roll back adapters on a tiny locally built model."""
    from trainer.config import TrainConfig
    from trainer.data import validate_for_base
    from trainer.embed import Embedder
    from trainer.prepare import prepare
    from trainer.synthetic import make_rows, write_jsonl
    from trainer.tiny import build_tiny_model
    from trainer.train import train

    app = state(ctx)
    settings = app.get_settings()
    reg = app.registry
    work = (workdir or settings.home / "demo").resolve()
    base = work / "tiny-llama"

    out.print(f"[1/8] tiny Llama base model in {base}")
    if not (base / "config.json").is_file():
        build_tiny_model(base)

    out.print("[2/8] synthetic task: extract name, city and qty as JSON (500 rows)")
    data = write_jsonl(work / "orders.jsonl", make_rows(500, seed=reg.revision()))
    validation = validate_for_base(data, str(base), max_length=settings.trainer.max_length)
    tokens = validation.summary()["tokens"]
    out.print(
        f"      {len(validation.examples)} valid examples, {tokens['total']} tokens, p90 {tokens['p90']}"
    )

    out.print("[3/8] prepare: dedup, stratified split, profile, register the dataset version")
    dataset, report = prepare(validation, name=name, registry=reg, embedder=Embedder())
    out.print(
        f"      {dataset.ref}: {dataset.counts}; dropped {report['exact_duplicates_dropped']} exact, "
        f"{report['near_duplicates_dropped']} near duplicates"
    )

    versions = []
    for step, (r, epochs) in enumerate(((8, 3), (16, 8)), start=4):
        out.print(f"[{step}/8] train a LoRA adapter (r={r}, {epochs} epochs) on {dataset.ref}")
        run = train(
            TrainConfig(
                adapter=name,
                base=str(base),
                data=dataset.ref,
                r=r,
                alpha=2 * r,
                learning_rate=3e-3,
                epochs=epochs,
                batch_size=16,
                dropout=0.0,
                eval_steps=25,
                max_new_tokens=48,
                task="extract order fields as JSON",
                output_dir=work / "runs" / f"r{r}",
            ),
            registry=reg,
            settings=settings,
        )
        m, a, b = run.metrics, run.eval_report["adapter"], run.eval_report["base"]
        out.print(
            f"      {run.version.ref}: eval_loss {m['eval_loss']} (base {m['base_eval_loss']}); "
            f"JSON format {a['json_format_rate']} (base {b['json_format_rate']}); "
            f"stops by itself {a['stop_rate']} (base {b['stop_rate']}); {m['wall_time_s']} s"
        )
        versions.append(run.version)
    first, second = versions

    out.print(f"[6/8] promote {first.ref}, then {second.ref} with --expect v{first.version}")
    reg.promote(name, first.version)
    reg.promote(name, second.version, expect=first.version)
    try:
        reg.promote(name, first.version, expect=first.version)
    except ConflictError as exc:
        out.print(f"      a stale --expect is refused: {exc.message}")
    out.print(f"      production -> {reg.resolve(Ref(name)).ref}")
    for section, keys in reg.diff(name, first.version, second.version).items():
        shown = {k: v for k, v in keys.items() if section != "metrics" or not k.endswith("curve")}
        for key, (x, y) in list(shown.items())[:6]:
            out.print(f"      diff {section}.{key}: {x} -> {y}", markup=False)

    out.print("[7/8] rollback")
    back = reg.rollback(name)
    out.print(f"      production -> v{back.to_version} (was v{back.from_version})")

    out.print("[8/8] fetch production from the artifact store, verified against its digest")
    fetched = reg.fetch(reg.resolve(Ref(name)), work / "fetched")
    out.print(f"      {fetched}")
    out.print(f"registry: {settings.resolved_database_url}   artifacts: {settings.resolved_artifact_uri}")
    out.print(
        f"next: adapters show {name}   adapters history {name}   adapters diff {name} "
        f"v{first.version} v{second.version}"
    )
