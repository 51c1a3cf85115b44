"""Metrics shared by the gateway processes of ``loraflow serve --workers N``
(:mod:`loraflow.server.workers` starts them).

A scrape reaches one worker at random, so each worker publishes what its scrape-time collectors
see (replica health, residency, traffic writer and drift figures) to a folder the supervisor made
(``PROMETHEUS_MULTIPROC_DIR``, prometheus_client's own switch) every second; the scraping worker
exports every worker's, each sample labelled ``worker`` (its pid), its own read fresh. Request
metrics (counters, histograms, the in-flight gauge) use prometheus_client's multiprocess mode in
the same folder, summed at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

PUBLISH_INTERVAL_S = 1.0  # how stale another worker's scrape-time figures may be
ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("loraflow.workers")


class SharedMetrics:
    """One worker's side of the shared metrics folder."""

    def __init__(self, folder: Path, *, pid: int | None = None) -> None:
        self.folder = folder
        self.pid = os.getpid() if pid is None else pid

    def _snapshot_path(self, pid: int) -> Path:
        return self.folder / f"state-{pid}.json"

    def publish(self, state: CollectorRegistry) -> None:
        """Write what this worker's scrape-time collectors see now (atomically: write, then rename)."""
        self._write(self._snapshot(state))

    def _snapshot(self, state: CollectorRegistry) -> str:
        """On the event loop, like a scrape: the collectors read state the loop changes."""
        families = [
            {
                "name": family.name,
                "documentation": family.documentation,
                "type": family.type,
                "unit": family.unit,
                "samples": [[s.name, s.labels, s.value] for s in family.samples],
            }
            for family in state.collect()
        ]
        return json.dumps(families)

    def _write(self, text: str) -> None:
        path = self._snapshot_path(self.pid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    async def publish_every(self, state: CollectorRegistry, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        """Until cancelled; a failed publish is logged and the next one tried (the figures other
        workers export for this one are then up to a period older)."""
        while True:
            try:
                await asyncio.to_thread(self._write, self._snapshot(state))
            except Exception:
                log.exception("publishing this worker's metrics to %s failed", self.folder)
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """This worker is stopping: its snapshot and its live gauges leave the sums."""
        self._snapshot_path(self.pid).unlink(missing_ok=True)
        mark_process_dead(self.pid, str(self.folder))  # type: ignore[no-untyped-call]

    def exposition(self, state: CollectorRegistry) -> bytes:
        self._forget_dead_workers()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.folder))  # type: ignore[no-untyped-call]
        registry.register(_WorkersState(self, state))
        return generate_latest(registry)

    def _forget_dead_workers(self) -> None:
        """A worker killed without ``close`` (uvicorn restarts it under a new pid) leaves files.
        Two workers answering scrapes at once may both remove them: a file already gone is fine."""
        for pid, path in self._snapshot_files():
            if pid != self.pid and not _alive(pid):
                path.unlink(missing_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    mark_process_dead(pid, str(self.folder))  # type: ignore[no-untyped-call]

    def _snapshot_files(self) -> Iterator[tuple[int, Path]]:
        for path in sorted(self.folder.glob("state-*.json")):
            pid = path.stem.removeprefix("state-")
            if pid.isdigit():
                yield int(pid), path

    def snapshots(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        for pid, path in self._snapshot_files():
            if pid != self.pid:
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    yield pid, json.loads(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _WorkersState(Collector):
    """Every worker's scrape-time families, merged by name, each sample labelled ``worker``."""

    def __init__(self, shared: SharedMetrics, state: CollectorRegistry) -> None:
        self.shared = shared
        self.state = state

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}

        def add(pid: int, name: str, documentation: str, typ: str, unit: str, samples: Any) -> None:
            family = merged.get(name)
            if family is None:
                family = merged[name] = Metric(name, documentation, typ, unit)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, {**labels, "worker": str(pid)}, value)

        for family in self.state.collect():
            add(
                self.shared.pid,
                family.name,
                family.documentation,
                family.type,
                family.unit,
                [(s.name, s.labels, s.value) for s in family.samples],
            )
        for pid, families in self.shared.snapshots():
            for f in families:
                add(pid, f["name"], f["documentation"], f["type"], f["unit"], f["samples"])
        yield from merged.values()
