"""The registry facade: the one object the CLI, trainer and server talk to.

It composes the metadata store (who, what, which version) with the artifact
store (the bytes), and owns the order that keeps them consistent: files are
validated, then stored under their digest, and only then is the version row
committed. A crash before the commit leaves at most an unreferenced, complete
artifact, never a version without its files.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.registry import domain, gate
from loraflow.registry.adapter_files import ADAPTER_FILES, inspect_adapter
from loraflow.registry.basemodel import BaseModelInfo, resolve_base_model, template_hash_of, template_matches
from loraflow.registry.drift import Profile
from loraflow.registry.errors import (
    ConflictError,
    GateRefusedError,
    InvalidAdapterError,
    InvalidArgumentError,
    NotFoundError,
)
from loraflow.registry.gate import GateDecision
from loraflow.registry.refs import DEFAULT_ALIAS, Ref, check_alias, check_name, parse_ref
from loraflow.registry.rollouts import ARMS, Arm, Decision, Tally, decide, format_gated
from loraflow.registry.scopes import Scope
from loraflow.registry.settings import Settings

if TYPE_CHECKING:  # SQLAlchemy, SQLModel, Alembic and fsspec load when a store is opened, not on import
    from loraflow.registry.artifacts import ArtifactStore
    from loraflow.registry.store import Lease, LeaseStore, MetadataStore
    from loraflow.registry.traffic import TrafficStore, ValueRedactor

PAGE_FILE = "report.html"  # a stored report page: one file, content-addressed like any artifact
MAX_CORRECTION_CHARS = 20_000


class Registry:
    """The one way into the registry: adapters, versions, aliases, datasets, evaluations, drift
    reports, API keys and sampled traffic. The CLI, trainer and server call this, never the stores
    underneath, so its ordering rules hold everywhere: files before rows, the gate before a gated
    alias moves, every change audited and one registry revision further."""

    def __init__(
        self, settings: Settings, *, store: MetadataStore, artifacts: ArtifactStore | None = None
    ) -> None:
        """Over an open ``store`` (use :meth:`open`); ``artifacts`` is opened on first use if not given."""
        self.settings = settings
        self.store = store
        self._artifacts = artifacts
        self._traffic: TrafficStore | None = None

    @classmethod
    def open(cls, settings: Settings, *, create: bool = True) -> Registry:
        """The registry ``settings`` name, its schema at head. ``create=False`` (for commands that only
        read) refuses to create a SQLite database that is not there: NotFoundError naming the path.
        A database server that cannot be reached is UnavailableError; a bad URL InvalidArgumentError."""
        from loraflow.registry.db import open_engine
        from loraflow.registry.store import MetadataStore

        engine = open_engine(settings.resolved_database_url, create=create)
        return cls(settings, store=MetadataStore(engine))

    def close(self) -> None:
        """Release the database connections."""
        self.store.engine.dispose()

    @property
    def artifacts(self) -> ArtifactStore:
        """The artifact store (``Settings.resolved_artifact_uri``), opened on first use: a command
        that reads only metadata (``adapters list``) never loads fsspec. A bad ``artifact_uri`` is an
        InvalidArgumentError or MissingDependencyError naming it, raised here."""
        if self._artifacts is None:
            from loraflow.registry.artifacts import ArtifactStore

            self._artifacts = ArtifactStore(self.settings.resolved_artifact_uri)
        return self._artifacts

    @property
    def actor(self) -> str:
        """Who the audit log records for this process's changes (``Settings.actor``)."""
        return self.settings.actor

    def revision(self) -> int:
        """The registry revision: one higher after every change, what gateways poll to hot-swap."""
        return self.store.revision()

    @property
    def traffic(self) -> TrafficStore:
        """Sampled requests and feedback (``Settings.resolved_traffic_uri``), opened on first use."""
        if self._traffic is None:
            from loraflow.registry.traffic import TrafficStore

            self._traffic = TrafficStore(self.settings.resolved_traffic_uri)
        return self._traffic

    # -- adapters ----------------------------------------------------------------
    def register(
        self,
        name: str,
        src: Path,
        *,
        base_model: str,
        task: str | None = None,
        dataset: str | None = None,
        training_config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        eval_report: dict[str, Any] | None = None,
        chat_template_hash: str | None = None,
    ) -> domain.VersionInfo:
        """Import a PEFT LoRA adapter folder as the next version of ``name``."""
        from loraflow.registry.store import NewVersion

        check_name(name)
        base = resolve_base_model(base_model)
        facts = inspect_adapter(src, settings=self.settings.registry, base_config=base.config)
        self._check_declared_base(facts.base_model_name_or_path, base)
        if dataset is not None:
            dataset = self.get_dataset(dataset).ref
        stored = self.artifacts.put(src, ADAPTER_FILES)
        return self.store.register_version(
            name=name,
            base_model=base.id,
            base_model_fingerprint=base.fingerprint,
            task=task,
            new=NewVersion(
                digest=stored.digest,
                rank=facts.rank,
                alpha=facts.alpha,
                target_modules=facts.target_modules,
                size_bytes=stored.size_bytes,
                dataset=dataset,
                training_config=training_config,
                metrics=metrics,
                eval_report=eval_report,
                chat_template_hash=chat_template_hash,
            ),
            actor=self.actor,
        )

    @staticmethod
    def _check_declared_base(declared: str | None, base: BaseModelInfo) -> None:
        """If the adapter names a base we can find, it must be the same model as ``--base-model``."""
        if not declared or declared == base.id:
            return
        try:
            named = resolve_base_model(declared)
        except NotFoundError:
            return  # not resolvable here; the tensor shape check against --base-model still applies
        if named.fingerprint != base.fingerprint:
            raise InvalidAdapterError(
                f"the adapter was trained on {declared} (adapter_config.json base_model_name_or_path), "
                f"which is a different model from --base-model {base.id}",
                param="base",
            )

    def adapters(self) -> list[domain.AdapterInfo]:
        """Every adapter with its versions and aliases, by name."""
        return self.store.list_adapters()

    def get(self, name: str) -> domain.AdapterInfo:
        """One adapter with its versions and aliases; NotFoundError lists the names there are."""
        return self.store.get_adapter(name)

    def template_matches(self, adapter: domain.AdapterInfo) -> dict[int, bool | None]:
        """Per version: trained with the chat template its base model has here? None: unknown
        (no hash recorded, or the base is not on this machine)."""
        served = template_hash_of(adapter.base_model)
        return {v.version: template_matches(v.chat_template_hash, served) for v in adapter.versions}

    def resolve(self, ref: Ref) -> domain.VersionInfo:
        """The version a reference denotes: exact version, alias, or the default alias."""
        if ref.version is not None:
            return self.store.get_version(ref.name, ref.version)
        return self.store.get_alias(ref.name, ref.alias or DEFAULT_ALIAS)

    def get_version(self, name: str, version: int) -> domain.VersionInfo:
        """One version of an adapter (archived ones too); NotFoundError if there is none."""
        return self.store.get_version(name, version)

    def promote(
        self,
        name: str,
        version: int,
        *,
        alias: str = DEFAULT_ALIAS,
        expect: int | None = None,
        force: bool = False,
        reason: str | None = None,
    ) -> domain.AliasMoveInfo:
        """Point ``alias`` at ``version``. A gated alias (``gate.aliases``) first checks the version's
        latest eval report; ``force`` with a ``reason`` overrides a refusal, and both are audited."""
        check_alias(alias)
        _check_forced(force, reason)
        note: dict[str, Any] | None = {"forced": True, "reason": reason} if force else None
        condition: domain.AliasExpect = domain.AliasState.ANY if expect is None else expect
        if alias in self.settings.gate.aliases:
            production = self._alias_version(name, DEFAULT_ALIAS)
            decision = self._gate(name, version, alias=alias, production=production)
            if not decision.passed and not force:
                raise GateRefusedError(decision.message(), param="version")
            note = (note or {}) | {"gate": decision.to_json()}
            # The report was made against this production version (or against none): move only if
            # that is still so. Without this, two gated first promotions racing would both succeed.
            if decision.passed and alias == DEFAULT_ALIAS and expect is None:
                condition = domain.AliasState.UNSET if production is None else production
        return self.store.set_alias(
            name=name, alias=alias, version=version, expect=condition, actor=self.actor, note=note
        )

    def gate(self, name: str, version: int, *, alias: str = DEFAULT_ALIAS) -> GateDecision:
        """What the gate says about moving ``alias`` to ``version`` now (nothing is changed)."""
        return self._gate(name, version, alias=alias, production=self._alias_version(name, DEFAULT_ALIAS))

    def _gate(self, name: str, version: int, *, alias: str, production: int | None) -> GateDecision:
        candidate = self.store.get_version(name, version)
        evaluations = self.store.evaluations(name, version)
        return gate.check(
            self.settings.gate.policy_for(name),
            evaluations[-1] if evaluations else None,
            candidate=candidate,
            alias=alias,
            production=production,
        )

    def _alias_version(self, name: str, alias: str) -> int | None:
        return self.store.get_adapter(name).aliases.get(alias)

    def record_evaluation(
        self,
        name: str,
        version: int,
        *,
        dataset: str | None,
        split: str,
        split_digest: str,
        production_version: int | None,
        report: dict[str, Any],
        page: str | None = None,
    ) -> domain.EvaluationInfo:
        """Store an eval report on a version (the version itself stays immutable), and its HTML
        ``page`` in the artifact store first (files before rows), for the console to serve."""
        return self.store.add_evaluation(
            page_digest=self._put_page(page),
            name=name,
            version=version,
            dataset=dataset,
            split=split,
            split_digest=split_digest,
            production_version=production_version,
            report=report,
            actor=self.actor,
        )

    def evaluations(self, name: str, version: int | None = None) -> builtins.list[domain.EvaluationInfo]:
        """The stored ``loraflow eval`` reports of an adapter (of one version, if given), oldest first."""
        return self.store.evaluations(name, version)

    def evaluation(self, evaluation_id: int) -> domain.EvaluationInfo:
        """One stored eval report by its id (NotFoundError)."""
        return self.store.evaluation(evaluation_id)

    def record_drift(
        self,
        name: str,
        version: int,
        *,
        window_start: datetime,
        window_end: datetime,
        report: dict[str, Any],
        page: str | None = None,
    ) -> domain.DriftReportInfo:
        """Store a ``loraflow drift`` report (its HTML ``page`` first, in the artifact store);
        gateways export the latest per version."""
        return self.store.add_drift_report(
            page_digest=self._put_page(page),
            name=name,
            version=version,
            window_start=window_start,
            window_end=window_end,
            report=report,
            actor=self.actor,
        )

    def drift_reports(self) -> dict[str, domain.DriftReportInfo]:
        """The latest drift report of each version that has one, by ``NAME@vN``."""
        return self.store.latest_drift_reports()

    def drift_history(self, name: str, version: int | None = None) -> builtins.list[domain.DriftReportInfo]:
        """Every stored drift report of an adapter (of one version, if given), oldest first."""
        return self.store.drift_reports_of(name, version)

    def drift_report(self, report_id: int) -> domain.DriftReportInfo:
        """One stored drift report by its id (NotFoundError)."""
        return self.store.drift_report(report_id)

    def _put_page(self, page: str | None) -> str | None:
        if page is None:
            return None
        with tempfile.TemporaryDirectory(prefix="loraflow-page-") as tmp:
            (Path(tmp) / PAGE_FILE).write_text(page, encoding="utf-8")
            return self.artifacts.put(Path(tmp), [PAGE_FILE]).digest

    def page(self, digest: str) -> str:
        """A stored report page (verified against its digest on the way out)."""
        return self.artifacts.read_bytes(digest, PAGE_FILE).decode("utf-8")

    # -- reviews -----------------------------------------------------------------
    def add_review(
        self,
        request_id: str,
        *,
        reviewer: str,
        redactor: ValueRedactor,
        rating: int | None = None,
        correction: str | None = None,
        categories: Sequence[str] = (),
        adapter: str | None = None,
    ) -> domain.ReviewInfo:
        """A person's review of a sampled request: a rating (+1/-1), a corrected answer (redacted
        here, like every free text the registry keeps), failure categories from
        ``console.categories``. The adapter and version are the request record's own; ``adapter``,
        when given, must be it (a reviewer's key may see only its adapters). Nothing is written
        when any part is refused."""
        if rating not in (None, 1, -1):
            raise InvalidArgumentError(f"rating is +1 or -1, not {rating!r}", param="rating")
        taxonomy = self.settings.console.categories
        unknown = [c for c in categories if c not in taxonomy]
        if unknown:
            raise InvalidArgumentError(
                f"unknown category {unknown[0]!r}; console.categories: {', '.join(taxonomy)}",
                param="categories",
            )
        if correction is not None:
            correction = correction.strip() or None
        if correction is not None and len(correction) > MAX_CORRECTION_CHARS:
            raise InvalidArgumentError(
                f"the correction is {len(correction)} characters; at most {MAX_CORRECTION_CHARS}",
                param="correction",
            )
        if rating is None and correction is None and not categories:
            raise InvalidArgumentError(
                "a review rates, corrects or tags the answer: it has none of them", param="rating"
            )
        record = self.traffic.find_request(request_id)
        if record is None or (adapter is not None and record.get("adapter") != adapter):
            raise NotFoundError(f"no sampled request {request_id!r}", param="request_id")
        if correction is not None:
            redacted, _ = redactor.redact_value(correction)
            correction = str(redacted)
        return self.store.add_review(
            name=str(record["adapter"]),
            version=int(record["version"]),
            request_id=request_id,
            rating=rating,
            correction=correction,
            categories=sorted(set(categories), key=builtins.list(taxonomy).index),
            actor=reviewer,
        )

    def reviews(self, name: str, version: int | None = None) -> builtins.list[domain.ReviewInfo]:
        """Every review of an adapter's requests (of one version, if given), oldest first; what
        counts for a request is its latest (``registry.reviews.current_reviews``)."""
        return self.store.reviews(name, version)

    def add_pairwise_vote(
        self,
        name: str,
        *,
        source: domain.PairwiseSource,
        source_id: int,
        item: str,
        candidate: int,
        baseline: str,
        choice: domain.PairwiseChoice,
        reviewer: str,
    ) -> domain.PairwiseVoteInfo:
        """One reviewer's blind pick for one item (ConflictError for a second pick of the same item)."""
        if choice not in ("candidate", "baseline", "tie"):
            raise InvalidArgumentError(
                f"choice is candidate, baseline or tie, not {choice!r}", param="choice"
            )
        return self.store.add_pairwise_vote(
            name=name,
            source=source,
            source_id=source_id,
            item=item,
            candidate=candidate,
            baseline=baseline,
            choice=choice,
            actor=reviewer,
        )

    def pairwise_votes(
        self, source: domain.PairwiseSource, source_id: int
    ) -> builtins.list[domain.PairwiseVoteInfo]:
        """The blind picks of an eval report (``evaluation``, its id) or a rollout (its id)."""
        return self.store.pairwise_votes(source=source, source_id=source_id)

    def with_actor(self, actor: str) -> Registry:
        """This registry over the same stores, recording ``actor`` in the audit log (the console
        acts for the person logged in, not for the process's user)."""
        twin = Registry(
            self.settings.model_copy(update={"user": actor}), store=self.store, artifacts=self._artifacts
        )
        twin._traffic = self._traffic
        return twin

    def rollback(self, name: str, *, alias: str = DEFAULT_ALIAS) -> domain.AliasMoveInfo:
        """Move ``alias`` to the version it pointed at before its last move forward (rollbacks
        undo forward moves one by one, so repeated rollbacks walk back through history); audited."""
        check_alias(alias)
        return self.store.rollback_alias(name=name, alias=alias, actor=self.actor)

    def delete_alias(self, name: str, alias: str, *, force: bool = False) -> int:
        """Remove ``alias`` (audited); returns the version it pointed at. A gated alias
        (``gate.aliases``) and ``production`` (what a bare ``NAME`` is served by) need ``force``.
        Its moves stay in the history; a later promote creates it afresh."""
        check_alias(alias)
        if (alias == DEFAULT_ALIAS or alias in self.settings.gate.aliases) and not force:
            raise ConflictError(
                f"{name}:{alias} is a gated or serving alias (requests for {name} use production); "
                "deleting it needs --force",
                param="force",
            )
        return self.store.delete_alias(name=name, alias=alias, actor=self.actor)

    # -- rollouts ----------------------------------------------------------------
    def start_rollout(
        self,
        name: str,
        version: int,
        *,
        policy: str = "default",
        steps: builtins.list[domain.RolloutStep] | None = None,
        force: bool = False,
        reason: str | None = None,
    ) -> domain.RolloutInfo:
        """Start rolling ``version`` out from production, by ``steps`` (default: the policy's). The
        offline gate applies as for ``promote`` to production: a refusal is GateRefusedError unless
        ``force`` with a ``reason``; the decision is recorded with the rollout's start."""
        _check_forced(force, reason)
        chosen = self.settings.rollout.policy(policy)
        steps = steps or chosen.steps
        if steps[0].canary >= 100:
            raise InvalidArgumentError(
                "a rollout that starts at canary 100% leaves production no traffic to compare the "
                "candidate with: start lower (e.g. --canary 10), or use `adapters promote`",
                param="canary",
            )
        production = self._alias_version(name, DEFAULT_ALIAS)
        decision = self._gate(name, version, alias=DEFAULT_ALIAS, production=production)
        if not decision.passed and not force:
            raise GateRefusedError(decision.message(), param="version")
        note: dict[str, Any] = {"gate": decision.to_json()} | (
            {"forced": True, "reason": reason} if force else {}
        )
        return self.store.start_rollout(
            name=name,
            candidate=version,
            policy=policy,
            steps=builtins.list(steps),
            actor=self.actor,
            note=note,
        )

    def rollout(self, name: str) -> domain.RolloutInfo | None:
        """The adapter's running or paused rollout, if any."""
        return next((r for r in reversed(self.store.rollouts(name)) if r.active), None)

    def rollouts(self, name: str | None = None) -> builtins.list[domain.RolloutInfo]:
        """Every rollout of ``name``, oldest first; without a name, every active one."""
        return self.store.rollouts(name) if name is not None else self.store.active_rollouts()

    def advance_rollout(
        self,
        name: str,
        *,
        expect_seq: int | None = None,
        reason: str | None = None,
        figures: dict[str, Any] | None = None,
        controller: str | None = None,
    ) -> domain.RolloutInfo:
        """To the next step, or (from a last step at canary 100%) production to the candidate.
        ``controller``: the gateway's controller that decided it, recorded as the actor with ours."""
        return self.store.advance_rollout(
            name=name,
            expect_seq=expect_seq,
            actor=self._actor_for(controller),
            reason=reason,
            figures=figures,
        )

    def roll_back_rollout(
        self,
        name: str,
        *,
        reason: str,
        expect_seq: int | None = None,
        figures: dict[str, Any] | None = None,
        controller: str | None = None,
    ) -> domain.RolloutInfo:
        """End the rollout because the candidate failed its guards; production is unchanged."""
        return self.store.end_rollout(
            name=name,
            state="rolled_back",
            expect_seq=expect_seq,
            actor=self._actor_for(controller),
            reason=reason,
            figures=figures,
        )

    def _actor_for(self, controller: str | None) -> str:
        return f"{self.actor} (rollout controller {controller})" if controller else self.actor

    def abort_rollout(self, name: str, *, reason: str | None = None) -> domain.RolloutInfo:
        """End the rollout at an operator's word; production is unchanged."""
        return self.store.end_rollout(
            name=name, state="aborted", expect_seq=None, actor=self.actor, reason=reason
        )

    def pause_rollout(self, name: str) -> domain.RolloutInfo:
        """Hold the weights where they are; nothing advances or rolls back on its own."""
        return self.store.pause_rollout(name=name, expect_seq=None, actor=self.actor)

    def resume_rollout(self, name: str, *, to: float | None = None) -> domain.RolloutInfo:
        """Decide on its own again; ``to`` adds a canary step up to that percent."""
        return self.store.resume_rollout(name=name, to=to, expect_seq=None, actor=self.actor)

    def claim_rollout(self, rollout: domain.RolloutInfo, *, holder: str, ttl_s: float) -> bool:
        """Take or renew the one controller lease of ``rollout`` (see MetadataStore.claim_rollout)."""
        return self.store.claim_rollout(rollout_id=rollout.id, holder=holder, ttl_s=ttl_s)

    def release_rollout(self, rollout: domain.RolloutInfo, *, holder: str) -> None:
        """Give up ``holder``'s controller lease of ``rollout`` (if it holds it), for another to take."""
        self.store.release_rollout(rollout_id=rollout.id, holder=holder)

    def put_tallies(
        self, rollout: domain.RolloutInfo, *, holder: str, step: int, tallies: dict[Arm, Tally]
    ) -> None:
        """Record what this gateway process (``holder``) counted in ``step`` so far, per arm."""
        self.store.put_tallies(
            rollout_id=rollout.id,
            holder=holder,
            step=step,
            counts={arm: tally.to_json() for arm, tally in tallies.items()},
        )

    def tallies(self, rollout: domain.RolloutInfo) -> dict[Arm, Tally]:
        """What every gateway counted in the rollout's current step, summed per arm. At canary
        100% production answers nothing in the step, so its arm is the latest earlier step's in
        which it answered: the nearest window the candidate can be compared on."""
        total = self._step_tallies(rollout.id, rollout.step)
        if rollout.current.canary >= 100:
            # Its own counts are stragglers (a request or a rating of the step before, finished
            # after the move): they join the earlier window instead of standing for it.
            for step in range(rollout.step - 1, -1, -1):
                earlier = self._step_tallies(rollout.id, step)["production"]
                if earlier.requests:
                    earlier.add(total["production"])
                    total["production"] = earlier
                    break
        return total

    def rollout_verdict(self, rollout: domain.RolloutInfo, *, now: datetime | None = None) -> Decision:
        """What the rollout's figures say now, as its controller would decide (``adapters rollout
        status`` shows it). The policy is this process's settings' (the default if it lacks it)."""
        policy = self.settings.rollout.policy_or_default(rollout.policy)
        share = None
        baseline = self.get_version(rollout.adapter, rollout.baseline)
        if baseline.dataset:
            with contextlib.suppress(NotFoundError):
                profile = self.get_dataset(baseline.dataset).profile
                share = profile.json_share if profile is not None else None
        return decide(
            rollout,
            self.tallies(rollout),
            policy,
            now=now or datetime.now(UTC),
            format_gated=format_gated(share),
        )

    def _step_tallies(self, rollout_id: int, step: int) -> dict[Arm, Tally]:
        total: dict[Arm, Tally] = {arm: Tally() for arm in ARMS}
        for arm, counts in self.store.tallies(rollout_id=rollout_id, step=step):
            if arm in total:  # an arm a later release added is not this one's to judge
                total[arm].add(Tally.from_json(counts))
        return total

    def archive(self, name: str, version: int) -> domain.VersionInfo:
        """Mark a version archived: never served again. Refused while an alias points at it."""
        return self.store.archive(name=name, version=version, actor=self.actor)

    def history(self, name: str) -> domain.History:
        """An adapter's alias moves and its audit events, oldest first."""
        return self.store.history(name)

    def diff(self, name: str, a: int, b: int) -> dict[str, dict[str, tuple[Any, Any]]]:
        """What changed between two versions: {section: {key: (in a, in b)}}, only differing keys."""
        va, vb = self.store.get_version(name, a), self.store.get_version(name, b)
        sections: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
            "weights": (
                {k: getattr(va, k) for k in ("digest", "rank", "alpha", "target_modules", "size_bytes")},
                {k: getattr(vb, k) for k in ("digest", "rank", "alpha", "target_modules", "size_bytes")},
            ),
            "dataset": ({"dataset": va.dataset}, {"dataset": vb.dataset}),
            "config": (_flatten(va.training_config or {}), _flatten(vb.training_config or {})),
            "metrics": (_flatten(va.metrics or {}), _flatten(vb.metrics or {})),
        }
        out: dict[str, dict[str, tuple[Any, Any]]] = {}
        for section, (left, right) in sections.items():
            changed = {
                k: (left.get(k), right.get(k))
                for k in sorted(left.keys() | right.keys())
                if left.get(k) != right.get(k)
            }
            if changed:
                out[section] = changed
        return out

    def fetch(self, version: domain.VersionInfo, dest: Path) -> Path:
        """Materialize a version's files in ``dest``, verified against its digest."""
        return self.artifacts.fetch(version.digest, dest)

    # -- API keys ----------------------------------------------------------------
    def api_keys(self) -> builtins.list[domain.ApiKeyInfo]:
        """Every API key's record (never the key: only its hash is stored), revoked ones too."""
        return self.store.list_api_keys()

    def add_api_key(
        self,
        *,
        name: str,
        prefix: str,
        key_hash: str,
        adapters: builtins.list[str] | None,
        scopes: Sequence[Scope] = (),
        limits: domain.KeyLimits | None = None,
    ) -> domain.ApiKeyInfo:
        """Record a key by its hash (``registry.keys`` makes or imports the key itself), with
        least privilege unless ``scopes`` say more. A name that exists is a :class:`ConflictError`."""
        return self.store.create_api_key(
            name=name,
            prefix=prefix,
            key_hash=key_hash,
            adapters=adapters,
            scopes=sorted(set(scopes)),
            limits=limits or domain.KeyLimits(),
            actor=self.actor,
        )

    # -- rate-limit leases (server/ratelimit.py) ------------------------------------------
    def lease_budget(self, *, key: str, kind: str, bucket: int, span: int, want: int, limit: int) -> Lease:
        """Take a slice of an API key's budget over a sliding window (see :class:`LeaseStore`)."""
        return self._leases.lease_budget(key=key, kind=kind, bucket=bucket, span=span, want=want, limit=limit)

    def return_budget(self, *, key: str, kind: str, bucket: int, amount: int) -> None:
        """Give back what a lease into ``bucket`` did not spend there."""
        self._leases.return_budget(key=key, kind=kind, bucket=bucket, amount=amount)

    def lease_slots(self, *, key: str, holder: str, slots: int, limit: int, ttl_s: float) -> int:
        """Hold ``slots`` of an API key's concurrent requests, as the limit allows."""
        return self._leases.lease_slots(key=key, holder=holder, slots=slots, limit=limit, ttl_s=ttl_s)

    def renew_slots(self, *, holder: str, ttl_s: float) -> None:
        self._leases.renew_slots(holder=holder, ttl_s=ttl_s)

    @functools.cached_property
    def _leases(self) -> LeaseStore:
        from loraflow.registry.store import LeaseStore

        return LeaseStore(self.store.engine)

    def revoke_api_key(self, name: str) -> domain.ApiKeyInfo:
        """Gateways stop accepting the key within a poll interval."""
        return self.store.revoke_api_key(name=name, actor=self.actor)

    # -- datasets ----------------------------------------------------------------
    def register_dataset(
        self,
        name: str,
        folder: Path,
        files: tuple[str, ...],
        *,
        counts: dict[str, int],
        lineage: dict[str, Any],
        profile: Profile | None,
    ) -> domain.DatasetVersionInfo:
        """Store a dataset's split files under their digest, then register its next version (files
        before the row). The same splits twice are a :class:`ConflictError` naming the version."""
        stored = self.artifacts.put(folder, files)
        return self.store.register_dataset_version(
            name=name, digest=stored.digest, counts=counts, lineage=lineage, profile=profile, actor=self.actor
        )

    def find_dataset(self, name: str, digest: str) -> domain.DatasetVersionInfo | None:
        """The version of dataset ``name`` that holds exactly these splits, if any."""
        return self.store.find_dataset_version(name, digest)

    def datasets(self, name: str | None = None) -> builtins.list[domain.DatasetVersionInfo]:
        """Every registered dataset version (of ``name``, if given), by name then version."""
        return self.store.list_dataset_versions(name)

    def get_dataset(self, ref: str) -> domain.DatasetVersionInfo:
        """``NAME`` (latest) or ``NAME@vN``."""
        parsed = parse_ref(ref, param="dataset")
        return self.store.get_dataset_version(parsed.name, parsed.version)

    def dataset_split(self, version: domain.DatasetVersionInfo, split: str) -> bytes:
        """The JSONL file of one split of a registered dataset version, read from the artifact
        store and verified against the version's digest."""
        return self.artifacts.read_bytes(version.digest, f"{split}.jsonl")


def _check_forced(force: bool, reason: str | None) -> None:
    """Going past the gate needs a reason, and a reason only goes with going past it."""
    if force and not (reason or "").strip():
        raise InvalidArgumentError("--force needs --reason: say why the gate is overridden", param="reason")
    if reason is not None and not force:
        raise InvalidArgumentError("--reason goes with --force", param="reason")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat
