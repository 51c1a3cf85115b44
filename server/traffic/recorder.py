"""Recording served requests without slowing them: sample, hold, redact, write, all off the request path.

On the request path (the event loop) :meth:`TrafficRecorder.offer` does O(1) work and never
waits: it decides by a hash of the request id whether the request is sampled (the same
answer on every gateway replica), then either puts the raw exchange on a bounded
``queue.Queue`` (``put_nowait``: a full queue drops it and counts the drop) or parks it in a
bounded in-memory *rescue* buffer for ``traffic.rescue_window_s``. Errors are always
sampled. Feedback for a parked request rescues it onto the queue.

One writer thread takes batches off the queue, redacts every string in them with
:class:`~loraflow.server.traffic.redact.Redactor` (Presidio, keyed pseudonyms) and writes
them to the :class:`~loraflow.registry.traffic.TrafficStore`. So nothing unredacted is
ever written, and redaction never runs in the event loop. A write that fails is retried,
then dropped and counted. :meth:`close` (the app's shutdown, after uvicorn has drained the
requests) writes whatever is queued before it returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from loraflow.registry.errors import NotFoundError
from loraflow.registry.settings import Settings, TrafficSettings
from loraflow.registry.traffic import TrafficStore
from loraflow.server.traffic.redact import Redactor

log = logging.getLogger("loraflow.traffic")

DropReason = Literal["queue_full", "write_failed", "rescue_overflow"]
_STOP = object()
_WRITE_RETRIES = (0.5, 1.0, 2.0)


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is sampled at ``rate``: the first 64 bits of sha256(id) as a fraction."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64 < rate


def pseudonym_key(settings: Settings) -> bytes:
    """``traffic.pseudonym_key``, else a random key made once in ``$home/secrets/pseudonym.key`` (0600)."""
    if settings.traffic.pseudonym_key is not None:
        return settings.traffic.pseudonym_key.get_secret_value().encode()
    path = settings.home / "secrets" / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".pseudonym.key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip().encode()


def redactor_from_settings(settings: Settings) -> Redactor:
    return Redactor(
        key=pseudonym_key(settings),
        cache_dir=settings.home / "cache",
        person_names=settings.traffic.person_names,
        spacy_model=settings.traffic.spacy_model,
    )


@dataclass
class Exchange:
    """What the gateway saw of one request to an adapter version, before any redaction."""

    request_id: str
    at: datetime
    adapter: str
    version: int
    endpoint: str
    request: dict[str, Any]
    status: int
    latency_s: float
    stream: bool = False
    response: list[dict[str, Any]] = field(default_factory=list)  # per choice: index, content, finish_reason
    usage: dict[str, int] | None = None
    error: str | None = None  # the error code, for a failed request
    key: str | None = None  # the API key's name, never the key

    def record(self, *, sampled: bool) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "at": self.at.isoformat(),
            "adapter": self.adapter,
            "version": self.version,
            "endpoint": self.endpoint,
            "request": self.request,
            "response": self.response,
            "usage": self.usage,
            "latency_s": round(self.latency_s, 6),
            "status": self.status,
            "error": self.error,
            "stream": self.stream,
            "key": self.key,
            "sampled": sampled,  # False: kept because feedback rescued it
        }


@dataclass(frozen=True)
class Feedback:
    request_id: str
    at: datetime
    rating: int
    correction: str | None
    comment: str | None
    key: str | None

    def record(self, adapter: str, version: int) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "at": self.at.isoformat(),
            "adapter": adapter,
            "version": version,
            "rating": self.rating,
            "correction": self.correction,
            "comment": self.comment,
            "key": self.key,
        }


@dataclass
class _Parked:
    exchange: Exchange
    expires: float


class TrafficRecorder:
    def __init__(
        self,
        settings: TrafficSettings,
        store: TrafficStore,
        redactor: Redactor,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.redactor = redactor
        self.clock = clock
        self.queue: queue.Queue[object] = queue.Queue(maxsize=settings.queue_max_records)
        self.parked: OrderedDict[str, _Parked] = OrderedDict()
        self.known: OrderedDict[str, tuple[str, int]] = OrderedDict()  # queued here: id -> (adapter, version)
        self.dropped: Counter[DropReason] = Counter()
        self.written: Counter[str] = Counter()  # records written, by kind
        self.redacted: Counter[str] = Counter()  # PII found, by class
        self.rescued = 0
        self._thread: threading.Thread | None = None

    # -- the event loop's side: O(1), never waits ---------------------------------
    def offer(self, exchange: Exchange) -> bool:
        """Take a finished exchange. True if it was queued to be written now."""
        rate = self.settings.rate_for(exchange.adapter)
        if rate <= 0:
            return False  # sampling is off for this adapter: nothing is kept, errors included
        if exchange.status >= 400 or sampled(exchange.request_id, rate):
            return self._enqueue("requests", exchange.record(sampled=True), exchange)
        if self.settings.rescue_window_s > 0 and self.settings.rescue_max_records > 0:
            now = self.clock()
            self._expire(now)
            self.parked[exchange.request_id] = _Parked(exchange, now + self.settings.rescue_window_s)
            while len(self.parked) > self.settings.rescue_max_records:
                self.parked.popitem(last=False)
                self.dropped["rescue_overflow"] += 1
        return False

    def _expire(self, now: float) -> None:
        while self.parked:
            oldest = next(iter(self.parked.values()))
            if oldest.expires > now:
                break
            self.parked.popitem(last=False)

    def _enqueue(self, kind: str, record: dict[str, Any], exchange: Exchange | None = None) -> bool:
        try:
            self.queue.put_nowait((kind, record))
        except queue.Full:
            self.dropped["queue_full"] += 1
            return False
        if exchange is not None:
            self.known[exchange.request_id] = (exchange.adapter, exchange.version)
            while len(self.known) > 10 * self.settings.queue_max_records:
                self.known.popitem(last=False)
        return True

    async def locate(self, request_id: str) -> tuple[str, int]:
        """The (adapter, version) that served a recorded request: one this gateway queued or
        parked, or one any gateway wrote to the sink (looked up in a thread, by the day its id
        names). Otherwise :class:`NotFoundError`. Changes nothing."""
        served = self.known.get(request_id)
        if served is not None:
            return served
        self._expire(self.clock())
        parked = self.parked.get(request_id)
        if parked is not None:
            return parked.exchange.adapter, parked.exchange.version
        found = await asyncio.to_thread(self.store.find_request, request_id)
        if found is None:
            raise NotFoundError(
                f"no recorded request {request_id!r}: unknown, not sampled and past "
                "traffic.rescue_window_s, or purged",
                param="request_id",
            )
        return found["adapter"], int(found["version"])

    def add_feedback(self, feedback: Feedback, served: tuple[str, int]) -> None:
        """Queue ``feedback`` for the request :meth:`locate` found; a parked request is rescued with it."""
        parked = self.parked.pop(feedback.request_id, None)
        if parked is not None and self._enqueue(
            "requests", parked.exchange.record(sampled=False), parked.exchange
        ):
            self.rescued += 1
        self._enqueue("feedback", feedback.record(*served))

    # -- the writer thread --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loraflow-traffic-writer", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, then stop the writer (blocks; call it from a thread)."""
        if self._thread is None:
            return
        self.queue.put(_STOP)  # blocks if full: the writer is draining it
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the traffic writer did not finish within %.0f s; records may be lost", timeout_s)
        self._thread = None

    @property
    def backlog(self) -> int:
        return self.queue.qsize()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[str, dict[str, Any]]] = []
            deadline = time.monotonic() + self.settings.flush_interval_s
            while len(batch) < self.settings.batch_max_records:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            if batch:
                self._write(batch)
        while True:  # anything put after the stop marker (a late feedback)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._write([item])  # type: ignore[list-item]

    def _write(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        by_kind: dict[str, list[dict[str, Any]]] = {"requests": [], "feedback": []}
        for kind, record in batch:
            try:
                by_kind[kind].append(self._redact(kind, record))
            except Exception:  # one record Presidio chokes on must not take the batch with it
                log.exception("could not redact a %s record; dropped", kind)
                self.dropped["write_failed"] += 1
        for kind, records in by_kind.items():
            if not records:
                continue
            for attempt, pause in enumerate((*_WRITE_RETRIES, None)):
                try:
                    self.store.write(kind, records)  # type: ignore[arg-type]
                    self.written[kind] += len(records)
                    break
                except Exception as exc:
                    if pause is None:
                        log.error(
                            "dropping %d %s records: the traffic sink failed: %s", len(records), kind, exc
                        )
                        self.dropped["write_failed"] += len(records)
                    else:
                        log.warning("traffic sink failed (try %d): %s", attempt + 1, exc)
                        time.sleep(pause)

    def _redact(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        fields = ("request", "response") if kind == "requests" else ("correction", "comment")
        out = dict(record)
        found: Counter[str] = Counter()
        for name in fields:
            out[name], counts = self.redactor.redact_value(record[name])
            found.update(counts)
        out["redacted"] = dict(found)
        self.redacted.update(found)
        return out
