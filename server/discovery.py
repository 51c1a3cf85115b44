"""Engine replicas found by DNS: one ``HOST:PORT`` resolved again every ``server.dns_interval_s``.

A Kubernetes headless Service answers with one address per ready engine pod, so
engines that start, stop or move join and leave the routing without a gateway
restart. A lookup that fails keeps the last known members (a DNS hiccup must not
empty the routing); a lookup that succeeds with no address empties it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from loraflow.server.replicas import EngineFactory, ReplicaSet

log = logging.getLogger("loraflow.discovery")

Resolve = Callable[[str, int], Awaitable[list[str]]]  # host, port -> IP addresses


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def replica_url(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address)
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


class DnsDiscovery:
    def __init__(
        self,
        target: str,
        make_engine: EngineFactory,
        *,
        interval_s: float,
        resolve: Resolve = resolve_host,
    ) -> None:
        host, _, port = target.rpartition(":")
        self.host, self.port = host, int(port)
        self.make_engine = make_engine
        self.interval_s = interval_s
        self.resolve = resolve
        self.lookups_failed = 0

    async def refresh(self, replicas: ReplicaSet) -> bool:
        """Resolve once and apply the result. True if the members changed."""
        try:
            addresses = await self.resolve(self.host, self.port)
        except OSError as exc:  # socket.gaierror included
            self.lookups_failed += 1
            log.warning("cannot resolve %s: %s; keeping %d replicas", self.host, exc, len(replicas.replicas))
            return False
        return replicas.set_members([replica_url(a, self.port) for a in addresses], self.make_engine)

    async def run(self, replicas: ReplicaSet) -> None:
        while True:
            await self.refresh(replicas)
            await asyncio.sleep(self.interval_s)
