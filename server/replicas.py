"""Engine replicas and which adapter versions are resident on each.

vLLM does not bound runtime-loaded adapters for us, and its unload does not
free engine memory, so each replica keeps its own LRU of resident versions,
capped at ``max_cpu_loras``. Versions that an alias points at, or that a
request is using right now, are never evicted. Loading is serialized per
(replica, version) with an asyncio lock, so concurrent requests for the same
cold version trigger exactly one load.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from pathlib import Path

from loraflow.registry.errors import EngineUnavailableError, OverloadedError
from loraflow.server.engine.protocol import Engine

Fetch = Callable[[str], Awaitable[Path]]  # engine adapter name -> verified local folder


class Replica:
    def __init__(self, engine: Engine, *, max_resident: int) -> None:
        self.engine = engine
        self.max_resident = max_resident
        self.healthy = False
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.in_flight: Counter[str] = Counter()
        self.loads = 0  # adapter loads since the engine (re)started
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loading: set[str] = set()

    @property
    def url(self) -> str:
        return self.engine.url

    def reset(self, resident: list[str]) -> None:
        """After the engine (re)started: it holds exactly ``resident``."""
        self.resident = OrderedDict((name, None) for name in resident)
        self.loads = 0

    def forget(self, name: str) -> None:
        """The engine turned out not to hold ``name`` (it restarted between health checks)."""
        self.resident.pop(name, None)

    async def ensure_loaded(self, name: str, fetch: Fetch, *, pinned: set[str]) -> None:
        """Return once ``name`` is loaded on the engine (loading it first if needed)."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        async with self._locks[name]:  # also held while ``name`` is being unloaded
            if name in self.resident:
                return
            await self._make_room(pinned | {name})
            self._loading.add(name)  # holds its slot, so concurrent loads of others make room for it
            try:
                path = await fetch(name)
                await self.engine.load_adapter(name, str(path))
            finally:
                self._loading.discard(name)
            self.loads += 1
            self.resident[name] = None

    async def _make_room(self, keep: set[str]) -> None:
        while len(self.resident) + len(self._loading) >= self.max_resident:
            victim = next((n for n in self.resident if n not in keep and not self.in_flight[n]), None)
            if victim is None:
                raise OverloadedError(
                    f"replica {self.url} has {len(self.resident) + len(self._loading)} adapters resident "
                    "or loading (server.max_cpu_loras) and all are in use; retry shortly"
                )
            # Out of `resident` before the unload is awaited, and under the victim's own lock, so a
            # request arriving meanwhile waits for the unload to finish and then loads it again,
            # rather than being sent to an engine that is dropping it.
            del self.resident[victim]
            async with self._locks[victim]:
                try:
                    await self.engine.unload_adapter(victim)
                except BaseException:
                    # The engine may still hold it: keep it (as least recently used) rather than
                    # believe it gone and later ask the engine to load what it already has.
                    self.resident[victim] = None
                    self.resident.move_to_end(victim, last=False)
                    raise

    @asynccontextmanager
    async def using(self, name: str | None) -> AsyncIterator[None]:
        if name is None:
            yield
            return
        self.in_flight[name] += 1
        try:
            yield
        finally:
            self.in_flight[name] -= 1


class ReplicaSet:
    def __init__(self, engines: list[Engine], *, max_resident: int) -> None:
        self.replicas = [Replica(e, max_resident=max_resident) for e in engines]

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def pick(self, name: str | None, *, exclude: Collection[Replica] = ()) -> Replica:
        """A healthy replica, preferring one that already holds the version, then the least busy."""
        candidates = [r for r in self.healthy() if r not in exclude]
        if not candidates:
            raise EngineUnavailableError("no engine replica is available; retry shortly")
        return min(
            candidates, key=lambda r: (name is not None and name not in r.resident, sum(r.in_flight.values()))
        )

    async def check_health(self) -> list[Replica]:
        """Update health flags; return replicas that just came (back) up."""
        results = await asyncio.gather(*(r.engine.health() for r in self.replicas))
        recovered = []
        for replica, ok in zip(self.replicas, results, strict=True):
            if ok and not replica.healthy:
                recovered.append(replica)
            replica.healthy = ok
        return recovered
