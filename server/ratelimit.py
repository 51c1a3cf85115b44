"""Per-key limits that hold across every gateway: requests and tokens per minute, and requests
in flight, each set on the key (``keys create --rpm --tpm --max-concurrency``) or defaulted by
``server.key_rpm``, ``key_tpm`` and ``key_max_concurrency``.

No gateway knows how many others there are, so none may spend a budget on its own. The
mechanism is **leases of budget slices from the registry's database** (``rate_lease`` and
``slot_lease``; :class:`~loraflow.registry.store.LeaseStore`):

* per minute: a gateway takes a slice (``server.rate_lease_share`` of the limit, 5%) of the
  key's budget with one compare-and-swap update, and admits requests from its slice in memory
  until it is spent; then it leases again. Grants are kept in 5-second buckets; a slice is
  spent only in the bucket it was granted into, and what is left of it is given back when
  the next one is leased. The database grants only what the limit leaves after the 13
  buckets that cover the last minute (counted whole), so no 60 s ever holds more than the
  limit, summed over gateways; the cost is that an admission counts for 60 to 65 s. A slice
  a gateway holds and has not spent is lost to the others until it is given back: near the
  limit, up to one slice per gateway.
* tokens are charged at admission by an estimate (the body's bytes / 4 plus ``max_tokens``,
  or 256 without one) and corrected by the engine's usage when the answer is over.
* in flight: a gateway leases slots of the key's concurrency, keeps a slot it no longer uses
  for a moment (so a steady load writes nothing), renews its leases every third of
  ``server.slot_lease_ttl_s`` and gives idle ones back; a gateway that dies gives its slots
  back when they expire.

A database write happens per slice or slot, never per request; ``bench/hostile_mix.py``
counts them. Leases run on one thread of their own. When the registry cannot be reached, a
key is admitted (and a warning logged once a minute): the limits guard tenants from each
other, and an outage of the registry should not stop serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import uuid4

from loraflow.registry import domain
from loraflow.registry.errors import RateLimitedError
from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings

log = logging.getLogger("loraflow.gateway")

WINDOW_S = 60.0
BUCKET_S = 5.0
SPAN = int(WINDOW_S // BUCKET_S) + 1  # buckets that cover any 60 s: 13
# A body's bytes per token, about, for the estimate charged before the engine counts.
BYTES_PER_TOKEN = 4
DEFAULT_COMPLETION_ESTIMATE = 256
# How long a key found out of budget is refused from memory before the database is asked again
# (the sliding minute frees budget as it moves).
EXHAUSTED_RECHECK_S = 1.0
# A slot unused this long is given back at the next renewal.
SLOT_IDLE_S = 2.0

Kind = Literal["requests", "tokens"]


@dataclass
class _Budget:
    """What this gateway holds of one key's budget of one kind, in one window."""

    bucket: int = -1  # of the last lease: what was left then is spent in this bucket's window
    left: int = 0  # leased and not yet spent here (negative: tokens used past the estimate)
    total: int = 0  # granted in the window by every gateway, as of this gateway's last lease
    exhausted_until: float = 0.0  # the database had nothing left: refuse here until then


@dataclass
class _Slots:
    limit: int = 0
    held: int = 0
    in_use: int = 0
    idle_since: float = 0.0


@dataclass
class Admission:
    """A request let in: what it was charged, to settle when its usage is known."""

    key: str
    tokens_charged: int
    headers: dict[str, str] = field(default_factory=dict)


