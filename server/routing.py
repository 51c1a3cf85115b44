"""The routing table: which version each ``model`` a client names is served by, and hot-swap.

A background loop polls the registry revision (one indexed read). When the
revision moves, it loads a new snapshot (aliases, versions, API keys) and
*preloads* every aliased version on the healthy replicas of its home set
(:meth:`ReplicaSet.home`; at most ``max_cpu_loras`` per replica), all replicas
at once. Only then does it swap the snapshot in, with one assignment. A request
resolves its target once, at the start, so in-flight requests finish on the version they began with. A new
alias target is resident on its home set before any request can resolve to
it. A preload that fails (a replica down, an artifact refused, a load that timed
out) is logged and does not hold back the swap: the version is loaded on
demand, or its requests get 503. A failure on a replica that is still up is
tried again, after 1 s and then twice as long each time up to a minute, until
the version is loaded or no longer homed there; a replica that went down is
preloaded in full when it comes back (:meth:`RoutingTable.sync_recovered`).

Engines are told names only (``NAME@vN+DIGEST``); each fetches and verifies the
files itself (``server/engine/plugin.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from loraflow.registry import domain
from loraflow.registry.basemodel import template_matches
from loraflow.registry.drift import Profile
from loraflow.registry.errors import LoraflowError, NotFoundError, UnavailableError
from loraflow.registry.refs import DEFAULT_ALIAS, parse_ref, version_ref
from loraflow.registry.rollouts import Arm, split_point
from loraflow.registry.service import Registry
from loraflow.server.engine import cache
from loraflow.server.engine.protocol import EngineDown
from loraflow.server.replicas import Replica, ReplicaSet

log = logging.getLogger("loraflow.routing")

PRELOAD_RETRY_FIRST_S = 1.0  # a failed preload is tried again after this long,
PRELOAD_RETRY_MAX_S = 60.0  # then twice as long each time, up to this


@dataclass(frozen=True)
class Target:
    public: str  # what the response's `model` says
    engine_model: str  # what the engine is asked for
    adapter: str | None = None
    version: int | None = None
    rollout: domain.RolloutInfo | None = None  # the rollout whose split chose it (bare NAME only)
    arm: Arm | None = None  # production or candidate, with a rollout; shadow for a shadow call


@dataclass(frozen=True)
class Snapshot:
    revision: int = -1
    adapters: dict[str, domain.AdapterInfo] = field(default_factory=dict)
    versions: dict[str, domain.VersionInfo] = field(default_factory=dict)  # "NAME@vN"
    keys: dict[str, domain.ApiKeyInfo] = field(default_factory=dict)  # sha256 -> active key
    profiles: dict[str, Profile] = field(default_factory=dict)  # "NAME@vN" -> training profile
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # "NAME@vN" -> latest drift report
    rollouts: dict[str, domain.RolloutInfo] = field(default_factory=dict)  # adapter -> its active rollout

    @cached_property
    def aliased(self) -> set[str]:
        """Engine names of every version an alias points at, and of every rollout's candidate:
        both are preloaded before the snapshot serves."""
        refs = {version_ref(a.name, v) for a in self.adapters.values() for v in a.aliases.values()}
        refs |= {r.candidate_ref for r in self.rollouts.values()}
        return {cache.engine_name_of(self.versions[ref]) for ref in refs if ref in self.versions}


def model_not_found(model: str) -> NotFoundError:
    """The one answer for a model that does not exist, or that the caller's key may not know of."""
    return NotFoundError(f"the model {model!r} does not exist", param="model")


