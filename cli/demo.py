"""`loraflow demo`: the main job on the embedded default (SQLite + local artifact store).

From nothing to a promoted adapter, on CPU with no downloads:
build the tiny local Llama, write a synthetic extraction dataset, validate and
prepare it, train two adapter versions, serve them, evaluate each through vLLM
against the prompted base and production, promote through the gate (hot-swapping
under the running gateway), diff, roll back, and fetch the production version
verified against its digest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from loraflow.cli.common import guarded, out, state
from loraflow.registry.domain import VersionInfo
from loraflow.registry.errors import ConflictError
from loraflow.registry.refs import Ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings


@guarded
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the demo model and data; default $LORAFLOW_HOME/demo.")
    ] = None,
    name: Annotated[str, typer.Option(help="Adapter (and dataset) name.")] = "demo-orders",
    serve: Annotated[bool, typer.Option(help="Also start vLLM + the gateway and hot-swap under it.")] = True,
) -> None:
    """Train, register, promote and roll back adapters on a tiny locally built model."""
    from loraflow.trainer.config import TrainConfig
    from loraflow.trainer.data import validate_for_base
    from loraflow.trainer.embed import Embedder
    from loraflow.trainer.prepare import prepare
    from loraflow.trainer.synthetic import make_rows, write_jsonl
    from loraflow.trainer.tiny import build_tiny_model
    from loraflow.trainer.train import train

    app = state(ctx)
    settings = app.get_settings()
    reg = app.registry
    work = (workdir or settings.home / "demo").resolve()
    base = work / "tiny-llama"

    out.print(f"[1/9] tiny Llama base model in {base}")
    if not (base / "config.json").is_file():
        build_tiny_model(base)

    out.print("[2/9] synthetic task: extract name, city and qty as JSON (500 rows)")
    data = write_jsonl(work / "orders.jsonl", make_rows(500, seed=reg.revision()))
    validation = validate_for_base(data, str(base), max_length=settings.trainer.max_length)
    tokens = validation.summary()["tokens"]
    out.print(
        f"      {len(validation.examples)} valid examples, {tokens['total']} tokens, p90 {tokens['p90']}"
    )

    out.print("[3/9] prepare: dedup, stratified split, profile, register the dataset version")
    dataset, report = prepare(validation, name=name, registry=reg, embedder=Embedder())
    out.print(
        f"      {dataset.ref}: {dataset.counts}; dropped {report['exact_duplicates_dropped']} exact, "
        f"{report['near_duplicates_dropped']} near duplicates"
    )

    versions = []
    for step, (r, epochs) in enumerate(((8, 3), (16, 8)), start=4):
        out.print(f"[{step}/9] train a LoRA adapter (r={r}, {epochs} epochs) on {dataset.ref}")
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
            f"valid JSON {a['json_valid']} (base {b['json_valid']}); "
            f"stops by itself {a['stop_rate']} (base {b['stop_rate']}); {m['wall_time_s']} s"
        )
        versions.append(run.version)
    first, second = versions

    if serve:
        out.print("[6/9] serve: a supervised vLLM engine and the gateway (about a minute to start)")
        _evaluate_promote_and_hot_swap(settings, reg, base, name, first, second, work=work)
    else:
        out.print("[6/9] serving and evaluation skipped (--no-serve): promote past the gate, audited")
        reg.promote(name, first.version, force=True, reason="demo --no-serve: no engine to evaluate with")
        reg.promote(
            name, second.version, expect=first.version, force=True, reason="demo --no-serve: no engine"
        )
    try:
        reg.promote(name, first.version, expect=first.version, force=True, reason="demo: a stale --expect")
    except ConflictError as exc:
        out.print(f"      a stale --expect is refused: {exc.message}")
    out.print(f"      production -> {reg.resolve(Ref(name)).ref}")
    for section, keys in reg.diff(name, first.version, second.version).items():
        shown = {k: v for k, v in keys.items() if section != "metrics" or not k.endswith("curve")}
        for key, (x, y) in list(shown.items())[:6]:
            out.print(f"      diff {section}.{key}: {x} -> {y}", markup=False)

    out.print("[8/9] rollback")
    back = reg.rollback(name)
    out.print(f"      production -> v{back.to_version} (was v{back.from_version})")

    out.print("[9/9] fetch production from the artifact store, verified against its digest")
    fetched = reg.fetch(reg.resolve(Ref(name)), work / "fetched")
    out.print(f"      {fetched}")
    out.print(f"registry: {settings.resolved_database_url}   artifacts: {settings.resolved_artifact_uri}")
    out.print(
        f"next: adapters show {name}   adapters history {name}   adapters diff {name} "
        f"v{first.version} v{second.version}"
    )


def _evaluate_promote_and_hot_swap(
    settings: Settings,
    reg: Registry,
    base: Path,
    name: str,
    first: VersionInfo,
    second: VersionInfo,
    *,
    work: Path,
) -> None:
    """Evaluate each version through the running gateway, promote through the gate, hot-swap under it."""
    import httpx

    from loraflow.cli.evaluate import print_report
    from loraflow.server.app import build_app
    from loraflow.server.embedded import serve_in_thread
    from loraflow.server.engine.supervisor import free_port
    from loraflow.trainer.evaluate import evaluate
    from loraflow.trainer.prepare import load_split
    from loraflow.trainer.report_html import write_html

    demo_settings = settings.model_copy(
        update={"server": settings.server.model_copy(update={"max_lora_rank": 16})}
    )
    app = build_app(
        demo_settings,
        registry=reg,
        base_model=str(base),
        model_name="tiny-llama",
        log_file=settings.home / "logs" / "demo-engine.log",
    )
    (process,) = app.state.supervised
    prompt = load_split(reg, reg.get_dataset(first.dataset or name), "test")[0]["messages"][:-1]

    def ask(url: str) -> tuple[str, str, str]:
        body = {"model": name, "messages": prompt, "temperature": 0, "max_tokens": 48}
        data = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        choice = data["choices"][0]
        return data["model"], choice["message"]["content"], choice["finish_reason"]

    with serve_in_thread(app, free_port()) as url:
        out.print(f"      gateway {url} -> engine {process.url}")
        through = settings.model_copy(update={"eval": settings.eval.model_copy(update={"gateway_url": url})})
        for version in (first, second):
            out.print(
                f"[7/9] loraflow eval {version.ref}: prompted base, production, candidate, through vLLM"
            )
            result = evaluate(version.ref, registry=reg, settings=through)
            print_report(result.report)
            decision = reg.gate(name, version.version)
            html = write_html(result.report, work / f"eval-{version.version}.html", gate=decision.to_json())
            out.print(f"      report stored on {version.ref}; HTML: {html}", markup=False)
            out.print(f"      {decision.message()}", markup=False)
            current = reg.get(name).aliases.get("production")
            if version is second:
                served, text, finish = ask(url)
                out.print(f"      prompt: {prompt[-1]['content']!r}", markup=False)
                out.print(f"      {served}: {text!r} (finish_reason={finish})", markup=False)
            if decision.passed:
                reg.promote(name, version.version)
                out.print(f"      adapters promote {name} v{version.version}: passed the gate")
            else:
                reason = "demo: show a hot-swap even though the gate refused"
                reg.promote(name, version.version, force=True, reason=reason)
                out.print(f"      adapters promote {name} v{version.version} --force --reason {reason!r}")
            promoted = time.monotonic()
            if version is second:
                while (served := ask(url)[0]) != version.ref:
                    time.sleep(0.05)
                out.print(
                    f"      production v{current} -> v{version.version}: the gateway served {served} "
                    f"{time.monotonic() - promoted:.2f} s later, no restart",
                    markup=False,
                )
                served, text, finish = ask(url)
                out.print(f"      {served}: {text!r} (finish_reason={finish})", markup=False)
