"""The app factory: services are built once here and stored on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI

from loraflow.registry.basemodel import template_hash_of
from loraflow.registry.errors import LoraflowError
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server import errors, openapi
from loraflow.server.chat import api_router as chat
from loraflow.server.chat.protocol import ChatCompletionChunk, ChatCompletionRequest
from loraflow.server.completions import api_router as completions
from loraflow.server.completions.protocol import CompletionRequest
from loraflow.server.discovery import DnsDiscovery
from loraflow.server.engine.protocol import Engine
from loraflow.server.engine.supervisor import EngineProcess, start_all
from loraflow.server.engine.vllm_http import VLLMHttpEngine
from loraflow.server.feedback import api_router as feedback
from loraflow.server.feedback.protocol import FeedbackRequest
from loraflow.server.feedback.serving import FeedbackService
from loraflow.server.gateway import Gateway
from loraflow.server.health import api_router as health
from loraflow.server.metrics import GatewayMetrics
from loraflow.server.models import api_router as models
from loraflow.server.ratelimit import KeyLimiter
from loraflow.server.recycle import Recycler
from loraflow.server.replicas import ReplicaSet
from loraflow.server.rollouts import Rollouts
from loraflow.server.routing import RoutingTable
from loraflow.server.shadow import Shadow
from loraflow.server.shared_metrics import SharedMetrics
from loraflow.server.traffic.live import LiveDrift
from loraflow.server.traffic.recorder import TrafficRecorder
from loraflow.server.traffic.writer import writer_from_settings

log = logging.getLogger("loraflow.server")


def configure_logging() -> None:
    """How a gateway process logs: INFO lines with time, level and logger, without httpx's one
    line per engine call. ``loraflow serve`` and each of its ``--workers`` call it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def build_app(
    settings: Settings,
    *,
    registry: Registry,
    base_model: str,
    model_name: str | None = None,
    engine_urls: list[str] | None = None,
    log_file: Path | None = None,
    shared_metrics: SharedMetrics | None = None,
) -> FastAPI:
    """The gateway as ``loraflow serve`` runs it, from settings: the one place engines are wired.

    Replicas come from, in order: engine URLs (the argument, else ``server.engine_urls``);
    ``server.engine_dns``, resolved again and again; or, with neither,
    ``server.supervised_engines`` engines on this machine, started in the lifespan and
    stopped with the gateway (``app.state.supervised``). ``base_model`` is the path or
    hub id engines serve; ``model_name`` is the id clients use for it. ``shared_metrics`` is
    given to each worker of ``serve --workers`` (:mod:`loraflow.server.workers`).
    """
    server = settings.server

    def make_engine(url: str) -> Engine:
        return VLLMHttpEngine(
            url, timeout_s=server.engine_timeout_s, load_timeout_s=server.adapter_load_timeout_s
        )

    urls = engine_urls or server.engine_urls
    supervised: list[EngineProcess] = []
    discovery: DnsDiscovery | None = None
    if not urls and server.engine_dns:
        discovery = DnsDiscovery(server.engine_dns, make_engine, interval_s=server.dns_interval_s)
    elif not urls:
        log_file = log_file or settings.home / "logs" / "engine.log"
        for i in range(server.supervised_engines):
            supervised.append(
                EngineProcess(
                    settings,
                    model=base_model,
                    log_file=log_file
                    if i == 0
                    else log_file.with_name(f"{log_file.stem}-{i}{log_file.suffix}"),
                    index=i,
                )
            )
        urls = [p.url for p in supervised]
    return create_app(
        settings,
        registry=registry,
        engines=[make_engine(u) for u in urls],
        base_model=base_model,
        base_model_id=model_name or server.served_model_name or base_model,
        supervised=supervised,
        discovery=discovery,
        shared_metrics=shared_metrics,
    )


