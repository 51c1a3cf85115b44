"""Run the gateway in a background thread of this process (the demo and the e2e tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

from loraflow.registry.errors import LoraflowError, UnavailableError
from loraflow.server.http import server_config


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # signals belong to the main thread
        pass


def wait_until_ok(url: str, timeout_s: float, *, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``url`` until it answers 200 (True), ``timeout_s`` passes or ``alive()`` is false (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return False


@contextmanager
def serve_in_thread(
    app: FastAPI, port: int, *, ready_path: str = "/ready", timeout_s: float = 300
) -> Iterator[str]:
    """Start uvicorn on 127.0.0.1:port; yield the base URL once ``ready_path`` answers 200."""
    gateway = getattr(app.state, "gateway", None)  # a gateway gets its deadlines; another app runs plain
    if gateway is not None:
        config: uvicorn.Config = server_config(
            app, gateway.settings, host="127.0.0.1", port=port, log_level="warning"
        )
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = _ThreadServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_ok(f"{url}{ready_path}", timeout_s, alive=thread.is_alive):
            failure = getattr(app.state, "startup_error", None)
            if isinstance(failure, LoraflowError):
                raise failure  # e.g. the supervised engine failed to start: its log tail is in the message
            raise UnavailableError(f"the gateway at {url} did not become ready in {timeout_s:.0f} s")
        yield url
    finally:
        server.should_exit = True
        thread.join(120)