class KeyLimiter:
    def __init__(
        self,
        settings: ServerSettings,
        registry: Registry,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.holder = uuid4().hex  # this gateway process, in slot_lease
        self.budgets: dict[tuple[str, Kind], _Budget] = defaultdict(_Budget)
        self.slots: dict[str, _Slots] = defaultdict(_Slots)
        self.leases = 0  # registry transactions (leases, give-backs, renewals): loraflow_ratelimit_leases
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="loraflow-leases")
        self._warned_at = -math.inf

    # -- what a key may do ------------------------------------------------------------------
    def limits(self, key: domain.ApiKeyInfo) -> tuple[int | None, int | None, int | None]:
        s = self.settings
        return (
            key.rpm or s.key_rpm,
            key.tpm or s.key_tpm,
            key.max_concurrency or s.key_max_concurrency,
        )

    @staticmethod
    def estimate_tokens(body: dict[str, Any], body_bytes: int) -> int:
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        completion = asked if isinstance(asked, int) and not isinstance(asked, bool) else None
        n = body.get("n")
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
        return body_bytes // BYTES_PER_TOKEN + (completion or DEFAULT_COMPLETION_ESTIMATE) * choices

    # -- per minute -------------------------------------------------------------------------
    async def admit(self, key: domain.ApiKeyInfo, tokens: int) -> Admission:
        """Charge one request and ``tokens`` to ``key``, or :class:`RateLimitedError` (429)."""
        rpm, tpm, _ = self.limits(key)
        now = self.clock()
        admission = Admission(key.name, tokens if tpm else 0)
        async with self._locks[key.name]:
            checks: tuple[tuple[Kind, int | None, int], ...] = (("requests", rpm, 1), ("tokens", tpm, tokens))
            for kind, limit, cost in checks:
                if limit is None:
                    continue
                budget = await self._charge(key.name, kind, limit, cost, now)
                if budget is None:
                    if kind == "tokens" and rpm is not None:
                        self.budgets[(key.name, "requests")].left += 1  # not admitted: give it back
                    wait = BUCKET_S - now % BUCKET_S  # when the oldest bucket leaves the window
                    raise RateLimitedError(
                        f"this API key is past its limit of {limit} {kind} per minute; "
                        f"retry in {math.ceil(wait)} s",
                        retry_after_s=wait,
                    )
                admission.headers |= self._headers(kind, limit, budget, now)
        return admission

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        """The request is over: charge the tokens it used instead of the estimate."""
        if not admission.tokens_charged or used_tokens is None:
            return
        budget = self.budgets[(admission.key, "tokens")]
        budget.left -= used_tokens - admission.tokens_charged  # may go negative: leased next time

    async def _charge(self, key: str, kind: Kind, limit: int, cost: int, now: float) -> _Budget | None:
        budget = self.budgets[(key, kind)]
        bucket = int(now // BUCKET_S)
        if budget.bucket != bucket and budget.left > 0:
            # A slice is spent in the bucket it was granted into: give back what is left of it.
            left, budget.left = budget.left, 0
            await self._lease(
                self.registry.return_budget, key=key, kind=kind, bucket=budget.bucket, amount=left
            )
        if budget.left < cost and now < budget.exhausted_until:
            return None  # a flood past the limit is refused from memory, not a query each
        if budget.left < cost:
            slice_ = max(1, math.ceil(limit * self.settings.rate_lease_share))
            want = max(cost - budget.left, slice_)
            lease = await self._lease(
                self.registry.lease_budget,
                key=key,
                kind=kind,
                bucket=bucket,
                span=SPAN,
                want=want,
                limit=limit,
            )
            if lease is None:  # the registry is down: admit
                return budget
            budget.left += lease.granted
            budget.total, budget.bucket = lease.total, bucket
            if budget.left < cost:
                budget.exhausted_until = now + EXHAUSTED_RECHECK_S
                return None
        budget.left -= cost
        return budget

    def _headers(self, kind: Kind, limit: int, budget: _Budget, now: float) -> dict[str, str]:
        remaining = max(0, limit - budget.total) + max(0, budget.left)
        reset = BUCKET_S - now % BUCKET_S
        return {
            f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(min(limit, remaining)),
            f"x-ratelimit-reset-{kind}": f"{math.ceil(reset)}s",
        }

    # -- in flight ------------------------------------------------------------------------
    @asynccontextmanager
    async def in_flight(self, key: domain.ApiKeyInfo) -> AsyncIterator[None]:
        """Hold one of ``key``'s concurrent-request slots while the request runs, or 429."""
        _, _, limit = self.limits(key)
        if limit is None:
            yield
            return
        slots = self.slots[key.name]
        slots.limit = limit
        if slots.in_use >= slots.held:
            async with self._locks[key.name]:
                if slots.in_use >= slots.held:
                    held = await self._lease(
                        self.registry.lease_slots,
                        key=key.name,
                        holder=self.holder,
                        slots=slots.in_use + 1,
                        limit=limit,
                        ttl_s=self.settings.slot_lease_ttl_s,
                    )
                    slots.held = slots.in_use + 1 if held is None else held
            if slots.in_use >= slots.held:
                raise RateLimitedError(
                    f"this API key has {limit} requests in flight, its limit; retry shortly",
                    retry_after_s=1.0,
                )
        slots.in_use += 1
        try:
            yield
        finally:
            slots.in_use -= 1
            slots.idle_since = self.clock()

    async def run(self) -> None:
        """Renew this gateway's slot leases and give back idle slots, every third of their TTL."""
        ttl = self.settings.slot_lease_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                await self.tidy()
            except Exception:
                log.exception("renewing rate-limit slot leases failed")

    async def tidy(self) -> None:
        ttl = self.settings.slot_lease_ttl_s
        now = self.clock()
        for name, slots in list(self.slots.items()):
            if slots.held > slots.in_use and now - slots.idle_since >= SLOT_IDLE_S:
                async with self._locks[name]:
                    if slots.held > slots.in_use:
                        held = await self._lease(
                            self.registry.lease_slots,
                            key=name,
                            holder=self.holder,
                            slots=slots.in_use,
                            limit=slots.limit,
                            ttl_s=ttl,
                        )
                        if held is not None:
                            slots.held = held
        if any(s.held for s in self.slots.values()):
            await self._lease(self.registry.renew_slots, holder=self.holder, ttl_s=ttl)

    async def _lease(self, call: Callable[..., Any], **kwargs: Any) -> Any:
        """One lease on the limiter's own thread; None when the registry cannot be reached."""
        self.leases += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: call(**kwargs))
        except Exception as exc:  # the database's driver errors, whatever they are: fail open
            now = self.clock()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("rate limits are not enforced while the registry cannot lease: %s", exc)
            return None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
