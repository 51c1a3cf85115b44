"""`loraflow ui`: the web console, built once from settings and a registry.

Server-rendered pages (Jinja2, autoescaped) and plain HTML forms; one small script adds keyboard
shortcuts, and everything works without it. Every asset is in the package: nothing is fetched
from elsewhere when a page opens, so the console works offline.

The console is its own process and never shares the gateway's port. It reads the registry and
the traffic store (redacted as stored) and serves the report pages ``loraflow eval`` and
``loraflow drift`` stored beside their reports; it does not import the trainer.

Who may do what follows ``server.auth`` (see ``session.py``): with auth off the console is bound
to loopback and open to whoever reaches it; with auth on, people log in with an API key, read
what its adapters cover, review with the ``review`` scope and promote, roll back, pause or abort
rollouts with ``operator``, through the same ``Registry`` calls, gate and compare-and-swap as the
CLI, audited under the key's name.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from loraflow.registry.errors import LoraflowError
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server.console import browse, review
from loraflow.server.console.context import CONSOLE_CSP, HERE, Console
from loraflow.server.console.session import COOKIE
from loraflow.server.errors import HTTP_STATUS

log = logging.getLogger("loraflow.console")


def secure(request: Request, settings: Settings) -> bool:
    chosen = settings.console.secure_cookies
    return chosen if chosen is not None else request.url.scheme == "https"


def build_console(settings: Settings, registry: Registry) -> FastAPI:
    """The console's app over ``registry``."""
    app = FastAPI(title="loraflow console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console = Console(settings, registry)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def sessions(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        loaded = console.signer.load(request.cookies.get(COOKIE))
        session = loaded or console.signer.new()
        request.state.session = session
        public = request.url.path in ("/login", "/healthz") or request.url.path.startswith("/static/")
        request.state.viewer = None if public and console.auth else console.viewer(session)
        if request.state.viewer is None and not public:
            if loaded is not None and loaded.key_hash is not None:
                session = console.signer.new()  # the key was revoked: this login is over
                request.state.session = session
            response: Response = HTMLResponse(status_code=303, headers={"location": "/login"})
        else:
            response = await call_next(request)
            session = request.state.session  # logging in or out starts a new one
        if loaded is None or session is not loaded:
            response.set_cookie(
                COOKIE,
                console.signer.dump(session),
                max_age=console.signer.ttl_s,
                httponly=True,
                samesite="strict",
                secure=secure(request, settings),
                path="/",
            )
        if not request.url.path.endswith("/page"):
            response.headers.setdefault("content-security-policy", CONSOLE_CSP)
        response.headers.setdefault("x-content-type-options", "nosniff")
        response.headers.setdefault("referrer-policy", "same-origin")
        return response

    @app.exception_handler(LoraflowError)
    async def on_error(request: Request, exc: LoraflowError) -> Response:
        status = HTTP_STATUS.get(exc.code, 500)
        return console.render(request, "error.html.j2", status_code=status, status=status, error=exc)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("console: unexpected error on %s", request.url.path)
        return HTMLResponse(
            "<h1>500</h1><p>internal error; the console's log has the details</p>", status_code=500
        )

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    browse.attach_router(app)
    review.attach_router(app)
    return app
