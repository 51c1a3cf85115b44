"""Secrets a loraflow home makes for itself once: random keys kept under ``$home/secrets`` (0600)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def home_secret(home: Path, name: str) -> bytes:
    """The key in ``$home/secrets/NAME``, made (32 random bytes, hex) by the first caller; a
    concurrent first caller reads the winner's key."""
    path = home / "secrets" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()
