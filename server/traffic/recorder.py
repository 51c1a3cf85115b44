"""Recording served requests without slowing them: sample, hold, hand to the writer.

On the request path (the event loop) :meth:`TrafficRecorder.offer` does O(1) work and never
waits: it decides by a hash of the request id whether the request is sampled (the same
answer on every gateway replica), then either hands the raw exchange to the
:mod:`~loraflow.server.traffic.writer` (``put_nowait`` on a bounded queue: a full queue drops it
and counts the drop) or parks it in a bounded in-memory *rescue* buffer for
``traffic.rescue_window_s``. Failed requests are sampled at ``traffic.error_sample_rate``.
Feedback for a parked request rescues it onto the queue. What waits is bounded in records and
in bytes (``queue_max_bytes``, ``rescue_max_bytes``), and a request larger than
``record_max_bytes`` is not recorded: a client cannot make the writer spend seconds on one
record, nor crowd out everyone else's with errors.

The writer hands each batch to the :class:`~loraflow.registry.traffic.TrafficStore`, whose
write takes only records its redactor (Presidio, keyed pseudonyms) has been through (what it
finds and misses: the README's privacy section); the writer runs in a process of its own by
default, so redaction never runs in the event loop.
:meth:`TrafficRecorder.close` (the app's shutdown, after uvicorn has drained the requests)
writes whatever is queued within ``traffic.close_timeout_s``, and records the rest as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from loraflow.registry.errors import NotFoundError, OverloadedError
from loraflow.registry.settings import TrafficSettings
from loraflow.registry.traffic import Kind, TrafficStore
from loraflow.server.traffic.writer import Writer, WriterStats

log = logging.getLogger("loraflow.traffic")

DropReason = Literal["queue_full", "too_large", "write_failed", "writer_down", "rescue_overflow"]

# Looking up a request another gateway wrote reads the files of the day its id names: on two
# threads of their own (never the pool the routing refresh uses), at most LOOKUP_MAX_PENDING
# waiting (then 503), and an id found missing is answered from memory for MISS_TTL_S.
LOOKUP_THREADS = 2
LOOKUP_MAX_PENDING = 16
MISS_TTL_S = 30.0
MISS_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Served:
    """Who served a recorded request, and to which key: what feedback on it is checked against."""

    adapter: str
    version: int
    key: str | None


def unknown_request(request_id: str) -> NotFoundError:
    """The one answer for a request that was not recorded, or that the caller may not rate."""
    return NotFoundError(
        f"no recorded request {request_id!r}: unknown, not sampled and past "
        "traffic.rescue_window_s, purged, or not yours to rate",
        param="request_id",
    )


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
    size_bytes: int = 0  # what the gateway received and answered, in bytes: the record's size, about
    # A rollout's candidate's answer to the same request, never returned to the client (shadow):
    # version, response, status, latency_s, error. Redacted with the rest; datasets never read it.
    shadow: dict[str, Any] | None = None

    @property
    def served(self) -> Served:
        return Served(self.adapter, self.version, self.key)

    def record(self, *, sampled: bool) -> dict[str, Any]:
        shadow = {"shadow": self.shadow} if self.shadow is not None else {}
        return shadow | {
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
            "sampled": sampled,  # False: kept because feedback rescued it, or because it was shadowed
        }


@dataclass(frozen=True)
class Feedback:
    request_id: str
    at: datetime
    rating: int
    correction: str | None
    comment: str | None
    key: str | None

    @property
    def size_bytes(self) -> int:
        return 256 + len(self.correction or "") + len(self.comment or "")

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
        self.known: OrderedDict[str, Served] = OrderedDict()  # queued here
        self._misses: OrderedDict[str, float] = OrderedDict()  # id -> until when it is known missing
        self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="loraflow-lookup")
        self._pending_lookups = 0
        # The size of each record the writer has taken and not finished, oldest first: the writer
        # finishes them in order, so its counts say which have left.
        self._queued: deque[int] = deque()
        self._queued_bytes = 0
        self._finished = 0  # records of self._queued's past that the writer has finished
        self._parked_bytes = 0
        self._refused: Counter[DropReason] = Counter()  # by the queue or the rescue buffer, here
        self.rescued = 0

    # -- the event loop's side: O(1), never waits ---------------------------------
    def offer(self, exchange: Exchange) -> bool:
        """Take a finished exchange. True if it was queued to be written now. A shadowed exchange
        (a rollout's pair of answers) is written whatever the sampling rate: the pair is what the
        rollout is scored on."""
        rate = self.settings.rate_for(exchange.adapter)
        if rate <= 0 and exchange.shadow is None:
            return False  # sampling is off for this adapter: nothing is kept, errors included
        if exchange.size_bytes > self.settings.record_max_bytes:
            self._refused["too_large"] += 1
            return False
        if exchange.shadow is not None:
            record = exchange.record(sampled=sampled(exchange.request_id, rate))
            return self._enqueue("requests", record, exchange.size_bytes, exchange)
        if exchange.status >= 400:
            if not sampled(exchange.request_id, self.settings.error_sample_rate):
                return False
            return self._enqueue("requests", exchange.record(sampled=True), exchange.size_bytes, exchange)
        if sampled(exchange.request_id, rate):
            return self._enqueue("requests", exchange.record(sampled=True), exchange.size_bytes, exchange)
        if self.settings.rescue_window_s > 0 and self.settings.rescue_max_records > 0:
            now = self.clock()
            self._expire(now)
            self._park(exchange, now)
        return False

    def _park(self, exchange: Exchange, now: float) -> None:
        if exchange.size_bytes > self.settings.rescue_max_bytes:
            self._refused["rescue_overflow"] += 1
            return
        self.parked[exchange.request_id] = _Parked(exchange, now + self.settings.rescue_window_s)
        self._parked_bytes += exchange.size_bytes
        while (
            len(self.parked) > self.settings.rescue_max_records
            or self._parked_bytes > self.settings.rescue_max_bytes
        ):
            self._unpark(next(iter(self.parked)))
            self._refused["rescue_overflow"] += 1

    def _unpark(self, request_id: str) -> _Parked | None:
        parked = self.parked.pop(request_id, None)
        if parked is not None:
            self._parked_bytes -= parked.exchange.size_bytes
        return parked

    def _expire(self, now: float) -> None:
        while self.parked:
            oldest = next(iter(self.parked.values()))
            if oldest.expires > now:
                break
            self._unpark(oldest.exchange.request_id)

    def _enqueue(
        self, kind: Kind, record: dict[str, Any], size: int, exchange: Exchange | None = None
    ) -> bool:
        if self._queued_bytes + size > self.settings.queue_max_bytes:
            self._settle()  # what the writer has finished since the last look
            if self._queued_bytes + size > self.settings.queue_max_bytes:
                self._refused["queue_full"] += 1
                return False
        refused = self.writer.put_nowait((kind, record))
        if refused is not None:
            self._refused[refused] += 1
            return False
        self._queued.append(size)
        self._queued_bytes += size
        if exchange is not None:
            self._remember(exchange)
        return True

    def _remember(self, exchange: Exchange) -> None:
        self.known[exchange.request_id] = exchange.served
        while len(self.known) > 10 * self.settings.queue_max_records:
            self.known.popitem(last=False)

    def expect(self, exchange: Exchange) -> None:
        """A request whose record comes later (a shadowed one, once the candidate has answered too):
        feedback on it is taken meanwhile, as for a queued one."""
        self._remember(exchange)

    def _settle(self) -> None:
        stats = self.writer.stats()
        finished = sum(stats.written.values()) + stats.failed + stats.down
        while self._finished < finished and self._queued:
            self._queued_bytes -= self._queued.popleft()
            self._finished += 1

    @property
    def queued_bytes(self) -> int:
        """Bytes of records the writer has taken and not finished (as of its last report)."""
        self._settle()
        return self._queued_bytes

    async def locate(self, request_id: str) -> Served:
        """Who served a recorded request: one this gateway queued or parked, or one any gateway
        wrote to the sink (looked up on threads of its own, in the files of the day its id
        names). Otherwise :func:`unknown_request`. Changes nothing."""
        served = self.known.get(request_id)
        if served is not None:
            return served
        now = self.clock()
        self._expire(now)
        parked = self.parked.get(request_id)
        if parked is not None:
            return parked.exchange.served
        if self._misses.get(request_id, 0.0) > now:
            raise unknown_request(request_id)
        if self._pending_lookups >= LOOKUP_MAX_PENDING:
            raise OverloadedError("too many feedback lookups in progress; retry shortly")
        self._pending_lookups += 1
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self._lookups, self.store.find_request, request_id
            )
        finally:
            self._pending_lookups -= 1
        if found is None:
            self._misses[request_id] = self.clock() + MISS_TTL_S
            self._misses.move_to_end(request_id)
            while len(self._misses) > MISS_CACHE_MAX:
                self._misses.popitem(last=False)
            raise unknown_request(request_id)
        return Served(found["adapter"], int(found["version"]), found.get("key"))

    def add_feedback(self, feedback: Feedback, served: Served) -> None:
        """Queue ``feedback`` for the request :meth:`locate` found; a parked request is rescued with it."""
        parked = self._unpark(feedback.request_id)
        if parked is not None and self._enqueue(
            "requests", parked.exchange.record(sampled=False), parked.exchange.size_bytes, parked.exchange
        ):
            self.rescued += 1
        self._enqueue("feedback", feedback.record(served.adapter, served.version), feedback.size_bytes)

    # -- the writer -----------------------------------------------------------------
    def start(self) -> None:
        """Start the writer; returns at once (see :meth:`wait_ready`)."""
        self.writer.start()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the writer can redact; raises what stops it (e.g. a missing spaCy model)."""
        self.writer.wait_ready(timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Write everything queued, then stop the writer (blocks; call it from a thread). What it
        could not write within ``timeout_s`` (``traffic.close_timeout_s``) is recorded as lost."""
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self.writer.close(self.settings.close_timeout_s if timeout_s is None else timeout_s)
        left = self.writer.backlog
        if left > 0:
            log.error("the traffic writer did not finish: %d records lost", left)
            with contextlib.suppress(Exception):
                self.store.record_loss(records=left, at=datetime.now(UTC), reason="shutdown timed out")

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
