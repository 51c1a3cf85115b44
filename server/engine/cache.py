"""The engine host's own copy of adapter versions: fetched by digest, verified, bounded in size.

An engine knows a version only by its engine name, ``NAME@vN+DIGEST`` (see
:func:`parse_engine_name`). The digest is all it needs: the files come from the
artifact store (S3 in production, a local folder by default), every byte is checked
against the digest before vLLM may load it, and the copy is kept under
``engine.cache_dir``. When the cache grows past ``engine.cache_max_bytes``, the least
recently used versions are deleted (never the one just fetched). vLLM holds a loaded
adapter's weights in memory, so deleting its files later does not affect serving.

Several vLLM API-server processes on one host may share the folder: a fetch lands by
atomic rename, and eviction runs under a file lock.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from loraflow.registry.artifacts import ArtifactStore

if TYPE_CHECKING:
    from loraflow.registry import domain

log = logging.getLogger("loraflow.engine.cache")

_ENGINE_NAME = re.compile(r"^(?P<ref>[A-Za-z0-9][A-Za-z0-9._-]*@v[0-9]+)\+(?P<digest>[0-9a-f]{64})$")


def engine_name(ref: str, digest: str) -> str:
    """The name an engine knows a version by: immutable, and bound to the exact bytes.

    It carries the whole digest, so an engine on another host can fetch and verify
    the files with nothing but the artifact store.
    """
    return f"{ref}+{digest}"


def engine_name_of(version: domain.VersionInfo) -> str:
    """:func:`engine_name` of a registered version."""
    return engine_name(version.ref, version.digest)


def parse_engine_name(name: str) -> tuple[str, str] | None:
    """``(NAME@vN, digest)`` for an engine name, else None (not a loraflow version)."""
    match = _ENGINE_NAME.match(name)
    return (match["ref"], match["digest"]) if match else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class EngineCache:
    def __init__(self, store: ArtifactStore, root: Path, *, max_bytes: int) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(root / ".evict.lock"))

    def fetch(self, digest: str) -> Path:
        """A verified local folder holding the artifact ``digest``.

        Raises :class:`~loraflow.registry.errors.NotFoundError` if the store has no such
        artifact, and :class:`~loraflow.registry.errors.IntegrityError` if its bytes do
        not match the digest (nothing is kept then).
        """
        path = self.store.fetch(digest, self.root / digest)
        now = time.time_ns()  # set explicitly: the kernel's own file times tick in milliseconds
        os.utime(path, ns=(now, now))  # the folder's mtime is its last use
        self._evict(keep=digest)
        return path

    def cached(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _evict(self, *, keep: str) -> None:
        with self._lock:
            entries = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
            sizes = {p: _size(p) for p in entries}
            total = sum(sizes.values())
            for path in sorted(entries, key=lambda p: p.stat().st_mtime_ns):
                if total <= self.max_bytes:
                    break
                if path.name == keep:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                total -= sizes[path]
                log.info("evicted %s from the engine cache (engine.cache_max_bytes)", path.name)
