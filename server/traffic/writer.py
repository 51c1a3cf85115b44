"""The traffic writer: takes records off a bounded queue and writes them in batches, each
redacted on its way in by the store (:meth:`~loraflow.registry.traffic.TrafficStore.redact`).

The recorder (on the event loop) only ever calls :meth:`Writer.put_nowait`. Behind it the same
:class:`WriterLoop` runs in one of two places, chosen by ``traffic.writer``:

* ``process`` (the default): a child process of the gateway, started with ``spawn``, at a
  lower CPU priority (``traffic.writer_nice``). Redaction is CPU work in Python; in a process
  of its own it never holds the gateway's interpreter lock, and when the CPU is short the
  scheduler runs requests first, so the writer falls behind, its queue fills and records are
  dropped and counted, rather than requests slowed. The child blocks the optional ML imports
  of Presidio and spaCy (torch, transformers), which it never uses: it starts in about 2 s
  with some 165 MB, not 8 s and 670 MB, and the gateway process never loads Presidio at all.
  A supervisor thread in the gateway reads the child's figures and restarts it if it dies
  (the records it held are counted as ``writer_down``). The child ignores SIGINT and SIGTERM:
  the gateway tells it when to stop, after the last request, so nothing queued is lost; and
  it stops by itself if the gateway dies.
* ``thread``: a thread of the gateway. No second process, but redaction shares the lock with
  the event loop.

A write that fails is retried (``_WRITE_RETRIES``), then its records are dropped and counted.
:meth:`Writer.close` writes everything queued before it returns.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue as ProcessQueue
from pathlib import Path
from typing import Any, Literal, Protocol

from loraflow.registry.errors import LoraflowError, UnavailableError
from loraflow.registry.redact import Redactor, pseudonym_key, redactor_from_settings
from loraflow.registry.settings import Settings, TrafficSettings
from loraflow.registry.traffic import Kind, TrafficStore

log = logging.getLogger("loraflow.traffic")

Item = tuple[Kind, dict[str, Any]]
Refusal = Literal["queue_full", "writer_down"]
_STOP = None  # the end of the queue; None survives pickling, a sentinel object would not
_WRITE_RETRIES = (0.5, 1.0, 2.0)
_RESTART_BACKOFF_S = (1.0, 5.0, 30.0)
# The child never uses these; Presidio and spaCy import them when installed (seconds, hundreds of MB).
_BLOCKED_IMPORTS = ("torch", "transformers", "tensorflow", "jax", "flax")


@dataclass
class WriterStats:
    """What a writer has done so far (cumulative): its figures for ``/metrics``."""

    written: Counter[str] = field(default_factory=Counter)  # records, by kind
    redacted: Counter[str] = field(default_factory=Counter)  # PII spans, by class
    failed: int = 0  # records dropped: redaction or the sink failed
    down: int = 0  # records lost with a writer process that died
    cpu_s: float = 0.0  # CPU time spent redacting and writing

    def copy(self) -> WriterStats:
        return replace(self, written=Counter(self.written), redacted=Counter(self.redacted))

    def plus(self, other: WriterStats) -> WriterStats:
        return WriterStats(
            written=self.written + other.written,
            redacted=self.redacted + other.redacted,
            failed=self.failed + other.failed,
            down=self.down + other.down,
            cpu_s=self.cpu_s + other.cpu_s,
        )


class Writer(Protocol):
    def start(self) -> None:
        """Start writing; returns at once."""
        ...

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the writer can redact (Presidio loaded). Raises the error that stops it."""
        ...

    def put_nowait(self, item: Item) -> Refusal | None:
        """Queue ``item`` without waiting: None, or why it was not queued."""
        ...

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, then stop (blocks)."""
        ...

    @property
    def backlog(self) -> int:
        """Records accepted and not yet written (nor dropped)."""
        ...

    def stats(self) -> WriterStats: ...


class WriterLoop:
    """Batches records off a queue; the store redacts each batch with this loop's redactor and writes it."""

    def __init__(
        self,
        settings: TrafficSettings,
        store: TrafficStore,
        redactor: Redactor,
        *,
        report: Callable[[WriterStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.redactor = redactor
        self.report = report
        self._stats = WriterStats()
        self._lock = threading.Lock()
        self.received = 0  # records taken off the queue

    def snapshot(self) -> WriterStats:
        with self._lock:
            return self._stats.copy()

    def run(self, inbox: Any, *, alive: Callable[[], bool] = lambda: True) -> bool:
        """Until the stop marker (True), or ``alive()`` turns false while the queue is empty
        (False: the gateway died; everything that reached the queue has been written)."""
        stopping = False
        while not stopping:
            batch: list[Item] = []
            deadline = time.monotonic() + self.settings.flush_interval_s
            while len(batch) < self.settings.batch_max_records:
                try:
                    item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
                self.received += 1
            if batch:
                self.write(batch)
            elif not alive():
                log.error("the gateway is gone; the traffic writer stops")
                return False
        while True:  # anything put after the stop marker (a late feedback)
            try:
                item = inbox.get_nowait()
            except queue.Empty:
                return True
            if item is not _STOP:
                self.received += 1
                self.write([item])

    def write(self, batch: list[Item]) -> None:
        started = time.thread_time()
        by_kind: dict[Kind, list[dict[str, Any]]] = {"requests": [], "feedback": []}
        for kind, record in batch:
            by_kind[kind].append(record)
        failed = 0
        found: Counter[str] = Counter()
        written: Counter[str] = Counter()
        for kind, records in by_kind.items():
            if not records:
                continue
            redacted = self.store.redact(kind, records, self.redactor)
            failed += redacted.dropped
            found.update(redacted.found)
            if not redacted.records:
                continue
            for attempt, pause in enumerate((*_WRITE_RETRIES, None)):
                try:
                    self.store.write(redacted)
                    written[kind] += len(redacted.records)
                    break
                except Exception as exc:
                    if pause is None:
                        log.error(
                            "dropping %d %s records: the traffic sink failed: %s",
                            len(redacted.records),
                            kind,
                            exc,
                        )
                        failed += len(redacted.records)
                    else:
                        log.warning("traffic sink failed (try %d): %s", attempt + 1, exc)
                        time.sleep(pause)
        cpu_s = time.thread_time() - started
        with self._lock:
            self._stats.written.update(written)
            self._stats.redacted.update(found)
            self._stats.failed += failed
            self._stats.cpu_s += cpu_s
            stats = self._stats.copy()
        if self.report is not None:
            self.report(stats)


class ThreadWriter:
    """The loop in a thread of the gateway, over a ``queue.Queue``."""

    def __init__(self, settings: TrafficSettings, store: TrafficStore, redactor: Redactor) -> None:
        self.queue: queue.Queue[Item | None] = queue.Queue(maxsize=settings.queue_max_records)
        self.loop = WriterLoop(settings, store, redactor)
        self._thread: threading.Thread | None = None
        self._accepted = 0

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.loop.run, args=(self.queue,), name="loraflow-traffic-writer", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout_s: float) -> None:
        pass  # the redactor was built with the writer

    def put_nowait(self, item: Item) -> Refusal | None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            return "queue_full"
        self._accepted += 1
        return None

    def close(self, timeout_s: float = 60.0) -> None:
        if self._thread is None:
            return
        self.queue.put(_STOP)  # blocks if full: the writer is draining it
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the traffic writer did not finish within %.0f s; records may be lost", timeout_s)
        self._thread = None

    @property
    def backlog(self) -> int:
        return _backlog(self._accepted, self.loop.snapshot())

    def stats(self) -> WriterStats:
        return self.loop.snapshot()


def _backlog(accepted: int, stats: WriterStats) -> int:
    return accepted - sum(stats.written.values()) - stats.failed - stats.down


@dataclass(frozen=True)
class WriterSpec:
    """What the writer process needs to build its store and redactor (it is pickled to it)."""

    traffic: TrafficSettings
    uri: str
    key: bytes
    cache_dir: Path
    # The gateway's own level for this module's logs, so a quieted gateway has a quiet child too.
    log_level: int = logging.INFO


class ProcessWriter:
    """The loop in a child process at ``traffic.writer_nice``, over a ``multiprocessing`` queue."""

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process with threads
        self._inbox: ProcessQueue[Item | None] | None = None
        self._outbox: ProcessQueue[tuple[str, Any]] | None = None
        self._proc: BaseProcess | None = None
        self._supervisor: threading.Thread | None = None
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: LoraflowError | None = None
        self._up = False
        self._accepted = 0
        # What the running child's gateway side has accepted, in shared memory: a child whose
        # gateway died compares it with what it received and records the difference as lost.
        self._shared_accepted: Any = None
        self._lock = threading.Lock()
        self._base = WriterStats()  # figures of children that have exited
        self._current = WriterStats()  # the running child's latest figures
        self.restarts = 0

    # -- the gateway's side ----------------------------------------------------------
    def start(self) -> None:
        self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, name="loraflow-traffic-supervisor", daemon=True
        )
        self._supervisor.start()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.1):
            if self._error is not None:
                raise self._error
            if time.monotonic() > deadline:
                raise UnavailableError(f"the traffic writer process did not start within {timeout_s:.0f} s")

    def put_nowait(self, item: Item) -> Refusal | None:
        inbox = self._inbox
        if inbox is None or not self._up:  # the supervisor saw the child exit; no syscall here
            return "writer_down"
        try:
            inbox.put_nowait(item)  # pickled and sent by the queue's feeder thread, not here
        except queue.Full:
            return "queue_full"
        self._accepted += 1
        self._shared_accepted.value += 1  # only the event loop's thread writes it
        return None

    def close(self, timeout_s: float = 60.0) -> None:
        if self._supervisor is None or self._inbox is None:
            return
        self._closing.set()
        if self._up:  # a dead child's supervisor sees _closing and stops instead of restarting it
            with contextlib.suppress(queue.Full, ValueError):
                self._inbox.put(_STOP, timeout=timeout_s)  # blocks if full: the child is draining it
        if not self._done.wait(timeout_s):
            log.error("the traffic writer did not finish within %.0f s; records may be lost", timeout_s)
        self._supervisor.join(timeout_s)
        self._supervisor = None
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.exitcode is None:
                self._proc.kill()
        for channel in (self._inbox, self._outbox):
            if channel is None:
                continue
            with contextlib.suppress(Exception):
                channel.close()
                channel.join_thread()
        # Dropped, the queues' semaphores are unlinked now. A gateway stopped by SIGTERM exits
        # through the signal's default action (uvicorn raises it again after its shutdown), which
        # skips the exit-time cleanup, and Python's resource tracker reports them as leaked.
        self._inbox = self._outbox = None

    @property
    def backlog(self) -> int:
        return _backlog(self._accepted, self.stats())

    def stats(self) -> WriterStats:
        with self._lock:
            return self._base.plus(self._current)

    # -- the supervisor thread ------------------------------------------------------------
    def _spawn(self) -> None:
        inbox: ProcessQueue[Item | None] = self._ctx.Queue(maxsize=self.spec.traffic.queue_max_records)
        outbox: ProcessQueue[tuple[str, Any]] = self._ctx.Queue()
        accepted = self._ctx.Value("q", 0, lock=False)
        proc = self._ctx.Process(
            target=_child_main,
            args=(self.spec, inbox, outbox, accepted),
            name="loraflow-traffic-writer",
            daemon=True,
        )
        self._shared_accepted = accepted
        proc.start()
        self._inbox, self._outbox, self._proc = inbox, outbox, proc
        self._up = True

    def _supervise(self) -> None:
        """Reads the child's messages; restarts it, after a pause, if it exits before it was told to."""
        failures = 0
        while True:
            proc, outbox = self._proc, self._outbox
            assert proc is not None and outbox is not None
            try:
                kind, payload = outbox.get(timeout=0.2)
            except queue.Empty:
                if proc.exitcode is None:
                    continue
                self._up = False
                with contextlib.suppress(queue.Empty):  # its last words, sent before it exited
                    while True:
                        self._handle(*outbox.get(timeout=0.2))
                if self._done.is_set() or self._error is not None:
                    return  # told to stop, or it cannot start: restarting would not help
                failures += 1
                pause = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S)) - 1]
                lost = self.backlog
                log.error(
                    "the traffic writer process exited (code %s) with %d records; restarting in %.0f s",
                    proc.exitcode,
                    lost,
                    pause,
                )
                with self._lock:
                    self._base = self._base.plus(self._current).plus(WriterStats(down=lost))
                    self._current = WriterStats()
                if self._closing.wait(pause):
                    self._done.set()
                    return
                self._spawn()
                self.restarts += 1
                continue
            self._handle(kind, payload)
            if kind == "ready":
                failures = 0
            if kind in ("done", "failed"):
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind in ("stats", "done"):
            with self._lock:
                self._current = payload
        if kind == "ready":
            self._ready.set()
        elif kind == "done":
            self._done.set()
        elif kind == "failed":
            self._error = payload
            log.error("the traffic writer process could not start: %s", payload)
            self._done.set()