class RoutingTable:
    def __init__(
        self,
        registry: Registry,
        replicas: ReplicaSet,
        *,
        base_model_id: str,
        engine_base_name: str,
        poll_interval_s: float,
        base_template_hash: str | None = None,
    ) -> None:
        self.registry = registry
        self.base_template_hash = base_template_hash
        self._template_warned: set[str] = set()
        self.replicas = replicas
        self.base_model_id = base_model_id
        self.engine_base_name = engine_base_name
        self.poll_interval_s = poll_interval_s
        self.snapshot = Snapshot()
        self.started_at = int(time.time())
        self._registry_ok = False
        self._pins: tuple[tuple[int, int], dict[str, frozenset[str]]] = ((-2, -1), {})
        self.preload_failures = 0
        # (replica URL, engine name) -> (when to try again, the wait after that) for failed preloads.
        self._retries: dict[tuple[str, str], tuple[float, float]] = {}
        self._incoming: Snapshot | None = None  # the snapshot being preloaded, until it is swapped in
        self._profiles: dict[str, Profile | None] = {}  # dataset "NAME@vK" -> profile (immutable)

    # -- resolution --------------------------------------------------------------
    @property
    def base_names(self) -> tuple[str, ...]:
        """What names the base model: its public id, and the engine's name for it."""
        return (self.base_model_id, self.engine_base_name)

    def resolve(self, model: str, *, split_key: str | None = None) -> Target:
        """The version that answers ``model``. A bare ``NAME`` whose adapter is in rollout goes to the
        candidate when ``split_key``'s point is below the canary's weight (:func:`split_point`);
        ``NAME@vN`` and ``NAME:ALIAS`` name their version and bypass the split."""
        if model in self.base_names:
            return Target(public=self.base_model_id, engine_model=self.engine_base_name)
        snap = self.snapshot
        try:
            ref = parse_ref(model, param="model")
        except LoraflowError as exc:
            raise model_not_found(model) from exc
        adapter = snap.adapters.get(ref.name)
        if adapter is None:
            raise model_not_found(model)
        rollout: domain.RolloutInfo | None = None
        arm: Arm | None = None
        if ref.version is not None:
            version = ref.version
        elif ref.alias is None and (rollout := snap.rollouts.get(ref.name)) is not None:
            canary = rollout.current.canary
            to_candidate = canary > 0 and split_point(rollout.id, split_key or "") < canary
            arm = "candidate" if to_candidate else "production"
            version = rollout.candidate if to_candidate else rollout.baseline
        else:
            alias = ref.alias or DEFAULT_ALIAS
            if alias not in adapter.aliases:
                raise NotFoundError(
                    f"the model {model!r} does not exist: {ref.name} has no {alias!r} alias "
                    f"(aliases: {', '.join(sorted(adapter.aliases)) or 'none'})",
                    param="model",
                )
            version = adapter.aliases[alias]
        name = version_ref(ref.name, version)
        info = snap.versions.get(name)
        if info is None or info.status == "archived":
            state = "archived" if info else "unknown"
            raise NotFoundError(f"the model {model!r} does not exist: {name} is {state}", param="model")
        return Target(
            public=name,
            engine_model=cache.engine_name_of(info),
            adapter=ref.name,
            version=version,
            rollout=rollout,
            arm=arm,
        )

    def shadow_of(self, target: Target, split_key: str) -> Target | None:
        """The candidate to shadow a request to, when ``target`` is production's side of a rollout
        whose step shadows and ``split_key`` falls in the shadowed share (a point of its own,
        salted apart from the canary's, so the shadowed share is not one end of the canary's)."""
        rollout = target.rollout
        if rollout is None or target.arm != "production" or rollout.current.shadow <= 0:
            return None
        if split_point(rollout.id, f"shadow\x00{split_key}") >= rollout.current.shadow:
            return None
        info = self.snapshot.versions.get(rollout.candidate_ref)
        if info is None or info.status == "archived":
            return None
        return Target(
            public=rollout.candidate_ref,
            engine_model=cache.engine_name_of(info),
            adapter=rollout.adapter,
            version=rollout.candidate,
            rollout=rollout,
            arm="shadow",
        )

    # -- placement ---------------------------------------------------------------
    def pinned(self, replica: Replica, snap: Snapshot | None = None) -> frozenset[str]:
        """Aliased versions ``replica`` is home to: it evicts them last (:meth:`Replica.ensure_loaded`)."""
        snap = snap or self.snapshot
        if snap is not self.snapshot:
            return frozenset(self.replicas.homes_on(replica, snap.aliased))
        key = (snap.revision, self.replicas.generation)
        if self._pins[0] != key:
            self._pins = (key, {})
        pins = self._pins[1]
        if replica.url not in pins:
            pins[replica.url] = frozenset(self.replicas.homes_on(replica, snap.aliased))
        return pins[replica.url]

    async def ensure_loaded(self, replica: Replica, target: Target) -> None:
        if target.adapter is not None:
            await replica.ensure_loaded(target.engine_model, pinned=self.pinned(replica))

    # -- refresh -----------------------------------------------------------------
    def _load_snapshot(self) -> Snapshot:
        revision = self.registry.revision()
        adapters = {a.name: a for a in self.registry.adapters()}
        versions = {v.ref: v for a in adapters.values() for v in a.versions}
        keys = {k.key_hash: k for k in self.registry.api_keys() if k.revoked_at is None}
        profiles = {}
        for ref, version in versions.items():
            profile = self._profile(version.dataset) if version.dataset else None
            if profile:
                profiles[ref] = profile
        drift = {ref: info.report for ref, info in self.registry.drift_reports().items()}
        rollouts = {r.adapter: r for r in self.registry.rollouts()}
        return Snapshot(
            revision=revision,
            adapters=adapters,
            versions=versions,
            keys=keys,
            profiles=profiles,
            drift=drift,
            rollouts=rollouts,
        )

    def _profile(self, dataset: str) -> Profile | None:
        if dataset not in self._profiles:
            try:
                self._profiles[dataset] = self.registry.get_dataset(dataset).profile
            except NotFoundError:
                self._profiles[dataset] = None
        return self._profiles[dataset]

    async def _preload(
        self, snap: Snapshot, replicas: list[Replica], *, only: set[tuple[str, str]] | None = None
    ) -> None:
        """Load the aliased versions each replica is home to (as many as it holds), replicas in
        parallel; with ``only``, just those of its (replica URL, name) pairs still homed there."""

        async def preload(replica: Replica) -> None:
            # The outgoing targets stay pinned until the swap: they serve until then.
            keep = self.pinned(replica, snap) | self.pinned(replica)
            if self._incoming is not None and self._incoming is not snap:
                keep |= self.pinned(replica, self._incoming)  # a refresh is preloading it right now
            names = self._to_preload(replica, snap)
            if only is not None:
                for key in [k for k in only if k[0] == replica.url and k[1] not in names]:
                    self._retries.pop(key, None)  # no longer homed here, or no longer aliased
                names = [n for n in names if (replica.url, n) in only]
            for name in names:
                try:
                    await replica.ensure_loaded(name, pinned=keep)
                except LoraflowError as exc:  # one refused version must not keep the others out
                    self.preload_failures += 1
                    if isinstance(exc, EngineDown):
                        log.warning("preload of %s on %s failed: %s", name, replica.url, exc.detail)
                        replica.healthy = False  # preloaded in full when it is back (sync_recovered)
                        return
                    delay = self._retry_later(replica.url, name)
                    log.warning(
                        "preload of %s on %s failed: %s; trying again in %.0f s",
                        name,
                        replica.url,
                        getattr(exc, "detail", exc),
                        delay,
                    )
                else:
                    self._retries.pop((replica.url, name), None)

        await asyncio.gather(*(preload(r) for r in replicas if r.healthy))

    def _retry_later(self, url: str, name: str) -> float:
        _, wait = self._retries.get((url, name), (0.0, PRELOAD_RETRY_FIRST_S))
        self._retries[(url, name)] = (time.monotonic() + wait, min(2 * wait, PRELOAD_RETRY_MAX_S))
        return wait

    async def retry_preloads(self) -> None:
        """Try the failed preloads that are due again, on the replicas still up and still their home."""
        now = time.monotonic()
        due = {key for key, (at, _) in self._retries.items() if at <= now}
        if not due:
            return
        members = {r.url for r in self.replicas.replicas}
        for key in [k for k in due if k[0] not in members]:
            del self._retries[key]  # the replica left
        urls = {url for url, _ in due}
        await self._preload(self.snapshot, [r for r in self.replicas.healthy() if r.url in urls], only=due)

    def _to_preload(self, replica: Replica, snap: Snapshot) -> list[str]:
        """The aliased versions ``replica`` is home to, at most as many as it holds (those it holds
        already first): preloading more would only unload the first ones again."""
        home = sorted(
            self.replicas.homes_on(replica, snap.aliased), key=lambda n: (n not in replica.resident, n)
        )
        if len(home) > replica.max_resident:
            log.warning(
                "%s is home to %d aliased versions but holds %d (server.max_cpu_loras); "
                "preloading %d, the rest load on their first request",
                replica.url,
                len(home),
                replica.max_resident,
                replica.max_resident,
            )
        return home[: replica.max_resident]

    async def preload_home(self, replica: Replica) -> None:
        """After ``replica`` (re)started: learn what it holds, and load the versions it is home to."""
        replica.reset(await replica.engine.loaded_adapters())
        await self._preload(self.snapshot, [replica])

    async def refresh(self) -> bool:
        """Swap in a new snapshot if the registry changed. True if it did."""
        revision = await asyncio.to_thread(self.registry.revision)
        self._registry_ok = True
        if revision == self.snapshot.revision:
            return False
        snap = await asyncio.to_thread(self._load_snapshot)
        self._incoming = snap
        try:
            await self._preload(snap, self.replicas.healthy())
            self.snapshot = snap
        finally:
            self._incoming = None
        self._warn_template_mismatches(snap)
        log.info("routing: registry revision %s, %d adapters", snap.revision, len(snap.adapters))
        return True

    def template_matches(self, version: domain.VersionInfo) -> bool | None:
        """Whether a version was trained with the chat template this gateway serves (None: unknown)."""
        return template_matches(version.chat_template_hash, self.base_template_hash)

    def _warn_template_mismatches(self, snap: Snapshot) -> None:
        for ref, version in snap.versions.items():
            if self.template_matches(version) is False and ref not in self._template_warned:
                self._template_warned.add(ref)
                log.warning(
                    "%s was trained with a different chat template than the served base model; "
                    "its prompts will be rendered differently from training",
                    ref,
                )

    async def sync_recovered(self) -> None:
        """Replicas that came (back) up: learn what they hold, and preload what aliases need."""
        for replica in await self.replicas.check_health():
            try:
                await self.preload_home(replica)
                log.info("replica %s is up with %d adapters", replica.url, len(replica.resident))
            except LoraflowError as exc:
                replica.healthy = False
                log.warning("replica %s not ready: %s", replica.url, exc)

    def loaded(self) -> Snapshot:
        """The routing snapshot; before the first one is loaded, a 503 rather than a 404 or 401
        for models and keys that exist (a worker may take connections before its first poll)."""
        snap = self.snapshot
        if snap.revision < 0:
            raise UnavailableError(
                "the gateway is starting: its routing table is not loaded yet; retry shortly"
            )
        return snap

    @property
    def ready(self) -> bool:
        return self._registry_ok and bool(self.replicas.healthy()) and self.snapshot.revision >= 0

    async def run(self) -> None:
        """Health checks, registry polls and preload retries, each in its own loop, so that a replica
        slow to answer its health check (a busy engine, a dead host's connect timeout) or a slow
        retried load never delays a promote."""
        await asyncio.gather(
            self._every_poll(self.sync_recovered, "health check round"),
            self._every_poll(self.refresh, "routing refresh", on_error=self._registry_down),
            self._every_poll(self.retry_preloads, "preload retry round"),
        )

    def _registry_down(self) -> None:
        self._registry_ok = False  # not ready until the registry answers again

    async def _every_poll(
        self, step: Callable[[], Awaitable[object]], what: str, *, on_error: Callable[[], None] | None = None
    ) -> None:
        """Run ``step`` every ``poll_interval_s``, logging what fails and going on: routing stays up
        through engine and registry hiccups."""
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if on_error is not None:
                    on_error()
                log.warning("%s failed: %s", what, exc)
            await asyncio.sleep(self.poll_interval_s)
