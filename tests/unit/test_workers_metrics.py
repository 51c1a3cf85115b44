"""The shared metrics of `serve --workers`: each worker's scrape-time figures, merged, and the
files of a worker that died without stopping cleanly forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraflow.server.shared_metrics import SharedMetrics

pytestmark = pytest.mark.unit


class Fixed(Collector):
    def __init__(self, up: float, written: float) -> None:
        self.up, self.written = up, written

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("loraflow_replica_up", "up", labels=["replica"])
        up.add_metric(["http://e1"], self.up)
        written = CounterMetricFamily("loraflow_traffic_written", "written", labels=["kind"])
        written.add_metric(["requests"], self.written)
        yield from (up, written)


def state(up: float, written: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(Fixed(up, written))
    return registry


def lines(text: bytes, prefix: str) -> set[str]:
    return {line for line in text.decode().splitlines() if line.startswith(prefix)}


def test_every_workers_figures_are_exported_under_its_pid_and_a_dead_workers_are_dropped(
    tmp_path: Path,
) -> None:
    other = subprocess.Popen(["sleep", "60"])  # stands for a second worker: a live pid
    try:
        SharedMetrics(tmp_path, pid=other.pid).publish(state(up=0.0, written=7))
        me = SharedMetrics(tmp_path)
        text = me.exposition(state(up=1.0, written=3))
        assert lines(text, "loraflow_replica_up") == {
            f'loraflow_replica_up{{replica="http://e1",worker="{os.getpid()}"}} 1.0',
            f'loraflow_replica_up{{replica="http://e1",worker="{other.pid}"}} 0.0',
        }
        assert lines(text, "loraflow_traffic_written_total") == {
            f'loraflow_traffic_written_total{{kind="requests",worker="{os.getpid()}"}} 3.0',
            f'loraflow_traffic_written_total{{kind="requests",worker="{other.pid}"}} 7.0',
        }
        assert text.decode().count("# TYPE loraflow_replica_up gauge") == 1  # one family, two workers
    finally:
        other.kill()
        other.wait()
    text = me.exposition(state(up=1.0, written=3))  # killed, so it never closed: its file is dropped
    assert lines(text, "loraflow_replica_up") == {
        f'loraflow_replica_up{{replica="http://e1",worker="{os.getpid()}"}} 1.0'
    }
    assert not (tmp_path / f"state-{other.pid}.json").exists()
    me.publish(state(up=1.0, written=3))
    me.close()  # a clean stop removes its own
    assert list(tmp_path.glob("state-*.json")) == []


class Flaky(Collector):
    """Fails its first collection, as a collector may while the loop changes what it reads."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("deque mutated during iteration")
        up = GaugeMetricFamily("loraflow_replica_up", "up", labels=["replica"])
        up.add_metric(["http://e1"], 1.0)
        yield up


def test_a_failed_publish_is_logged_and_the_next_one_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    registry.register(Flaky())
    shared = SharedMetrics(tmp_path)

    state = tmp_path / f"state-{os.getpid()}.json"

    def published() -> bool:
        return state.is_file() and "loraflow_replica_up" in state.read_text()

    async def main() -> None:
        task = asyncio.create_task(shared.publish_every(registry, interval_s=0.01))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not published():  # the first publish failed; a later one must be made
            assert loop.time() < deadline, "no publish after the failed one"
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert "publishing this worker's metrics" in caplog.text
    assert published()
