"""This gateway process's part in progressive delivery.

Every gateway counts what each arm of a rollout's current step answered (:meth:`Rollouts.observe`,
O(1) on the request path) and writes its counts to the registry every ``rollout.interval_s``.
The one gateway process holding a rollout's controller lease then reads every gateway's counts,
asks :func:`registry.rollouts.decide`, and acts: advance, or roll back, each a compare-and-swap on
the rollout's ``seq`` with an audit event citing the figures. A gateway that dies stops renewing;
another takes the lease over within ``rollout.lease_ttl_s`` and goes on from the registry's state,
so a rollout survives gateway restarts. Which version answers a request is the routing table's
concern (:meth:`RoutingTable.resolve`); this module only counts and decides.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from loraflow.registry import domain
from loraflow.registry.drift import answer
from loraflow.registry.errors import ConflictError, LoraflowError, NotFoundError
from loraflow.registry.refs import version_ref
from loraflow.registry.rollouts import Arm, Decision, Tally, decide, format_gated
from loraflow.registry.service import Registry
from loraflow.registry.settings import RolloutSettings
from loraflow.server.routing import RoutingTable, Target

log = logging.getLogger("loraflow.rollouts")

RATED_MEMORY = 100_000  # request ids remembered as rated, per gateway process


@dataclass(frozen=True)
class Acted:
    """A decision this controller carried out (what :meth:`Rollouts.tick` returns)."""

    adapter: str
    rollout: int
    decision: Decision


class Rollouts:
    def __init__(
        self,
        settings: RolloutSettings,
        registry: Registry,
        routes: RoutingTable,
        *,
        holder: str | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.routes = routes
        self.holder = holder or uuid.uuid4().hex[:16]  # this gateway process
        self.now = now
        self.counts: dict[tuple[int, int, Arm], Tally] = {}  # (rollout id, step, arm) -> counts
        # (rollout id, step) whose counts changed since they were last written. Marked after the
        # counts moved, and swapped out whole by the writer's thread, so no change goes unwritten.
        self._dirty: set[tuple[int, int]] = set()
        self._rated: OrderedDict[str, None] = OrderedDict()  # request ids already rated (one each)
        # For /metrics (this process's, since it started): requests per (adapter, arm, ok|error),
        # and the moves this controller made per (adapter, action).
        self.observed: Counter[tuple[str, Arm, str]] = Counter()
        self.decisions: Counter[tuple[str, str]] = Counter()

    # -- counting (request path) ----------------------------------------------------
    def _tally(self, rollout: domain.RolloutInfo, arm: Arm) -> Tally:
        return self.counts.setdefault((rollout.id, rollout.step, arm), Tally())

    def observe(
        self,
        target: Target,
        *,
        status: int,
        failed: bool,
        text: str,
        finish_reason: str | None,
        latency_s: float,
        ttft_s: float | None,
        agreed: bool = False,
    ) -> None:
        """One finished request the split sent to ``target.arm`` (or a shadow call: ``agreed`` says
        its answer was production's, word for word). ``failed``: a 5xx, or a stream that broke; a
        client's own error (4xx) is not the version's and is not counted."""
        if target.rollout is None or target.arm is None or (400 <= status < 500 and not failed):
            return
        tally = self._tally(target.rollout, target.arm)
        tally.requests += 1
        error = failed or status >= 500
        self.observed[(target.rollout.adapter, target.arm, "error" if error else "ok")] += 1
        if error:
            tally.errors += 1
        else:
            checked = answer(text, None, at=0.0)  # drift's own checks of an answer, not a second set
            tally.answered += 1
            tally.json_ok += checked.json_ok
            tally.refusals += checked.refusal
            tally.truncated += finish_reason == "length"
            tally.agreed += agreed
        tally.latency[Tally.bucket(latency_s)] += 1
        tally.ttft[Tally.bucket(ttft_s if ttft_s is not None else latency_s)] += 1
        self._dirty.add((target.rollout.id, target.rollout.step))

    def observe_feedback(self, adapter: str, version: int, rating: int, *, request_id: str) -> None:
        """A rating of an answer of ``adapter``'s candidate or production version, while in rollout.
        A request counts once, at its first rating: rating one answer again and again moves nothing."""
        rollout = self.routes.snapshot.rollouts.get(adapter)
        if rollout is None or not rollout.current.canary or request_id in self._rated:
            return
        self._rated[request_id] = None
        while len(self._rated) > RATED_MEMORY:
            self._rated.popitem(last=False)
        arm: Arm | None = (
            "candidate"
            if version == rollout.candidate
            else "production"
            if version == rollout.baseline
            else None
        )
        if arm is not None:
            tally = self._tally(rollout, arm)
            tally.rated += 1
            tally.negative += rating < 0
            self._dirty.add((rollout.id, rollout.step))

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Every ``rollout.interval_s``: write this process's counts, then decide for the rollouts
        whose lease it holds. A registry hiccup is logged and tried again next round."""
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("rollout round failed: %s", exc)
            await asyncio.sleep(self.settings.interval_s)

    def tick(self) -> list[Acted]:
        """One round (blocking: the loop runs it in a thread)."""
        self.flush()
        acted = []
        # The routing snapshot's rollouts (reloaded when the revision moves): a state it has not
        # caught up with yet only makes a move lose its compare-and-swap, and no read is added.
        for rollout in list(self.routes.snapshot.rollouts.values()):
            if not self.registry.claim_rollout(rollout, holder=self.holder, ttl_s=self.settings.lease_ttl_s):
                continue  # another gateway decides for it
            if rollout.state != "running":
                continue  # paused: its weights stay, nothing moves on its own
            done = self._decide(rollout)
            if done is not None:
                acted.append(done)
        return acted

    def flush(self) -> None:
        """Write this process's counts of every rollout step that changed since the last write.
        Each write is the step's whole count so far (a late request of a step already left, a
        stream or a shadow still running when the step moved, adds to it); the counts of a
        rollout that ended are dropped."""
        dirty, self._dirty = self._dirty, set()
        active = {r.id: r for r in self.routes.snapshot.rollouts.values()}
        by_step: dict[tuple[int, int], dict[Arm, Tally]] = {}
        for (rollout_id, step, arm), tally in list(self.counts.items()):  # a copy: the loop counts on
            if rollout_id not in active:
                self.counts.pop((rollout_id, step, arm), None)
            elif (rollout_id, step) in dirty:
                by_step.setdefault((rollout_id, step), {})[arm] = Tally.from_json(tally.to_json())
        for (rollout_id, step), tallies in by_step.items():
            try:
                self.registry.put_tallies(active[rollout_id], holder=self.holder, step=step, tallies=tallies)
            except Exception:
                self._dirty.add((rollout_id, step))  # written next round
                raise

    def close(self) -> None:
        """At shutdown (blocking): write the last counts, and let go of this process's leases so
        another gateway takes its rollouts over at once instead of after ``lease_ttl_s``."""
        self.flush()
        for rollout in list(self.routes.snapshot.rollouts.values()):
            self.registry.release_rollout(rollout, holder=self.holder)

    def _format_gated(self, rollout: domain.RolloutInfo) -> bool:
        profile = self.routes.snapshot.profiles.get(version_ref(rollout.adapter, rollout.baseline))
        return format_gated(profile.json_share if profile is not None else None)

    def _decide(self, rollout: domain.RolloutInfo) -> Acted | None:
        if rollout.policy not in self.settings.policies:
            log.warning(
                "rollout #%d of %s names policy %r, which this gateway's settings lack; using default",
                rollout.id,
                rollout.adapter,
                rollout.policy,
            )
        decision = decide(
            rollout,
            self.registry.tallies(rollout),
            self.settings.policy_or_default(rollout.policy),
            now=self.now(),
            format_gated=self._format_gated(rollout),
        )
        try:
            if decision.action == "rollback":
                self.registry.roll_back_rollout(
                    rollout.adapter,
                    reason=decision.reason,
                    expect_seq=rollout.seq,
                    figures=decision.figures,
                    controller=self.holder,
                )
            elif decision.action == "advance":
                self.registry.advance_rollout(
                    rollout.adapter,
                    expect_seq=rollout.seq,
                    reason=decision.reason,
                    figures=decision.figures,
                    controller=self.holder,
                )
            else:
                return None  # wait or hold: nothing to record
        except (ConflictError, NotFoundError) as exc:  # an operator or another controller acted first
            log.info(
                "rollout #%d of %s: %s not carried out: %s", rollout.id, rollout.adapter, decision.action, exc
            )
            return None
        except LoraflowError as exc:
            log.warning("rollout #%d of %s: %s failed: %s", rollout.id, rollout.adapter, decision.action, exc)
            return None
        self.decisions[(rollout.adapter, decision.action)] += 1
        log.info("rollout #%d of %s: %s (%s)", rollout.id, rollout.adapter, decision.action, decision.reason)
        return Acted(rollout.adapter, rollout.id, decision)
