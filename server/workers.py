"""``loraflow serve --workers N``: N gateway processes sharing one listening socket.

Each worker is a whole gateway over the same running replicas, built from the same settings
as a single-process ``serve`` builds it: its own routing table, registry poll, traffic
writer and drift window, as N gateway pods behind a Service would have. The kernel spreads
connections over the workers; uvicorn's supervisor (``uvicorn.supervisors.Multiprocess``)
starts them, restarts one that dies, and stops them on SIGINT/SIGTERM.

What a worker cannot do alone is answer ``/metrics`` for all of them, since a scrape reaches
one worker at random: each shares its figures through :mod:`loraflow.server.shared_metrics`.

Supervised engines are refused: an engine started by a gateway belongs to that one process.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.server.app import build_app, configure_logging
from loraflow.server.shared_metrics import ENV, SharedMetrics

if TYPE_CHECKING:
    from fastapi import FastAPI

    from loraflow.registry.settings import Settings

log = logging.getLogger("loraflow.workers")


def worker_app(
    settings: Settings, base_model: str, model_name: str | None, engine_urls: list[str]
) -> FastAPI:
    """What each worker process runs (uvicorn calls it after the process starts). A gateway that
    cannot be built exits with uvicorn's start-up failure code, which stops every worker; any
    other exit would have uvicorn restart the worker, to fail the same way, forever."""
    from uvicorn.config import STARTUP_FAILURE

    from loraflow.registry.errors import LoraflowError
    from loraflow.registry.service import Registry

    configure_logging()
    try:
        return build_app(
            settings,
            registry=Registry.open(settings),
            base_model=base_model,
            model_name=model_name,
            engine_urls=engine_urls,
            shared_metrics=SharedMetrics(Path(os.environ[ENV])),
        )
    except LoraflowError as exc:
        log.error("this worker cannot start: %s (%s)", exc.message, exc.code.value)
    except Exception:
        log.exception("this worker cannot start")
    raise SystemExit(STARTUP_FAILURE)


def run_workers(
    settings: Settings,
    *,
    workers: int,
    base_model: str,
    model_name: str | None,
    engine_urls: list[str],
    host: str,
    port: int,
) -> None:
    """Serve with ``workers`` processes until SIGINT or SIGTERM; each drains as ``serve`` does.
    A worker that fails its start stops them all, and this raises (its log says why)."""
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from loraflow.registry.errors import UnavailableError
    from loraflow.server.http import server_config

    folder = Path(tempfile.mkdtemp(prefix="loraflow-metrics-"))
    os.environ[ENV] = str(folder)  # read by prometheus_client as each (spawned) worker imports it
    try:
        config = server_config(
            partial(worker_app, settings, base_model, model_name, engine_urls),
            settings.server,
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
        )
        sockets = [config.bind_socket()]
        supervisor = Multiprocess(config, sockets=sockets)
        supervisor.run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise UnavailableError("a gateway worker failed to start; the lines above say why")
