"""The app factory: services are built once here and stored on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server import errors
from loraflow.server.chat import api_router as chat
from loraflow.server.completions import api_router as completions
from loraflow.server.engine.protocol import Engine
from loraflow.server.engine.supervisor import EngineProcess
from loraflow.server.health import api_router as health
from loraflow.server.metrics import GatewayMetrics
from loraflow.server.models import api_router as models
from loraflow.server.proxy import Gateway
from loraflow.server.replicas import ReplicaSet
from loraflow.server.routing import Router

log = logging.getLogger("loraflow.server")


def create_app(
    settings: Settings,
    *,
    registry: Registry,
    engines: list[Engine],
    base_model_id: str,
    engine_base_name: str | None = None,
    supervised: list[EngineProcess] | None = None,
    base_template_hash: str | None = None,
) -> FastAPI:
    server = settings.server
    replicas = ReplicaSet(engines, max_resident=server.max_cpu_loras)
    router = Router(
        registry,
        replicas,
        base_model_id=base_model_id,
        engine_base_name=engine_base_name or base_model_id,
        cache_dir=server.adapter_cache or settings.home / "cache" / "adapters",
        poll_interval_s=server.poll_interval_s,
        base_template_hash=base_template_hash,
    )
    gateway = Gateway(server, router, replicas, GatewayMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for process in supervised or []:
            await process.start()
        task = asyncio.create_task(router.run())
        try:
            yield
        finally:
            # uvicorn has stopped accepting and drained in-flight requests by now.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for engine in engines:
                await engine.aclose()
            for process in supervised or []:
                await process.stop()

    app = FastAPI(title="loraflow gateway", lifespan=lifespan)
    app.state.gateway = gateway
    errors.install(app, retry_after_s=server.retry_after_s)
    for module in (chat, completions, models, health):
        module.attach_router(app)
    return app