def _child_main(spec: WriterSpec, inbox: Any, outbox: Any, accepted: Any) -> None:
    """The writer process: build the redactor and the store, then run the loop until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C or SIGTERM is the gateway's to handle:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it drains requests, then stops this process
    logging.basicConfig(
        level=spec.log_level, format="%(asctime)s %(levelname)s %(name)s [traffic writer] %(message)s"
    )
    with contextlib.suppress(OSError):
        os.nice(spec.traffic.writer_nice)
    for name in _BLOCKED_IMPORTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # `import torch` -> ImportError
    try:
        redactor = Redactor(
            key=spec.key,
            cache_dir=spec.cache_dir,
            person_names=spec.traffic.person_names,
            spacy_model=spec.traffic.spacy_model,
        )
        store = TrafficStore(spec.uri)
    except LoraflowError as exc:
        outbox.put(("failed", exc))
        return
    except Exception as exc:
        outbox.put(("failed", UnavailableError(f"the traffic writer could not start: {exc!r}")))
        return
    outbox.put(("ready", None))
    parent = multiprocessing.parent_process()
    loop = WriterLoop(spec.traffic, store, redactor, report=lambda stats: outbox.put(("stats", stats)))
    if not loop.run(inbox, alive=lambda: parent is None or parent.is_alive()):
        # The gateway died. Everything that reached the queue is written; what it accepted and
        # never sent (its queue's feeder had not flushed it) is lost: counted, not guessed.
        lost = accepted.value - loop.received
        if lost > 0:
            log.error("the gateway died with %d accepted traffic records unsent; recording the loss", lost)
            with contextlib.suppress(Exception):
                store.record_loss(records=lost, at=datetime.now(UTC), reason="gateway died")
        return
    outbox.put(("done", loop.snapshot()))


def writer_from_settings(settings: Settings, store: TrafficStore) -> Writer:
    """The writer ``traffic.writer`` names. The thread writer builds its redactor here (so a missing
    Presidio fails the gateway's build); the process writer builds it in the child, and
    :meth:`Writer.wait_ready` raises what stopped it."""
    if settings.traffic.writer == "thread":
        return ThreadWriter(settings.traffic, store, redactor_from_settings(settings))
    spec = WriterSpec(
        traffic=settings.traffic,
        uri=settings.resolved_traffic_uri,
        key=pseudonym_key(settings),
        cache_dir=settings.home / "cache",
        log_level=logging.getLogger(__package__ or "loraflow.server.traffic").getEffectiveLevel(),
    )
    return ProcessWriter(spec)
