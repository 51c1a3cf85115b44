"""`loraflow engine`: a vLLM OpenAI server that fetches loraflow versions itself.

It runs vLLM with loraflow's flags (from ``[server]``) and the environment that turns
on the loraflow resolver plugin (``server/engine/plugin.py``): an adapter named
``NAME@vN+DIGEST`` is fetched from the artifact store, verified, cached under
``engine.cache_dir`` and loaded. This is the engine `serve` supervises, the Helm chart
runs and the multi-host tests start. The process *becomes* vLLM (exec), so signals
and exit codes are vLLM's own.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from loraflow.cli.common import err, guarded, state
from loraflow.registry.errors import InvalidArgumentError


@guarded
def engine(
    ctx: typer.Context,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", "--base", help="Base model path or hub id (default server.base_model)."),
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the engine's OpenAI server.")] = 8001,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Its admin routes load adapters: expose it to gateways only "
            "(on Kubernetes, 0.0.0.0 behind a NetworkPolicy)."
        ),
    ] = "127.0.0.1",
) -> None:
    """Start one engine replica for gateways on other hosts (`serve --engine-url` or `server.engine_dns`).

    vLLM's flags come from the \\[server] settings; adapters are fetched from the artifact store.

    Example: loraflow engine --base-model Qwen/Qwen2.5-0.5B-Instruct --host 0.0.0.0 --port 8001
    """
    from loraflow.registry.artifacts import ArtifactStore
    from loraflow.server.engine.supervisor import engine_env, resolve_device, vllm_command

    settings = state(ctx).get_settings()
    base = base_model or settings.server.base_model
    if not base:
        raise InvalidArgumentError("pass --base-model (or set server.base_model)", param="base_model")
    uri = settings.resolved_artifact_uri
    try:  # fail here, in seconds, rather than on the first request
        ArtifactStore(uri).exists("0" * 64)
    except Exception as exc:  # fsspec backends raise their own types (botocore, aiohttp, OSError)
        raise InvalidArgumentError(
            f"cannot read the artifact store {uri}: {exc}", param="artifact_uri"
        ) from exc
    device = resolve_device(settings.server)
    cmd = vllm_command(settings.server, model=base, port=port, device=device, host=host)
    env = engine_env(settings, device)
    err.print(f"engine on {host}:{port}, adapters from {uri}", markup=False)
    os.execvpe(cmd[0], cmd, env)
