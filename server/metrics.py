"""Prometheus metrics of the gateway, labelled per adapter and version ("-" for the base model).

Request metrics are counted as requests go. What the replicas hold is read at
scrape time by :class:`RoutingCollector`: that is the operator's view of the
engines (their private URLs, health, residency), which the public ``/ready``
probe does not show.

Under ``loraflow serve --workers N`` every worker process counts its own requests in
prometheus_client's multiprocess files, summed at scrape time, and publishes what its
scrape-time collectors see (:class:`loraflow.server.shared_metrics.SharedMetrics`), labelled
``worker``: whichever worker answers a scrape answers for all of them.
"""

from __future__ import annotations

from collections import Counter as Counts
from collections.abc import Iterator
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraflow.registry.refs import parse_ref
from loraflow.server.engine.supervisor import EngineProcess
from loraflow.server.ratelimit import KeyLimiter
from loraflow.server.rollouts import Rollouts
from loraflow.server.routing import RoutingTable
from loraflow.server.shadow import Shadow
from loraflow.server.traffic.live import DriftCollector, LiveDrift
from loraflow.server.traffic.recorder import DropReason, TrafficRecorder

if TYPE_CHECKING:
    from loraflow.server.shared_metrics import SharedMetrics

ACTIONS = ("advance", "rollback")  # what a rollout controller does on its own
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RoutingCollector(Collector):
    """Per replica: up, adapter loads since its engine (re)started, and the versions it holds.
    Also the registry revision the routing table was built from."""

    def __init__(self, routes: RoutingTable) -> None:
        self.routes = routes

    def collect(self) -> Iterator[Metric]:
        revision = GaugeMetricFamily(
            "loraflow_registry_revision", "The registry revision the routing table was built from."
        )
        revision.add_metric([], float(self.routes.snapshot.revision))
        up = GaugeMetricFamily(
            "loraflow_replica_up", "1 if the replica passed its last health check.", labels=["replica"]
        )
        loads = GaugeMetricFamily(
            "loraflow_replica_adapter_loads",
            "Adapter loads since the replica's engine started (vLLM's unload does not free memory).",
            labels=["replica"],
        )
        load_seconds = GaugeMetricFamily(
            "loraflow_replica_adapter_load_seconds",
            "Seconds the replica's adapter loads since its engine started took (with the loads: the mean).",
            labels=["replica"],
        )
        draining = GaugeMetricFamily(
            "loraflow_replica_draining",
            "1 while the replica is drained for a planned restart.",
            labels=["replica"],
        )
        busy = GaugeMetricFamily(
            "loraflow_replica_in_flight",
            "Requests this gateway has in flight on the replica.",
            labels=["replica"],
        )
        home = GaugeMetricFamily(
            "loraflow_replica_home_versions",
            "Aliased versions whose home set includes the replica (server.adapter_replicas).",
            labels=["replica"],
        )
        pinned_evictions = CounterMetricFamily(
            "loraflow_pinned_evictions",
            "Aliased versions unloaded from a replica home to more of them than server.max_cpu_loras.",
            labels=["replica"],
        )
        preload_failures = CounterMetricFamily(
            "loraflow_preload_failures",
            "Preloads of an aliased version that failed (logged with the reason).",
        )
        preload_failures.add_metric([], float(self.routes.preload_failures))
        resident = GaugeMetricFamily(
            "loraflow_resident_versions",
            "Adapter versions resident on each replica.",
            labels=["replica", "adapter", "version"],
        )
        for replica in self.routes.replicas.replicas:
            up.add_metric([replica.url], 1.0 if replica.healthy else 0.0)
            loads.add_metric([replica.url], float(replica.loads))
            load_seconds.add_metric([replica.url], replica.load_seconds)
            draining.add_metric([replica.url], 1.0 if replica.draining else 0.0)
            busy.add_metric([replica.url], float(replica.busy))
            home.add_metric([replica.url], float(len(self.routes.pinned(replica))))
            pinned_evictions.add_metric([replica.url], float(replica.pinned_evictions))
            for name in list(replica.resident):
                ref = parse_ref(name.partition("+")[0])  # the engine's NAME@vN+DIGEST
                resident.add_metric([replica.url, ref.name, f"v{ref.version}"], 1.0)
        yield from (
            revision,
            up,
            loads,
            load_seconds,
            draining,
            busy,
            home,
            pinned_evictions,
            preload_failures,
            resident,
        )


