"""`loraflow serve`: the OpenAI-compatible gateway, over a supervised engine or running replicas."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from loraflow.cli.common import guarded, state
from loraflow.registry.errors import InvalidArgumentError


@guarded
def serve(
    ctx: typer.Context,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Base model path or id (starts a supervised engine).")
    ] = None,
    engine_url: Annotated[
        list[str] | None, typer.Option("--engine-url", help="A running vLLM replica (repeatable).")
    ] = None,
    model_name: Annotated[
        str | None, typer.Option("--model-name", help="The id clients use for the base model.")
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Serve /v1/chat/completions and /v1/completions with per-request adapters and hot-swap."""
    import uvicorn

    from loraflow.server.app import create_app
    from loraflow.server.engine.supervisor import EngineProcess
    from loraflow.server.engine.vllm_http import VLLMHttpEngine

    app_state = state(ctx)
    settings = app_state.get_settings()
    server = settings.server
    base = base_model or server.base_model
    urls = engine_url or server.engine_urls
    if not base:
        raise InvalidArgumentError("pass --base-model (or set server.base_model)", param="base_model")
    public = model_name or server.served_model_name or base
    supervised: list[EngineProcess] = []
    if not urls:
        process = EngineProcess(
            server, model=base, served_name=public, log_file=settings.home / "logs" / "engine.log"
        )
        supervised.append(process)
        urls = [process.url]
    engines = [VLLMHttpEngine(u, timeout_s=server.engine_timeout_s) for u in urls]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call is noise
    app = create_app(
        settings,
        registry=app_state.registry,
        engines=list(engines),
        base_model_id=public,
        supervised=supervised,
    )
    uvicorn.run(
        app,
        host=host or server.host,
        port=port or server.port,
        timeout_graceful_shutdown=30,
        log_level="info",
    )
