"""`loraflow ui`: the web console, its own process beside (never on) the gateway's port."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from loraflow.cli.common import guarded, state
from loraflow.cli.serve import check_port_free
from loraflow.registry.errors import InvalidArgumentError


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds to this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@guarded
def ui(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on. Default: console.host (127.0.0.1). Not loopback needs server.auth."
        ),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on. Default: console.port (8090).")] = None,
) -> None:
    """Open the web console: browse adapters, versions, lineage and reports; review sampled outputs.

    With server.auth off (the local default) the console binds to loopback and is open to whoever
    reaches it; with it on, people log in with an API key: any key reads what its adapters cover,
    the 'review' scope reviews, 'operator' promotes and operates rollouts.

    Example: loraflow ui --port 8090   (then open http://127.0.0.1:8090)
    """
    import uvicorn

    from loraflow.server.app import configure_logging
    from loraflow.server.console.app import build_console

    app_state = state(ctx)
    settings = app_state.get_settings()
    bind_host, bind_port = host or settings.console.host, port or settings.console.port
    if not settings.server.auth and not is_loopback(bind_host):
        raise InvalidArgumentError(
            f"--host {bind_host} would open the console to the network with server.auth off: anyone "
            "reaching it could read sampled traffic and promote. Turn server.auth on "
            "(LORAFLOW_SERVER__AUTH=true, keys from `loraflow keys create`) or bind to 127.0.0.1",
            param="host",
        )
    if bind_port == settings.server.port and bind_host == settings.server.host:
        raise InvalidArgumentError(
            f"{bind_host}:{bind_port} is the gateway's address (server.host/server.port); the console "
            "never shares the gateway's port: pass another --port",
            param="port",
        )
    check_port_free(bind_host, bind_port)
    app = build_console(settings, app_state.registry)
    configure_logging()
    url_host = f"[{bind_host}]" if ":" in bind_host else bind_host
    typer.echo(
        f"loraflow console on http://{url_host}:{bind_port}  (auth {'on' if settings.server.auth else 'off'})"
    )
    uvicorn.run(app, host=bind_host, port=bind_port, log_level="warning", access_log=False)
