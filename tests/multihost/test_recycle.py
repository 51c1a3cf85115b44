"""A supervised replica past ``server.max_adapter_loads`` is drained, restarted and preloaded again
under load, and no request fails. Its own module: it runs two supervised engines of its own."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from loraflow.registry.service import Registry
from tests.factories import FORCED
from tests.multihost.cluster import start_gateway, steady_load, until, wait_up
from tests.multihost.conftest import Cluster

pytestmark = [pytest.mark.multihost, pytest.mark.slow]


def _metric(text: str, name: str) -> dict[str, float]:
    """{replica: value} for a per-replica metric."""
    found = re.findall(rf'^{name}{{replica="([^"]+)"}} ([0-9.e+-]+)$', text, flags=re.M)
    return {replica: float(value) for replica, value in found}


def test_draining_and_restarting_a_replica_under_load_fails_no_request(
    cluster: Cluster, registry: Registry, tmp_path: Path
) -> None:
    for seed in (1, 2, 3, 4):
        registry.register("churn", cluster.adapters[seed - 1], base_model=str(cluster.base))
    registry.promote("churn", 1, force=True, reason=FORCED)
    gw = start_gateway(
        cluster.base,
        tmp_path / "gateway",
        cluster.env,
        poll_interval_s=0.1,
        supervised_engines=2,
        adapter_replicas=1,
        max_adapter_loads=2,
    )
    try:
        wait_up(gw, "/ready", 400)
        statuses: list[int] = []
        loops = [(gw.url, ["churn", "churn@v2"]), (gw.url, ["churn@v3", "churn@v4", "churn"])]
        failures: list[str] = []
        with steady_load(loops, statuses, failures):

            def recycled_and_back() -> bool:
                text = httpx.get(f"{gw.url}/metrics", timeout=10).text
                recycles = _metric(text, "loraflow_engine_recycles_total")
                draining = _metric(text, "loraflow_replica_draining")
                up = _metric(text, "loraflow_replica_up")
                done = [r for r, n in recycles.items() if n >= 1 and draining.get(r) == 0 and up.get(r) == 1]
                return bool(done)

            until(recycled_and_back, "a replica to be drained, restarted and back", 400)
            served = len(statuses)
            until(lambda: len(statuses) >= served + 10, "traffic after the restart", 120)
        assert len(statuses) > 20 and set(statuses) == {200}, "\n".join(failures)
        log = (tmp_path / "gateway" / "gateway.log").read_text()
        assert "draining" in log and "restarted and preloaded" in log
    finally:
        gw.stop()
