"""Planned restarts of supervised replicas, to give back what unloaded adapters still hold.

vLLM's unload does not free engine memory (vllm#54839), so a replica that has loaded
many versions keeps growing. After ``server.max_adapter_loads`` loads, a supervised
replica is *drained*: it takes no new requests (they go to the other replicas of each
home set, or anywhere if none), its in-flight requests finish, its engine restarts,
and the versions it is home to are preloaded again before it takes traffic. One
replica at a time, and only while another healthy replica can take its traffic.
"""

from __future__ import annotations

import asyncio
import logging

from loraflow.registry.errors import LoraflowError
from loraflow.server.engine.supervisor import EngineProcess
from loraflow.server.replicas import Replica
from loraflow.server.routing import RoutingTable

log = logging.getLogger("loraflow.recycle")


class Recycler:
    def __init__(
        self,
        routes: RoutingTable,
        processes: list[EngineProcess],
        *,
        max_loads: int,
        drain_timeout_s: float,
        interval_s: float,
    ) -> None:
        self.routes = routes
        self.processes = {p.url: p for p in processes}
        self.max_loads = max_loads
        self.drain_timeout_s = drain_timeout_s
        self.interval_s = interval_s
        self._postponed: set[str] = set()
        # Loads right after a replica's last planned restart: its home versions, preloaded again.
        # Only loads beyond those count, or a replica home to more than max_loads versions would
        # be drained again as soon as it was back.
        self._baseline: dict[str, int] = {}

    def loads_since_recycle(self, replica: Replica) -> int:
        return max(0, replica.loads - self._baseline.get(replica.url, 0))

    def due(self) -> tuple[Replica, EngineProcess] | None:
        """The first supervised replica past its load budget that can be drained now."""
        replicas = self.routes.replicas.replicas
        for replica in replicas:
            process = self.processes.get(replica.url)
            if process is None or replica.draining or self.loads_since_recycle(replica) < self.max_loads:
                continue
            if not any(r.healthy and not r.draining for r in replicas if r is not replica):
                if replica.url not in self._postponed:
                    self._postponed.add(replica.url)
                    log.warning(
                        "replica %s has loaded %d adapters (server.max_adapter_loads = %d) but no other "
                        "replica can take its traffic; its restart waits for one",
                        replica.url,
                        replica.loads,
                        self.max_loads,
                    )
                continue
            self._postponed.discard(replica.url)
            return replica, process
        return None

    async def recycle(self, replica: Replica, process: EngineProcess) -> None:
        log.info("draining %s after %d adapter loads", replica.url, replica.loads)
        replica.draining = True
        try:
            if not await replica.wait_idle(self.drain_timeout_s):
                log.warning(
                    "%s still has %d requests after drain_timeout_s; restarting", replica.url, replica.busy
                )
            replica.healthy = False
            await process.restart()
            await self.routes.preload_home(replica)
            self._baseline[replica.url] = replica.loads
            replica.healthy = True
            log.info("%s restarted and preloaded %d versions", replica.url, len(replica.resident))
        finally:
            replica.draining = False

    async def run(self) -> None:
        while True:
            due = self.due()
            if due is not None:
                try:
                    await self.recycle(*due)
                except LoraflowError as exc:  # e.g. the engine failed to start again; retried later
                    log.error("restarting %s failed: %s", due[0].url, exc)
            await asyncio.sleep(self.interval_s)