class SupervisorCollector(Collector):
    """Restarts of each engine this gateway supervises (crashes after it had been healthy)."""

    def __init__(self, processes: list[EngineProcess]) -> None:
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "loraflow_engine_restarts", "Restarts of a supervised engine after a crash.", labels=["replica"]
        )
        recycles = CounterMetricFamily(
            "loraflow_engine_recycles",
            "Planned restarts of a supervised engine after server.max_adapter_loads loads.",
            labels=["replica"],
        )
        for process in self.processes:
            restarts.add_metric([process.url], float(process.restarts))
            recycles.add_metric([process.url], float(process.recycles))
        yield from (restarts, recycles)


class TrafficCollector(Collector):
    """The traffic recorder: records written and dropped, the backlog, rescues and PII found."""

    def __init__(self, recorder: TrafficRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        recorder = self.recorder
        written = CounterMetricFamily(
            "loraflow_traffic_records_written", "Records written to the traffic sink.", labels=["kind"]
        )
        stats = recorder.stats()
        for kind in ("requests", "feedback"):
            written.add_metric([kind], float(stats.written[kind]))
        dropped = CounterMetricFamily(
            "loraflow_traffic_records_dropped",
            "Records not written: queue_full (the sink is slower than traffic, or the queue is at "
            "queue_max_bytes; the request did not wait), too_large (past record_max_bytes), "
            "write_failed (redaction or the sink failed, after retries), writer_down (the "
            "writer process had died; it is restarted), rescue_overflow (an unsampled record pushed "
            "out of the rescue buffer).",
            labels=["reason"],
        )
        drops = recorder.dropped
        for reason in get_args(DropReason):
            dropped.add_metric([reason], float(drops[reason]))
        rescued = CounterMetricFamily(
            "loraflow_traffic_records_rescued", "Unsampled requests kept because feedback arrived."
        )
        rescued.add_metric([], float(recorder.rescued))
        backlog = GaugeMetricFamily("loraflow_traffic_queue_records", "Records waiting to be written.")
        backlog.add_metric([], float(recorder.backlog))
        parked = GaugeMetricFamily(
            "loraflow_traffic_rescue_records", "Unsampled records waiting for feedback (in memory)."
        )
        parked.add_metric([], float(len(recorder.parked)))
        pii = CounterMetricFamily(
            "loraflow_traffic_pii_redacted", "PII spans replaced by pseudonyms, by class.", labels=["entity"]
        )
        for entity, count in sorted(stats.redacted.items()):
            pii.add_metric([entity], float(count))
        cpu = CounterMetricFamily(
            "loraflow_traffic_writer_cpu_seconds",
            "CPU time the writer spent redacting and writing records: what recording costs.",
        )
        cpu.add_metric([], stats.cpu_s)
        yield from (written, dropped, rescued, backlog, parked, pii, cpu)


class LimiterCollector(Collector):
    """What the per-key limits cost: the registry transactions their leases took."""

    def __init__(self, limiter: KeyLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        leases = CounterMetricFamily(
            "loraflow_ratelimit_leases",
            "Registry transactions the per-key limits made (leasing, giving back and renewing budget "
            "slices and slots): one per slice, never one per request.",
        )
        leases.add_metric([], float(self.limiter.leases))
        yield leases


class RolloutCollector(Collector):
    """Progressive delivery: each active rollout's step and weights (from the routing snapshot, the
    same on every gateway), what this gateway counted per arm, the moves its controller made, and
    its shadow calls and drops. ``loraflow_rollout_decisions_total{action="rollback"}`` is what the
    chart's PrometheusRule alerts on."""

    def __init__(self, routes: RoutingTable, rollouts: Rollouts, shadow: Shadow) -> None:
        self.routes = routes
        self.rollouts = rollouts
        self.shadow = shadow

    def collect(self) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            "loraflow_rollout_step",
            "The step (1-based) each active rollout is at; labelled with its candidate and baseline.",
            labels=["adapter", "candidate", "baseline", "state"],
        )
        weight = GaugeMetricFamily(
            "loraflow_rollout_weight_percent",
            "The current step's weights: canary (share of requests answered by the candidate) and "
            "shadow (share of production's requests also sent to it).",
            labels=["adapter", "kind"],
        )
        for rollout in self.routes.snapshot.rollouts.values():
            step.add_metric(
                [rollout.adapter, f"v{rollout.candidate}", f"v{rollout.baseline}", rollout.state],
                float(rollout.step + 1),
            )
            weight.add_metric([rollout.adapter, "canary"], rollout.current.canary)
            weight.add_metric([rollout.adapter, "shadow"], rollout.current.shadow)
        requests = CounterMetricFamily(
            "loraflow_rollout_requests",
            "Requests of a rollout this gateway counted, by arm (production, candidate, shadow) and "
            "outcome (error: a 5xx or broken stream; for shadow, any error).",
            labels=["adapter", "arm", "outcome"],
        )
        for (adapter, arm, outcome), count in sorted(self.rollouts.observed.items()):
            requests.add_metric([adapter, arm, outcome], float(count))
        decisions = CounterMetricFamily(
            "loraflow_rollout_decisions",
            "Moves this gateway's controller made on its own: advance, or rollback (the candidate "
            "failed a guard; production is unchanged).",
            labels=["adapter", "action"],
        )
        # Every adapter in rollout has both series from its start, at 0: Prometheus's increase()
        # sees a first rollback only on a series that existed before it.
        moves = Counts({(r.adapter, a): 0 for r in self.routes.snapshot.rollouts.values() for a in ACTIONS})
        moves.update(self.rollouts.decisions)
        for (adapter, action), count in sorted(moves.items()):
            decisions.add_metric([adapter, action], float(count))
        dropped = CounterMetricFamily(
            "loraflow_rollout_shadow_dropped",
            "Shadow calls dropped: replica_busy (this process's rollout.shadow_max_in_flight reached "
            "on the replica), saturated (the replica is full), not_resident (it does not hold the "
            "candidate), no_replica; after the call, lost_adapter and replica_failed (not counted "
            "against the candidate).",
            labels=["adapter", "reason"],
        )
        for (adapter, reason), count in sorted(self.shadow.dropped.items()):
            dropped.add_metric([adapter, reason], float(count))
        in_flight = GaugeMetricFamily(
            "loraflow_rollout_shadow_in_flight", "Shadow calls this gateway has in flight."
        )
        in_flight.add_metric([], float(sum(self.shadow.in_flight.values())))
        yield from (step, weight, requests, decisions, dropped, in_flight)


class GatewayMetrics:
    def __init__(
        self,
        routes: RoutingTable,
        supervised: list[EngineProcess] | None = None,
        *,
        recorder: TrafficRecorder | None = None,
        live: LiveDrift | None = None,
        shared: SharedMetrics | None = None,
        limiter: KeyLimiter | None = None,
        rollouts: tuple[Rollouts, Shadow] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()  # everything, as one process exports it
        self.state = CollectorRegistry()  # the scrape-time collectors alone
        self.shared = shared
        collectors: list[Collector] = [RoutingCollector(routes)]
        if supervised:
            collectors.append(SupervisorCollector(supervised))
        if recorder is not None:
            collectors.append(TrafficCollector(recorder))
        if limiter is not None:
            collectors.append(LimiterCollector(limiter))
        if live is not None:
            collectors.append(
                DriftCollector(live, lambda: routes.snapshot.profiles, lambda: routes.snapshot.drift)
            )
        if rollouts is not None:
            collectors.append(RolloutCollector(routes, *rollouts))
        for collector in collectors:
            self.registry.register(collector)
            self.state.register(collector)
        labels = ["adapter", "version"]
        self.requests = Counter(
            "loraflow_requests",
            "Requests by adapter version, endpoint and HTTP status.",
            [*labels, "endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "loraflow_request_errors",
            "Failed requests by error code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.engine_failures = Counter(
            "loraflow_engine_failures",
            "Replica failures: before_first_byte (retried once elsewhere), mid_stream (an SSE error "
            "event), lost_adapter (the engine no longer held a version and could not resolve it; retried).",
            ["replica", "phase"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loraflow_request_latency_seconds",
            "Whole-request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "loraflow_time_to_first_token_seconds",
            "Time to the first streamed chunk.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "loraflow_prompt_tokens", "Prompt tokens.", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "loraflow_completion_tokens", "Completion tokens.", labels, registry=self.registry
        )
        self.in_flight = Gauge(
            "loraflow_in_flight_requests",
            "Requests being served.",
            registry=self.registry,
            multiprocess_mode="livesum",  # with --workers: the live workers' sum
        )

    def exposition(self) -> bytes:
        """The ``/metrics`` body: this process's figures, or with ``--workers`` every worker's."""
        if self.shared is None:
            return generate_latest(self.registry)
        return self.shared.exposition(self.state)
