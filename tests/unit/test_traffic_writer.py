"""The traffic writer process (``traffic.writer = "process"``, what ``loraflow serve`` runs): it
writes everything redacted, a stalled writer never slows the event loop's side, a dead one is
restarted, and one that cannot start fails the gateway's start with its typed error.

Each test starts a real writer process (about 2 s: Presidio loads in it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraflow.registry.errors import MissingDependencyError
from loraflow.registry.settings import Settings, TrafficSettings
from loraflow.registry.traffic import TrafficStore
from loraflow.server.traffic.recorder import TrafficRecorder
from loraflow.server.traffic.writer import ProcessWriter, writer_from_settings
from tests.fake_vllm import Setup, gateway, wait
from tests.fake_vllm import gateway_setup as gateway_setup
from tests.unit.test_traffic import EMAIL, exchange, returns_while_blocked

# Each test runs a real writer process (Presidio loads in it): a real subprocess.
pytestmark = pytest.mark.integration


def make(tmp_path: Path, **traffic: object) -> tuple[TrafficRecorder, TrafficStore, ProcessWriter]:
    settings = Settings(
        home=tmp_path / "home", traffic=TrafficSettings.model_validate({"sample_rate": 1.0, **traffic})
    )
    store = TrafficStore(settings.resolved_traffic_uri)
    writer = writer_from_settings(settings, store)
    assert isinstance(writer, ProcessWriter)
    return TrafficRecorder(settings.traffic, store, writer), store, writer


@pytest.fixture
def closing() -> Iterator[list[TrafficRecorder]]:
    """Recorders to close even when a test fails, so no writer process outlives it."""
    recorders: list[TrafficRecorder] = []
    yield recorders
    for recorder in recorders:
        recorder.close(timeout_s=10)


def running(
    tmp_path: Path, closing: list[TrafficRecorder], **traffic: object
) -> tuple[TrafficRecorder, TrafficStore, ProcessWriter]:
    recorder, store, writer = make(tmp_path, **traffic)
    closing.append(recorder)
    recorder.start()
    recorder.wait_ready()
    return recorder, store, writer


def child_pid(writer: ProcessWriter) -> int:
    proc = writer._proc
    assert proc is not None and proc.pid is not None
    return proc.pid


def test_the_writer_process_redacts_writes_and_close_loses_nothing(
    tmp_path: Path, closing: list[TrafficRecorder]
) -> None:
    recorder, store, writer = running(tmp_path, closing, batch_max_records=7, flush_interval_s=30)
    assert os.getpriority(os.PRIO_PROCESS, child_pid(writer)) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
    ids = []
    for _ in range(100):
        ex = exchange()
        ids.append(ex.request_id)
        assert recorder.offer(ex)
    recorder.close()  # long before the 30 s flush interval: close must not wait for it, nor lose any
    assert writer._proc is not None and writer._proc.exitcode == 0
    rows = list(store.read("requests"))
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "home").rglob("*.jsonl"))
    assert EMAIL.encode() not in raw and b"<EMAIL_ADDRESS_" in raw
    stats = recorder.stats()
    assert stats.written["requests"] == 100 and stats.redacted["EMAIL_ADDRESS"] == 200
    assert stats.cpu_s > 0 and recorder.backlog == 0


def test_a_stalled_writer_process_never_slows_offers_and_close_writes_what_was_queued(
    tmp_path: Path, closing: list[TrafficRecorder]
) -> None:
    recorder, store, writer = running(tmp_path, closing, queue_max_records=20, flush_interval_s=0.05)
    pid = child_pid(writer)
    os.kill(pid, signal.SIGSTOP)  # the writer gets no CPU at all: the worst sink there is
    try:
        # Stopped for the whole call: an offer that waited on the writer would never return.
        results = returns_while_blocked(lambda: [recorder.offer(exchange()) for _ in range(200)])
        assert results.count(True) == 20 and recorder.dropped["queue_full"] == 180
        assert recorder.backlog == 20
    finally:
        os.kill(pid, signal.SIGCONT)
    recorder.close()
    assert len(list(store.read("requests"))) == 20 and recorder.written["requests"] == 20


def test_a_killed_writer_process_is_restarted_and_what_it_held_is_counted(
    tmp_path: Path, closing: list[TrafficRecorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("loraflow.server.traffic.writer._RESTART_BACKOFF_S", (0.1,))
    recorder, store, writer = running(tmp_path, closing, flush_interval_s=0.05)
    assert recorder.offer(exchange())
    wait(lambda: recorder.written["requests"] == 1, "the first record written")
    first = child_pid(writer)
    os.kill(first, signal.SIGSTOP)
    assert recorder.offer(exchange())  # queued for a writer that will never take it
    os.kill(first, signal.SIGKILL)
    wait(lambda: writer.restarts == 1 and child_pid(writer) != first, "a new writer process", 30)
    wait(lambda: writer._ready.is_set() and writer._up, "it is up", 30)
    assert recorder.dropped["writer_down"] == 1
    assert recorder.offer(exchange())
    recorder.close()
    assert len(list(store.read("requests"))) == 2 and recorder.written["requests"] == 2


def test_a_writer_that_cannot_start_fails_the_gateways_start_with_its_typed_error(
    tmp_path: Path, gateway_setup: Setup, closing: list[TrafficRecorder]
) -> None:
    missing = {"person_names": True, "spacy_model": "no_such_spacy_pipeline_xq"}
    recorder, _, _ = make(tmp_path, **missing)
    closing.append(recorder)
    recorder.start()
    with pytest.raises(MissingDependencyError) as info:
        recorder.wait_ready(60)
    assert info.value.param == "traffic.spacy_model"

    client = gateway(gateway_setup, traffic={"writer": "process", "sample_rate": 1.0, **missing})
    with pytest.raises(MissingDependencyError), client:
        pass
    assert isinstance(client.app.state.startup_error, MissingDependencyError)  # type: ignore[attr-defined]


EXIT_BY_SIGTERM = """
import os, signal, sys
from pathlib import Path

