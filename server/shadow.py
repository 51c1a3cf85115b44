"""Shadow traffic: a rollout's candidate answers a share of production's requests too, unseen.

The gateway offers a request to :meth:`Shadow.offer` once production's answer is complete and
handed to the server (a stream: after its last event). ``offer`` is O(1) and never waits: it
picks the replica, and either starts the call as a task of its own or drops it, counting why:

- ``replica_busy``: this gateway process already has ``rollout.shadow_max_in_flight`` shadow calls
  on the replica the candidate would run on (the bound is per gateway process and replica);
- ``saturated``: that replica is at ``server.replica_max_in_flight`` with requests in flight;
- ``not_resident``: the replica does not hold the candidate (a shadow never loads a version, nor
  evicts one clients use);
- ``no_replica``: no replica is available at all;
- and after the call, ``lost_adapter`` (the engine no longer held the candidate; it is forgotten
  there) and ``replica_failed`` (the replica was down or overloaded): the replica's failures, not
  the candidate's, so they are not counted against it.

So shadow never delays, changes or fails what a client gets, and under load it is the first
thing to go. A shadow call is never streamed and never counted against the client key's limits
or the gateway's admission (it is the gateway's own request). Its answer is counted in the
rollout's ``shadow`` arm (:meth:`Rollouts.observe`) and recorded beside production's in the
request's traffic record, whatever the sampling rate, redacted like any record; no dataset reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace
from typing import Any, Literal

from loraflow.registry.errors import EngineUnavailableError, LoraflowError, OverloadedError
from loraflow.registry.settings import RolloutSettings
from loraflow.server.engine.protocol import EngineDown, EngineRequestError
from loraflow.server.replicas import Replica, ReplicaSet
from loraflow.server.rollouts import Rollouts
from loraflow.server.routing import RoutingTable, Target
from loraflow.server.traffic.recorder import Exchange, TrafficRecorder
from loraflow.server.transcript import Transcript

log = logging.getLogger("loraflow.shadow")

ShadowDrop = Literal[
    "replica_busy", "saturated", "not_resident", "no_replica", "lost_adapter", "replica_failed"
]
# Fields of a request that only shape how the answer is delivered: a shadow call is plain JSON.
_DELIVERY_FIELDS = ("stream", "stream_options")
CLOSE_TIMEOUT_S = 10.0


class Shadow:
    def __init__(
        self,
        settings: RolloutSettings,
        routes: RoutingTable,
        replicas: ReplicaSet,
        rollouts: Rollouts,
        recorder: TrafficRecorder | None,
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.replicas = replicas
        self.rollouts = rollouts
        self.recorder = recorder
        self.in_flight: Counter[str] = Counter()  # replica URL -> shadow calls of this gateway
        # For /metrics, drops per (adapter, reason); the calls made are the rollout's shadow arm.
        self.dropped: Counter[tuple[str, ShadowDrop]] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    def offer(
        self,
        target: Target,
        *,
        path: str,
        body: dict[str, Any],
        production: Transcript,
        exchange: Exchange | None,
    ) -> bool:
        """Send ``body`` to the candidate ``target`` (from :meth:`RoutingTable.shadow_of`) in the
        background, or drop it. ``exchange``: production's record of the request, written with the
        candidate's answer beside it once that arrives (None: the request is not to be recorded)."""
        adapter = target.adapter or "-"
        try:
            replica = self.replicas.pick(target.engine_model)
        except EngineUnavailableError:
            return self._drop(adapter, "no_replica")
        if self.in_flight[replica.url] >= self.settings.shadow_max_in_flight:
            return self._drop(adapter, "replica_busy")
        if replica.busy >= self.replicas.max_in_flight:
            return self._drop(adapter, "saturated")
        if target.engine_model not in replica.resident:  # never a load (and an eviction) for a shadow
            return self._drop(adapter, "not_resident")
        call = {k: v for k, v in body.items() if k not in _DELIVERY_FIELDS} | {"model": target.engine_model}
        self.in_flight[replica.url] += 1
        if exchange is not None and self.recorder is not None:
            self.recorder.expect(exchange)  # feedback on it is taken before its record is written
        task = asyncio.get_running_loop().create_task(
            self._call(replica, target, path, call, production, exchange)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _drop(self, adapter: str, reason: ShadowDrop) -> bool:
        self.dropped[(adapter, reason)] += 1
        return False

    async def _call(
        self,
        replica: Replica,
        target: Target,
        path: str,
        body: dict[str, Any],
        production: Transcript,
        exchange: Exchange | None,
    ) -> None:
        started = time.perf_counter()
        answer = Transcript()
        status, error = 200, None
        adapter = target.adapter or "-"
        try:
            async with replica.using(target.engine_model):
                await asyncio.wait_for(
                    self._post(replica, target, path, body, answer), self.settings.shadow_timeout_s
                )
        except EngineRequestError as exc:
            if exc.status == 404:  # the replica lost the version: not the candidate's doing
                replica.forget(target.engine_model)
                self._drop(adapter, "lost_adapter")
                return self._record(exchange, None)
            status, error = exc.status, exc.code.value  # production answered this very body
        except (EngineDown, OverloadedError) as exc:  # the replica, not the version: a drop
            log.info("shadow call to %s on %s not made: %s", target.public, replica.url, exc.message)
            self._drop(adapter, "replica_failed")
            return self._record(exchange, None)
        except TimeoutError:
            status, error = 504, "timeout"
        except LoraflowError as exc:  # the engine failed on the candidate's request (a 5xx)
            status, error = 503, exc.code.value
        except asyncio.CancelledError:  # the gateway is stopping: production's record alone
            self._record(exchange, None)
            raise
        except Exception:
            log.exception("shadow call to %s on %s failed", target.public, replica.url)
            status, error = 500, "internal_error"
        finally:
            self.in_flight[replica.url] -= 1
        latency = time.perf_counter() - started
        ok = error is None
        self.rollouts.observe(
            target,
            status=status,
            failed=not ok,  # production answered the same body: any error is the candidate's
            text=answer.text,
            finish_reason=answer.finish_reason,
            latency_s=latency,
            ttft_s=None,
            agreed=ok and answer.text == production.text,
        )
        shadow = {
            "version": target.version,
            "response": [answer.choices[i] for i in sorted(answer.choices)],
            "status": status,
            "error": error,
            "latency_s": round(latency, 6),
        }
        self._record(exchange, (shadow, sum(len(c["content"]) for c in answer.choices.values())))

    def _record(self, exchange: Exchange | None, shadow: tuple[dict[str, Any], int] | None) -> None:
        """Offer production's exchange to the recorder with the candidate's answer beside it, or
        alone when there is none or the pair would pass ``traffic.record_max_bytes``."""
        if exchange is None or self.recorder is None:
            return
        if shadow is not None:
            size = exchange.size_bytes + shadow[1]
            if size <= self.recorder.settings.record_max_bytes:
                self.recorder.offer(replace(exchange, shadow=shadow[0], size_bytes=size))
                return
        self.recorder.offer(exchange)

    async def _post(
        self, replica: Replica, target: Target, path: str, body: dict[str, Any], answer: Transcript
    ) -> None:
        await self.routes.ensure_loaded(replica, target)
        answer.add_response(await replica.engine.post_json(path, body))

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """At the app's shutdown, before the recorder closes: let the shadow calls in flight finish
        for up to ``timeout_s``, then cancel the rest (their pairs are not recorded)."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
