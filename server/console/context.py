"""What every console route needs: the ``Console`` (settings, registry, signer, templates) on
``app.state``, typed accessors for it and for the viewer, and the CSRF check of a form."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse

from loraflow.registry.domain import ApiKeyInfo
from loraflow.registry.errors import PermissionDeniedError, UnauthenticatedError
from loraflow.registry.keys import hash_key
from loraflow.registry.refs import parse_ref, version_ref
from loraflow.registry.secrets import home_secret
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server.console.session import CSRF_FIELD, Session, Signer, Viewer

if TYPE_CHECKING:
    from loraflow.registry.redact import Redactor

HERE = Path(__file__).parent
# Pages stored by `loraflow eval`/`drift` are served in a sandbox: their own inline styles and
# SVG, no script, no form, nothing fetched.
STORED_PAGE_CSP = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"
CONSOLE_CSP = (
    "default-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
)


class LazyRedactor:
    """The traffic writer's redactor (Presidio, keyed like the gateway's pseudonyms), loaded on the
    first correction a reviewer writes: a review without free text never needs it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redactor: Redactor | None = None

    def redact_value(self, value: object) -> tuple[object, Counter[str]]:
        if self._redactor is None:
            from loraflow.registry.redact import redactor_from_settings

            self._redactor = redactor_from_settings(self._settings)
        return self._redactor.redact_value(value)


class Console:
    """What every route needs: settings, the registry, the signer and the templates."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.signer = Signer(home_secret(settings.home, "console.key"), ttl_s=settings.console.session_ttl_s)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["num"] = _num
        self.templates.filters["when"] = _when
        self.templates.filters["ref"] = version_ref
        self.templates.filters["dataset_url"] = dataset_url
        self.redactor = LazyRedactor(settings)

    @property
    def auth(self) -> bool:
        return self.settings.server.auth

    def viewer(self, session: Session) -> Viewer | None:
        """Who ``session`` is; None when auth is on and it holds no key that is still valid (the key
        is looked up on every request: a revoked key's logins end at once)."""
        if not self.auth:
            return Viewer(name=self.settings.actor, key=None)
        key = self._valid_key(session.key_hash) if session.key_hash is not None else None
        return Viewer(name=key.name, key=key) if key is not None else None

    def login(self, key: str) -> Session:
        """A new session for a valid, unrevoked API key (UnauthenticatedError otherwise)."""
        digest = hash_key(key.strip())
        if self._valid_key(digest) is None:
            raise UnauthenticatedError("invalid or revoked API key", param="key")
        return self.signer.new(digest)

    def _valid_key(self, digest: str) -> ApiKeyInfo | None:
        """The unrevoked key with this sha256, read from the registry now."""
        return next(
            (k for k in self.registry.api_keys() if k.key_hash == digest and k.revoked_at is None), None
        )

    def render(
        self, request: Request, template: str, *, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        session: Session = request.state.session
        html = self.templates.get_template(template).render(
            viewer=getattr(request.state, "viewer", None),
            auth=self.auth,
            csrf=self.signer.csrf(session),
            csrf_field=CSRF_FIELD,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)


def _num(value: object, digits: int = 3) -> str:
    """A figure for a table: floats to ``digits`` decimals, None as a dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value is not None else "\u2013"


def dataset_url(ref: str) -> str:
    """The console's page of a dataset version ``NAME@vN``."""
    parsed = parse_ref(ref, param="dataset")
    return f"/datasets/{quote(parsed.name)}/v/{parsed.version}"


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def viewer_of(request: Request) -> Viewer:
    """The viewer of a page that needs one (the middleware has sent everyone else to /login)."""
    viewer: Viewer | None = request.state.viewer
    if viewer is None:
        raise UnauthenticatedError("log in with an API key", param="key")
    return viewer


async def check_csrf(request: Request) -> dict[str, str]:
    """The form's fields, once its CSRF token is the session's (PermissionDeniedError otherwise)."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not console_of(request).signer.csrf_ok(request.state.session, fields.get(CSRF_FIELD)):
        raise PermissionDeniedError(
            "this form's CSRF token is missing or not this session's: reload the page and try again",
            param=CSRF_FIELD,
        )
    return fields
