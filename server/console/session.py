"""Who is looking at the console, and whether a form really came from one of its pages.

A console session is a signed cookie (HMAC-SHA256 under a key made once in
``$home/secrets/console.key``): a random session id, the sha256 of the API key it logged in with
(with ``server.auth`` on), and when it ends. The key itself is never stored in the cookie. Every
request looks the key up again in the registry, so a revoked key's logins end at once.

Every form carries a CSRF token: an HMAC of the session id, which a forged form on another site
cannot know. The cookie is HttpOnly, SameSite=Strict, and Secure over TLS
(``console.secure_cookies``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from loraflow.registry import domain
from loraflow.registry.scopes import Scope

COOKIE = "loraflow_console"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Session:
    sid: str
    key_hash: str | None  # None: not logged in (or auth off, where nobody logs in)
    expires: int  # unix seconds


@dataclass(frozen=True)
class Viewer:
    """The person behind a request: a logged-in key, or with auth off whoever reaches the console
    (bound to loopback), who may do everything an operator may."""

    name: str
    key: domain.ApiKeyInfo | None

    def has(self, scope: Scope) -> bool:
        return self.key is None or self.key.has(scope)

    def sees(self, adapter: str) -> bool:
        return self.key is None or self.key.allows(adapter)

    def may_review(self, adapter: str) -> bool:
        return self.sees(adapter) and self.has("review")

    @property
    def operator(self) -> bool:
        return self.has("operator")


class Signer:
    """Signs and reads session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes, *, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def new(self, key_hash: str | None = None) -> Session:
        return Session(
            sid=secrets.token_urlsafe(18), key_hash=key_hash, expires=int(time.time()) + self.ttl_s
        )

    def dump(self, session: Session) -> str:
        body = json.dumps(
            {"s": session.sid, "k": session.key_hash, "e": session.expires}, separators=(",", ":")
        )
        payload = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
        return f"{payload}.{self._mac(payload.encode())}"

    def load(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, or None for a missing, forged, malformed or expired one."""
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(payload.encode())):
            return None
        try:
            body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            session = Session(sid=str(body["s"]), key_hash=body["k"], expires=int(body["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def csrf(self, session: Session) -> str:
        return self._mac(f"csrf:{session.sid}".encode())

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf(session))

    def coin(self, *parts: object) -> bool:
        """A fair, stable and unguessable coin for ``parts``: which side a blind pair shows first."""
        return int(self._mac(":".join(map(str, parts)).encode())[:8], 16) % 2 == 1