def main() -> None:
    from loraflow.registry.settings import Settings
    from loraflow.registry.traffic import TrafficStore
    from loraflow.server.traffic.writer import writer_from_settings

    root = Path(sys.argv[1])
    settings = Settings(home=root, artifact_uri=str(root / "a"))
    writer = writer_from_settings(settings, TrafficStore(str(root / "t")))
    writer.start()
    writer.wait_ready(60)
    writer.close()
    os.kill(os.getpid(), signal.SIGTERM)  # as uvicorn ends a gateway: the signal's default action

if __name__ == "__main__":
    main()
"""


def test_a_gateway_ended_by_sigterm_leaves_no_leaked_semaphores(tmp_path: Path) -> None:
    """SIGTERM's default action skips exit-time cleanup, so close() must free the queues itself;
    otherwise Python's resource tracker prints a warning into every gateway's log."""
    script = tmp_path / "gateway.py"
    script.write_text(EXIT_BY_SIGTERM)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "leaked semaphore" not in done.stderr, done.stderr[-2000:]


def test_the_writer_process_logs_at_the_gateways_level_for_traffic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that quiets its traffic logs (the demo does) gets a quiet writer process too."""
    import logging

    settings = Settings(home=tmp_path / "home", traffic=TrafficSettings(writer="process"))
    logger = logging.getLogger("loraflow.server.traffic")
    monkeypatch.setattr(logger, "level", logging.ERROR)
    writer = writer_from_settings(settings, TrafficStore(str(tmp_path / "traffic")))
    assert isinstance(writer, ProcessWriter) and writer.spec.log_level == logging.ERROR
    monkeypatch.setattr(logger, "level", logging.INFO)
    writer = writer_from_settings(settings, TrafficStore(str(tmp_path / "traffic")))
    assert isinstance(writer, ProcessWriter) and writer.spec.log_level == logging.INFO


KILLED_WITH_A_QUEUE = """
import os, signal, sys
from datetime import UTC, datetime
from pathlib import Path

def main() -> None:
    from loraflow.registry.settings import Settings, TrafficSettings
    from loraflow.registry.traffic import TrafficStore, new_request_id
    from loraflow.server.traffic.recorder import Exchange, TrafficRecorder
    from loraflow.server.traffic.writer import writer_from_settings

    root = Path(sys.argv[1])
    settings = Settings(home=root, traffic=TrafficSettings(sample_rate=1.0, queue_max_records=5000))
    store = TrafficStore(settings.resolved_traffic_uri)
    recorder = TrafficRecorder(settings.traffic, store, writer_from_settings(settings, store))
    recorder.start()
    recorder.wait_ready(60)
    accepted = 0
    for i in range(3000):
        now = datetime.now(UTC)
        accepted += recorder.offer(Exchange(
            request_id=new_request_id(now), at=now, adapter="support", version=1,
            endpoint="/v1/chat/completions",
            request={"messages": [{"role": "user", "content": f"order {i}"}]},
            status=200, latency_s=0.01, size_bytes=100,
        ))
    print(accepted, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the gateway dies with its queue full

if __name__ == "__main__":
    main()
"""


def test_records_a_killed_gateway_accepted_are_written_or_counted_as_lost(tmp_path: Path) -> None:
    script = tmp_path / "gateway.py"
    script.write_text(KILLED_WITH_A_QUEUE)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    accepted = int(done.stdout.strip())
    assert accepted > 0
    store = TrafficStore(Settings(home=tmp_path).resolved_traffic_uri)

    def accounted() -> tuple[int, int]:
        return len(list(store.read("requests"))), sum(loss["records"] for loss in store.losses())

    # The orphaned writer drains what reached it, then records what never did.
    wait(lambda: sum(accounted()) == accepted, f"{accepted} records written or counted lost", 120)
    written, lost = accounted()
    assert written + lost == accepted  # (a burst: most of it never left the gateway's feeder)
