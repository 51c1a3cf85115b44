"""Engine replicas, which versions are resident on each, and where each version lives.

vLLM does not bound runtime-loaded adapters for us, and its unload does not
free engine memory, so each replica keeps its own LRU of resident versions,
capped at ``max_cpu_loras``. A version a request is using right now is never
evicted. Versions a replica keeps (aliased versions it is home to: *pinned*) make
room only for another pinned version, when more are homed on it than it can hold:
then the least recently used idle one goes, counted in ``pinned_evictions`` (a
sign that ``max_cpu_loras`` or ``adapter_replicas`` is too small), rather than
production requests being refused for as long as the aliases stay. A version no
alias points at never unloads a pinned one.
Loading is serialized per (replica, version) with an asyncio lock, so concurrent
requests for the same cold version trigger exactly one load.

Placement: each version has a *home set* of ``server.adapter_replicas`` replicas,
chosen by rendezvous (highest-random-weight) hashing of the version's engine name
against each replica's URL. Every gateway computes the same sets from the same
replica list, and when a replica joins or leaves, only the versions whose top-k
included it move. A request goes to the least-loaded healthy home replica, and
elsewhere only when every home replica is down, draining or saturated
(``server.replica_max_in_flight``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import asynccontextmanager

from loraflow.registry.errors import EngineUnavailableError, OverloadedError
from loraflow.server.engine.protocol import Engine

log = logging.getLogger("loraflow.replicas")

EngineFactory = Callable[[str], Engine]  # a replica's URL -> a client for it


def rendezvous_score(url: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{url}\n{name}".encode()).digest()[:8], "big")


class Replica:
    def __init__(self, engine: Engine, *, max_resident: int) -> None:
        self.engine = engine
        self.max_resident = max_resident
        self.healthy = False
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.in_flight: Counter[str] = Counter()
        self.loads = 0  # adapter loads since the engine (re)started
        self.load_seconds = 0.0  # and the time they took, end to end (fetch, verify, load)
        self.pinned_evictions = 0  # pinned versions unloaded because more were homed here than fit
        self.draining = False  # takes no new requests (a planned restart is coming)
        self._idle = asyncio.Event()
        self._idle.set()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loading: set[str] = set()

    @property
    def url(self) -> str:
        return self.engine.url

    def reset(self, resident: list[str]) -> None:
        """After the engine (re)started: it holds exactly ``resident``."""
        self.resident = OrderedDict((name, None) for name in resident)
        self.loads, self.load_seconds = 0, 0.0

    def forget(self, name: str) -> None:
        """The engine turned out not to hold ``name`` any more, and could not resolve it again."""
        self.resident.pop(name, None)

    @property
    def busy(self) -> int:
        return sum(self.in_flight.values())

    async def ensure_loaded(self, name: str, *, pinned: Collection[str]) -> None:
        """Return once ``name`` is loaded on the engine (it fetches the files itself)."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        async with self._locks[name]:  # also held while ``name`` is being unloaded
            if name in self.resident:
                return
            await self._make_room(name, pinned)
            self._loading.add(name)  # holds its slot, so concurrent loads of others make room for it
            started = time.perf_counter()
            try:
                await self.engine.load_adapter(name)
            finally:
                self._loading.discard(name)
            self.loads += 1
            self.load_seconds += time.perf_counter() - started
            self.resident[name] = None

    def _victim(self, loading: str, pinned: Collection[str]) -> str | None:
        """The least recently used idle version to unload for ``loading``: an unpinned one; a pinned
        one only for another pinned version (more are homed here than fit); else None."""
        idle = [n for n in self.resident if n != loading and not self.in_flight[n]]
        unpinned = next((n for n in idle if n not in pinned), None)
        if unpinned is not None or loading not in pinned:
            return unpinned
        return idle[0] if idle else None

    def _full(self, pinned: Collection[str]) -> OverloadedError:
        held = len(self.resident) + len(self._loading)
        kept = [n for n in self.resident if n in pinned and not self.in_flight[n]]
        if not kept:
            return OverloadedError(
                f"a replica has {held} adapters resident or loading (server.max_cpu_loras) "
                "and all are in use; retry shortly"
            )
        return OverloadedError(
            f"a replica holds {held} adapters (server.max_cpu_loras), {len(kept)} of them aliased "
            "versions kept for their traffic and the rest in use; a version no alias points at is served "
            "here once server.max_cpu_loras exceeds the aliased versions homed on each replica "
            "(server.adapter_replicas spreads them)"
        )

    async def _make_room(self, loading: str, pinned: Collection[str]) -> None:
        while len(self.resident) + len(self._loading) >= self.max_resident:
            victim = self._victim(loading, pinned)
            if victim is None:
                raise self._full(pinned)
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
            if victim in pinned:
                self.pinned_evictions += 1
                if self.pinned_evictions == 1:  # then counted in loraflow_pinned_evictions_total
                    log.warning(
                        "%s: more aliased versions are homed here than server.max_cpu_loras (%d) holds; "
                        "unloaded %s to load %s, and will go on swapping them as their requests come",
                        self.url,
                        self.max_resident,
                        victim,
                        loading,
                    )

    @asynccontextmanager
    async def using(self, name: str | None) -> AsyncIterator[None]:
        name = name or ""  # the base model: counted too, so draining waits for it
        self.in_flight[name] += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight[name] -= 1
            if not self.busy:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight here; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class ReplicaSet:
    """The replicas a gateway routes to. Membership may change while serving (DNS discovery)."""

    def __init__(
        self, engines: Iterable[Engine], *, max_resident: int, home_size: int = 2, max_in_flight: int = 32
    ) -> None:
        self.max_resident = max_resident
        self.home_size = home_size
        self.max_in_flight = max_in_flight
        self.replicas = [Replica(e, max_resident=max_resident) for e in engines]
        self.generation = 0  # bumped whenever membership changes
        self._homes: dict[str, list[Replica]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def home(self, name: str) -> list[Replica]:
        """The replicas ``name`` lives on, best first: the same on every gateway with the same members."""
        home = self._homes.get(name)
        if home is None:
            ranked = sorted(self.replicas, key=lambda r: rendezvous_score(r.url, name), reverse=True)
            home = self._homes[name] = ranked[: self.home_size]
        return home

    def homes_on(self, replica: Replica, names: Iterable[str]) -> set[str]:
        """Of ``names``, those whose home set includes ``replica``."""
        return {n for n in names if replica in self.home(n)}

    def pick(self, name: str | None, *, exclude: Collection[Replica] = ()) -> Replica:
        """The replica for a request: the least busy available home replica of ``name``; if none is
        available (down, draining, excluded after a failure, or saturated), the least busy other
        one, preferring a replica that already holds the version."""
        available = [r for r in self.replicas if r.healthy and not r.draining and r not in exclude]
        if not available:
            raise EngineUnavailableError("no engine replica is available; retry shortly")
        if name is None:
            return min(available, key=lambda r: r.busy)
        unsaturated = [r for r in available if r.busy < self.max_in_flight]
        home = [r for r in self.home(name) if r in unsaturated]
        if home:
            return min(home, key=lambda r: r.busy)
        return min(unsaturated or available, key=lambda r: (name not in r.resident, r.busy))

    def set_members(self, urls: Collection[str], make: EngineFactory) -> bool:
        """Make the replicas exactly ``urls``. New ones start unhealthy (the next health check
        brings them in); a removed one leaves the routing now and its client is closed once
        its in-flight requests have finished. True if anything changed."""
        current = {r.url: r for r in self.replicas}
        wanted = set(urls)
        if wanted == set(current):
            return False
        for url, replica in current.items():
            if url not in wanted:
                log.info("replica %s left", url)
                task = asyncio.create_task(self._close_when_idle(replica))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        kept = [r for r in self.replicas if r.url in wanted]
        added = [Replica(make(url), max_resident=self.max_resident) for url in sorted(wanted - set(current))]
        for replica in added:
            log.info("replica %s joined", replica.url)
        self.replicas = kept + added
        self.generation += 1
        self._homes.clear()
        return True

    @staticmethod
    async def _close_when_idle(replica: Replica, timeout_s: float = 600.0) -> None:
        replica.healthy = False
        try:
            await replica.wait_idle(timeout_s)
        finally:
            await replica.engine.aclose()

    async def check_health(self) -> list[Replica]:
        """Update health flags; return replicas that just came (back) up."""
        replicas = list(self.replicas)
        results = await asyncio.gather(*(r.engine.health() for r in replicas))
        recovered = []
        for replica, ok in zip(replicas, results, strict=True):
            if ok and not replica.healthy:
                recovered.append(replica)
            replica.healthy = ok
        return recovered

    async def aclose(self) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        for replica in self.replicas:
            await replica.engine.aclose()
