"""`loraflow demo`: the main job on the embedded default (SQLite + local artifact store).

It builds the tiny local base model, makes two real PEFT LoRA adapters for
it, and walks them through the registry: register v1 and v2, promote,
compare-and-swap promote, diff, rollback, history, and a verified fetch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from cli.common import guarded, out, state
from registry.adapter_files import ADAPTER_FILES
from registry.errors import ConflictError
from registry.refs import Ref


@guarded
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None, typer.Option(help="Where to build the demo model; default $LORAFLOW_HOME/demo.")
    ] = None,
    name: Annotated[str, typer.Option(help="Adapter name to use.")] = "demo-support",
) -> None:
    """Run the registry round trip on a tiny locally built model."""
    from trainer.tiny import build_tiny_model, random_lora_adapter

    app = state(ctx)
    settings = app.get_settings()
    work = workdir or settings.home / "demo"
    base = work / "tiny-llama"
    if not (base / "config.json").is_file():
        out.print(f"[1/7] building a tiny Llama model in {base}")
        build_tiny_model(base)
    else:
        out.print(f"[1/7] using the tiny Llama model in {base}")
    reg = app.registry

    out.print("[2/7] making two PEFT LoRA adapters and registering them")
    versions = []
    for seed, r in ((1, 8), (2, 16)):
        src = work / f"adapter-r{r}-seed{seed}"
        shutil.rmtree(src, ignore_errors=True)
        random_lora_adapter(base, src, r=r, alpha=2 * r, seed=seed + reg.revision())
        v = reg.register(
            name,
            src,
            base_model=str(base),
            task="demo: answer support tickets",
            training_config={"r": r, "alpha": 2 * r, "seed": seed},
            metrics={"note": "untrained"},
        )
        versions.append(v)
        out.print(f"      registered {v.ref}  digest {v.digest[:12]}  r={v.rank}  {v.size_bytes} bytes")
    first, second = versions

    out.print(f"[3/7] promote {first.ref} to production")
    reg.promote(name, first.version)
    out.print(f"[4/7] promote {second.ref} with --expect v{first.version} (compare-and-swap)")
    reg.promote(name, second.version, expect=first.version)
    try:
        reg.promote(name, first.version, expect=first.version)
    except ConflictError as exc:
        out.print(f"      a stale --expect is refused: {exc.message}")
    out.print(f"      production -> {reg.resolve(Ref(name)).ref}")

    out.print(f"[5/7] diff v{first.version} v{second.version}")
    for section, keys in reg.diff(name, first.version, second.version).items():
        for key, (a, b) in keys.items():
            out.print(f"      {section}.{key}: {json.dumps(a)} -> {json.dumps(b)}", markup=False)

    out.print("[6/7] rollback")
    back = reg.rollback(name)
    out.print(f"      production -> v{back.to_version} (was v{back.from_version})")

    out.print("[7/7] fetch production from the artifact store, verifying its digest")
    fetched = reg.fetch(reg.resolve(Ref(name)), work / "fetched")
    out.print(f"      {', '.join(ADAPTER_FILES)} verified in {fetched}")
    moves = reg.history(name).moves
    out.print(
        f"history of {name}: "
        + " ; ".join(
            f"r{m.revision} {m.reason} {m.alias} {_v(m.from_version)}->v{m.to_version}" for m in moves
        )
    )
    out.print(f"registry: {settings.resolved_database_url}   artifacts: {settings.resolved_artifact_uri}")
    out.print(f"try: adapters show {name}   adapters history {name}")


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "(none)"
