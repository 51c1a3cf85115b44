"""URLs fit to print: the one place a password in a URL is hidden (no heavy imports here, so the
CLI, the settings and the database layer can all use it)."""

from __future__ import annotations

import re

# scheme://user:password@host… The password runs to the last "@" before the path; one holding a raw
# "/" runs to the first "@" (as SQLAlchemy reads it).
_PASSWORD_IN_URL = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?:[^\s/]*|[^\s@?#]*)@(?P<host>[^\s@]|$)"
)
MASK = "***"


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    ``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db``; a URL without a password and any
    other text come back unchanged. Use it wherever a database or storage URL is printed."""
    return _PASSWORD_IN_URL.sub(rf"\g<head>{MASK}@\g<host>", text)
