"""`loraflow serve`: the OpenAI-compatible gateway, over a supervised engine or running replicas."""

from __future__ import annotations

import errno
import logging
import signal
import socket
from typing import TYPE_CHECKING, Annotated

import typer

from loraflow.cli.common import err, guarded, state
from loraflow.registry.errors import InvalidArgumentError

if TYPE_CHECKING:
    import asyncio

    import uvicorn

    from loraflow.server.engine.supervisor import EngineProcess

log = logging.getLogger("loraflow.serve")


@guarded
def serve(
    ctx: typer.Context,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            "--base",
            help="Base model path or id (starts a supervised engine). Default: server.base_model.",
        ),
    ] = None,
    engine_url: Annotated[
        list[str] | None, typer.Option("--engine-url", help="A running vLLM replica (repeatable).")
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name",
            help="The id clients use for the base model. Default: server.served_model_name, else the base "
            "model.",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on. Default: server.host (127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on. Default: server.port (8000).")] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Gateway processes sharing the port (server.workers)."),
    ] = None,
) -> None:
    """Serve /v1/chat/completions and /v1/completions with per-request adapters and hot-swap.

    With --base-model alone, serve starts one vLLM engine and waits until it is healthy
    (flags from the \\[server] settings). If the engine exits before that, serve exits
    non-zero with the last lines of the engine's log. With --workers N (running replicas
    only), N gateway processes share the port; /metrics answers for all of them.

    Example: loraflow serve --base-model Qwen/Qwen2.5-0.5B-Instruct --port 8000
    """
    import asyncio  # ~30 ms: only for the command that runs a loop

    import uvicorn

    from loraflow.server.app import build_app, configure_logging
    from loraflow.server.http import server_config

    app_state = state(ctx)
    settings = app_state.get_settings()
    server = settings.server
    base = base_model or server.base_model
    if not base:
        raise InvalidArgumentError("pass --base-model (or set server.base_model)", param="base_model")
    bind_host, bind_port = host or server.host, port or server.port
    n_workers = workers or server.workers
    urls = engine_url or server.engine_urls
    if n_workers > 1 and not (urls or server.engine_dns):
        raise InvalidArgumentError(
            "--workers above 1 needs running replicas (--engine-url, server.engine_urls or "
            "server.engine_dns): a supervised engine belongs to one gateway process",
            param="workers",
        )
    check_port_free(bind_host, bind_port)
    if n_workers > 1:
        from loraflow.server.workers import run_workers

        run_workers(
            settings,
            workers=n_workers,
            base_model=base,
            model_name=model_name,
            engine_urls=list(urls),
            host=bind_host,
            port=bind_port,
        )
        return
    configure_logging()
    app = build_app(
        settings, registry=app_state.registry, base_model=base, model_name=model_name, engine_urls=engine_url
    )
    config = server_config(app, server, host=bind_host, port=bind_port, log_level="info")
    serving = asyncio.Event()  # set once uvicorn runs; a signal after that is a normal stop
    try:
        # The loop uvicorn itself would run: uvloop when installed (see bench/gateway_overhead.py).
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            stopped_by = runner.run(_run(uvicorn.Server(config), app.state.supervised, serving))
    except KeyboardInterrupt:
        if serving.is_set():
            return  # Ctrl-C while serving: uvicorn drained and stopped, as `uvicorn.run` would
        stopped_by = signal.SIGINT
    if stopped_by is not None:
        err.print("stopped before the engine was ready; it was shut down", markup=False)
        raise typer.Exit(128 + stopped_by)


async def _run(
    server: uvicorn.Server, supervised: list[EngineProcess], serving: asyncio.Event
) -> signal.Signals | None:
    """Start the supervised engines (interruptible), then serve. The signal if stopped before serving."""
    import asyncio

    from loraflow.server.engine.supervisor import start_all

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None  # we are inside Runner.run
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        main.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)  # uvicorn handles signals once it serves
    try:
        for process in supervised:
            log.info("waiting for the engine to become healthy (log: %s)", process.log_file)
        await start_all(supervised)
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise  # Ctrl-C: Runner.run turns this into KeyboardInterrupt
        return signal.SIGTERM
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    serving.set()
    await server.serve()
    return None


def check_port_free(host: str, port: int) -> None:
    """Fail before a minute of engine start-up, not after it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise InvalidArgumentError(f"{host}:{port} {reason}; pass --port", param="port") from exc