def create_app(
    settings: Settings,
    *,
    registry: Registry,
    engines: list[Engine],
    base_model: str,
    base_model_id: str | None = None,
    supervised: list[EngineProcess] | None = None,
    discovery: DnsDiscovery | None = None,
    shared_metrics: SharedMetrics | None = None,
) -> FastAPI:
    """Build the services once and store them on ``app.state``, over the given engine replicas.

    Engines serve the base as ``base_model`` (its path or hub id); clients may name it
    ``base_model_id`` too. The base's chat template is compared with each version's.
    """
    server = settings.server
    replicas = ReplicaSet(
        engines,
        max_resident=server.max_cpu_loras,
        home_size=server.adapter_replicas,
        max_in_flight=server.replica_max_in_flight,
    )
    template = template_hash_of(base_model)
    if template is None:
        log.warning("base model %s is not on this machine; chat templates cannot be compared", base_model)
    routes = RoutingTable(
        registry,
        replicas,
        base_model_id=base_model_id or base_model,
        engine_base_name=base_model,
        poll_interval_s=server.poll_interval_s,
        base_template_hash=template,
    )
    # Built here, not on the first request: a missing Presidio fails the start, not a request.
    recorder = (
        TrafficRecorder(settings.traffic, registry.traffic, writer_from_settings(settings, registry.traffic))
        if settings.traffic.enabled
        else None
    )
    live = LiveDrift(settings.drift)
    limiter = KeyLimiter(server, registry) if server.auth else None  # limits belong to keys
    rollouts = Rollouts(settings.rollout, registry, routes)
    shadow = Shadow(settings.rollout, routes, replicas, rollouts, recorder)
    metrics = GatewayMetrics(
        routes,
        supervised,
        recorder=recorder,
        live=live,
        shared=shared_metrics,
        limiter=limiter,
        rollouts=(rollouts, shadow),
    )
    gateway = Gateway(
        server,
        routes,
        replicas,
        metrics,
        traffic_settings=settings.traffic,
        recorder=recorder,
        live=live,
        limiter=limiter,
        rollouts=rollouts,
        shadow=shadow,
    )
    recycler = (
        Recycler(
            routes,
            supervised,
            max_loads=server.max_adapter_loads,
            drain_timeout_s=server.drain_timeout_s,
            interval_s=server.poll_interval_s,
        )
        if supervised and server.max_adapter_loads
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if recorder is not None:
            recorder.start()  # the writer process loads Presidio while the engines start
        try:
            await start_all(supervised or [])  # returns once healthy; a no-op if `serve` started them
            if recorder is not None:
                await asyncio.to_thread(recorder.wait_ready)
        except LoraflowError as exc:
            app.state.startup_error = exc  # uvicorn only logs a failed startup; callers re-raise this
            if recorder is not None:
                await asyncio.to_thread(recorder.close)
            for process in supervised or []:
                await process.stop()
            raise
        if discovery is not None:
            await discovery.refresh(replicas)  # the first members before the first health check
        loops = [routes.run(), rollouts.run()]
        if discovery is not None:
            loops.append(discovery.run(replicas))
        if recycler is not None:
            loops.append(recycler.run())
        if shared_metrics is not None:
            loops.append(shared_metrics.publish_every(metrics.state))
        if limiter is not None:
            loops.append(limiter.run())
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            yield
        finally:
            # uvicorn has stopped accepting and drained in-flight requests by now.
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await shadow.aclose()  # the pairs in flight, before the recorder's last write
            try:
                await asyncio.to_thread(rollouts.close)  # the last counts; the leases let go
            except Exception as exc:  # the registry is gone: the leases lapse by themselves
                log.warning("could not write the rollouts' last counts: %s", exc)
            if recorder is not None:
                await asyncio.to_thread(recorder.close)  # writes what is queued, or counts it lost
            await replicas.aclose()
            if limiter is not None:
                limiter.close()
            for process in supervised or []:
                await process.stop()
            if shared_metrics is not None:
                shared_metrics.close()

    app = FastAPI(
        title="loraflow gateway",
        version=version("loraflow"),
        description="OpenAI-compatible API over vLLM engines, with one LoRA adapter version per request.",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.feedback = FeedbackService(server, routes, recorder, live, rollouts)
    app.state.rollouts = rollouts
    app.state.startup_error = None
    app.state.supervised = list(supervised or [])
    app.state.recycler = recycler
    errors.install(app, retry_after_s=server.retry_after_s)
    for module in (chat, completions, models, health, feedback):
        module.attach_router(app)
    openapi.install(
        app,
        bodies={
            "ChatCompletionRequest": ChatCompletionRequest,
            "CompletionRequest": CompletionRequest,
            "FeedbackRequest": FeedbackRequest,
        },
        extra_models=[ChatCompletionChunk],
    )
    return app
