"""The routing table: which version each ``model`` a client names is served by, and hot-swap.

A background loop polls the registry revision (one indexed read). When the
revision moves, it loads a new snapshot (aliases, versions, API keys) and
*preloads* every aliased version on every healthy replica. Only then does it
swap the snapshot in, with one assignment. A request resolves its target
once, at the start, so in-flight requests finish on the version they began
with. A new alias target is resident everywhere before any request can
resolve to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from loraflow.registry import domain
from loraflow.registry.basemodel import template_matches
from loraflow.registry.errors import LoraflowError, NotFoundError
from loraflow.registry.refs import DEFAULT_ALIAS, parse_ref
from loraflow.registry.service import Registry
from loraflow.server.replicas import Fetch, Replica, ReplicaSet

log = logging.getLogger("loraflow.routing")


def engine_name(version: domain.VersionInfo) -> str:
    """The name an engine knows a version by: immutable, and bound to the exact bytes.

    ``NAME@vN`` alone could collide on a shared engine if a registry were recreated;
    the digest suffix makes a stale load impossible.
    """
    return f"{version.ref}+{version.digest[:12]}"


@dataclass(frozen=True)
class Target:
    public: str  # what the response's `model` says
    engine_model: str  # what the engine is asked for
    adapter: str | None = None
    version: int | None = None


@dataclass(frozen=True)
class Snapshot:
    revision: int = -1
    adapters: dict[str, domain.AdapterInfo] = field(default_factory=dict)
    versions: dict[str, domain.VersionInfo] = field(default_factory=dict)  # "NAME@vN"
    by_engine_name: dict[str, domain.VersionInfo] = field(default_factory=dict)
    keys: dict[str, domain.ApiKeyInfo] = field(default_factory=dict)  # sha256 -> active key

    @cached_property
    def aliased(self) -> set[str]:
        """Engine names of every version an alias points at."""
        return {
            engine_name(self.versions[f"{a.name}@v{v}"])
            for a in self.adapters.values()
            for v in a.aliases.values()
        }


class Router:
    def __init__(
        self,
        registry: Registry,
        replicas: ReplicaSet,
        *,
        base_model_id: str,
        engine_base_name: str,
        cache_dir: Path,
        poll_interval_s: float,
        base_template_hash: str | None = None,
    ) -> None:
        self.registry = registry
        self.base_template_hash = base_template_hash
        self._template_warned: set[str] = set()
        self.replicas = replicas
        self.base_model_id = base_model_id
        self.engine_base_name = engine_base_name
        self.cache_dir = cache_dir
        self.poll_interval_s = poll_interval_s
        self.snapshot = Snapshot()
        self.started_at = int(time.time())
        self._registry_ok = False

    # -- resolution --------------------------------------------------------------
    def resolve(self, model: str) -> Target:
        if model in (self.base_model_id, self.engine_base_name):
            return Target(public=self.base_model_id, engine_model=self.engine_base_name)
        snap = self.snapshot
        try:
            ref = parse_ref(model, param="model")
        except LoraflowError as exc:
            raise NotFoundError(f"the model {model!r} does not exist", param="model") from exc
        adapter = snap.adapters.get(ref.name)
        if adapter is None:
            raise NotFoundError(f"the model {model!r} does not exist", param="model")
        if ref.version is not None:
            version = ref.version
        else:
            alias = ref.alias or DEFAULT_ALIAS
            if alias not in adapter.aliases:
                raise NotFoundError(
                    f"the model {model!r} does not exist: {ref.name} has no {alias!r} alias "
                    f"(aliases: {', '.join(sorted(adapter.aliases)) or 'none'})",
                    param="model",
                )
            version = adapter.aliases[alias]
        name = f"{ref.name}@v{version}"
        info = snap.versions.get(name)
        if info is None or info.status == "archived":
            state = "archived" if info else "unknown"
            raise NotFoundError(f"the model {model!r} does not exist: {name} is {state}", param="model")
        return Target(public=name, engine_model=engine_name(info), adapter=ref.name, version=version)

    # -- files -------------------------------------------------------------------
    def _fetcher(self, snap: Snapshot) -> Fetch:
        """Fetch a version's files into the local cache, verified against its digest."""

        async def fetch(name: str) -> Path:
            digest = snap.by_engine_name[name].digest
            return await asyncio.to_thread(self.registry.artifacts.fetch, digest, self.cache_dir / digest)

        return fetch

    async def ensure_loaded(self, replica: Replica, target: Target) -> None:
        if target.adapter is not None:
            snap = self.snapshot
            await replica.ensure_loaded(target.engine_model, self._fetcher(snap), pinned=snap.aliased)

    # -- refresh -----------------------------------------------------------------
    def _load_snapshot(self) -> Snapshot:
        revision = self.registry.revision()
        adapters = {a.name: a for a in self.registry.list()}
        versions = {v.ref: v for a in adapters.values() for v in a.versions}
        keys = {k.key_hash: k for k in self.registry.store.list_api_keys() if k.revoked_at is None}
        by_engine_name = {engine_name(v): v for v in versions.values()}
        return Snapshot(
            revision=revision, adapters=adapters, versions=versions, by_engine_name=by_engine_name, keys=keys
        )

    async def _preload(self, snap: Snapshot, replicas: list[Replica]) -> None:
        keep = snap.aliased | self.snapshot.aliased  # old targets still serve until the swap
        for replica in replicas:
            for name in sorted(snap.aliased):
                await replica.ensure_loaded(name, self._fetcher(snap), pinned=keep)

    async def refresh(self) -> bool:
        """Swap in a new snapshot if the registry changed. True if it did."""
        revision = await asyncio.to_thread(self.registry.revision)
        self._registry_ok = True
        if revision == self.snapshot.revision:
            return False
        snap = await asyncio.to_thread(self._load_snapshot)
        await self._preload(snap, self.replicas.healthy())
        self.snapshot = snap
        self._warn_template_mismatches(snap)
        log.info("routing: registry revision %s, %d adapters", snap.revision, len(snap.adapters))
        return True

    def template_matches(self, version: domain.VersionInfo) -> bool | None:
        """Whether a version was trained with the chat template this gateway serves (None: unknown)."""
        return template_matches(version.chat_template_hash, self.base_template_hash)

    def _warn_template_mismatches(self, snap: Snapshot) -> None:
        for ref, version in snap.versions.items():
            if self.template_matches(version) is False and ref not in self._template_warned:
                self._template_warned.add(ref)
                log.warning(
                    "%s was trained with a different chat template than the served base model; "
                    "its prompts will be rendered differently from training",
                    ref,
                )

    async def sync_recovered(self) -> None:
        """Replicas that came (back) up: learn what they hold, and preload what aliases need."""
        for replica in await self.replicas.check_health():
            try:
                replica.reset(await replica.engine.loaded_adapters())
                await self._preload(self.snapshot, [replica])
                log.info("replica %s is up with %d adapters", replica.url, len(replica.resident))
            except LoraflowError as exc:
                replica.healthy = False
                log.warning("replica %s not ready: %s", replica.url, exc)

    @property
    def ready(self) -> bool:
        return self._registry_ok and bool(self.replicas.healthy()) and self.snapshot.revision >= 0

    async def run(self) -> None:
        while True:
            try:
                await self.sync_recovered()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep routing alive through registry/engine hiccups
                self._registry_ok = False
                log.warning("routing refresh failed: %s", exc)
            await asyncio.sleep(self.poll_interval_s)
