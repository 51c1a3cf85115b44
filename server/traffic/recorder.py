"""Recording served requests without slowing them: sample, hold, hand to the writer.

On the request path (the event loop) :meth:`TrafficRecorder.offer` does O(1) work and never
waits: it decides by a hash of the request id whether the request is sampled (the same
answer on every gateway replica), then either hands the raw exchange to the
:mod:`~loraflow.server.traffic.writer` (``put_nowait`` on a bounded queue: a full queue drops it
and counts the drop) or parks it in a bounded in-memory *rescue* buffer for
``traffic.rescue_window_s``. Errors are always sampled. Feedback for a parked request rescues
it onto the queue.

The writer hands each batch to the :class:`~loraflow.registry.traffic.TrafficStore`, whose
write takes only records its redactor (Presidio, keyed pseudonyms) has been through; the
writer runs in a process of its own by default, so nothing unredacted is ever written, and
redaction never runs in the event loop.
:meth:`TrafficRecorder.close` (the app's shutdown, after uvicorn has drained the requests)
writes whatever is queued before it returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from loraflow.registry.errors import NotFoundError
from loraflow.registry.settings import TrafficSettings
from loraflow.registry.traffic import Kind, TrafficStore
from loraflow.server.traffic.writer import Writer, WriterStats

log = logging.getLogger("loraflow.traffic")

DropReason = Literal["queue_full", "write_failed", "writer_down", "rescue_overflow"]


def sampled(request_id: str, rate: float) -> bool:
    """Whether a request is sampled at ``rate``: the first 64 bits of sha256(id) as a fraction."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64 < rate


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
        writer: Writer,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store  # read only: finding a request that another gateway wrote
        self.writer = writer
        self.clock = clock
        self.parked: OrderedDict[str, _Parked] = OrderedDict()
        self.known: OrderedDict[str, tuple[str, int]] = OrderedDict()  # queued here: id -> (adapter, version)
        self._refused: Counter[DropReason] = Counter()  # by the queue or the rescue buffer, here
        self.rescued = 0

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
                self._refused["rescue_overflow"] += 1
        return False

    def _expire(self, now: float) -> None:
        while self.parked:
            oldest = next(iter(self.parked.values()))
            if oldest.expires > now:
                break
            self.parked.popitem(last=False)

    def _enqueue(self, kind: Kind, record: dict[str, Any], exchange: Exchange | None = None) -> bool:
        refused = self.writer.put_nowait((kind, record))
        if refused is not None:
            self._refused[refused] += 1
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

    # -- the writer -----------------------------------------------------------------
    def start(self) -> None:
        """Start the writer; returns at once (see :meth:`wait_ready`)."""
        self.writer.start()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the writer can redact; raises what stops it (e.g. a missing spaCy model)."""
        self.writer.wait_ready(timeout_s)

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, then stop the writer (blocks; call it from a thread)."""
        self.writer.close(timeout_s)

    @property
    def backlog(self) -> int:
        return self.writer.backlog

    def stats(self) -> WriterStats:
        return self.writer.stats()

    @property
    def written(self) -> Counter[str]:
        """Records written, by kind."""
        return self.writer.stats().written

    @property
    def redacted(self) -> Counter[str]:
        """PII spans replaced, by class."""
        return self.writer.stats().redacted

    @property
    def dropped(self) -> Counter[DropReason]:
        """Records not written, by reason."""
        stats = self.writer.stats()
        dropped = Counter(self._refused)
        dropped["write_failed"] += stats.failed
        dropped["writer_down"] += stats.down
        return dropped
