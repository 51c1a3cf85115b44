"""Registry tables (SQLModel). Rows never leave the store: each converts itself with
``to_domain()`` (MLflow's ``to_mlflow_entity()``) into the plain object of ``registry.domain``
the store hands out. What a row does not hold (its adapter's name, a dataset reference found
through another table) the store passes in.

Every mutation runs in one transaction that first bumps ``RegistryState.revision``.
That single row is the registry's write lock (a row lock on PostgreSQL, the
database write lock on SQLite), so concurrent writers are serialized, version
numbers cannot collide and alias history stays linear. It is also the cheap
"did anything change?" number servers poll.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from loraflow.registry import domain


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=nullable))


class RegistryState(SQLModel, table=True):
    __tablename__ = "registry_state"

    id: int = Field(default=1, primary_key=True)
    revision: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class Adapter(SQLModel, table=True):
    __tablename__ = "adapter"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    base_model: str = Field(max_length=1024)
    base_model_fingerprint: str = Field(max_length=64)
    task: str | None = Field(default=None)
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, aliases: dict[str, int], versions: list[domain.VersionInfo]) -> domain.AdapterInfo:
        return domain.AdapterInfo(
            name=self.name,
            base_model=self.base_model,
            base_model_fingerprint=self.base_model_fingerprint,
            task=self.task,
            created_by=self.created_by,
            created_at=self.created_at,
            aliases=aliases,
            versions=versions,
        )


class DatasetRow(SQLModel, table=True):
    __tablename__ = "dataset"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    description: str | None = Field(default=None)
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()


class DatasetVersionRow(SQLModel, table=True):
    __tablename__ = "dataset_version"
    __table_args__ = (UniqueConstraint("dataset_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="dataset.id", index=True)
    version: int
    digest: str = Field(max_length=64)
    counts: dict[str, int] = _json(nullable=False)
    lineage: dict[str, Any] = _json(nullable=False)
    profile: dict[str, Any] | None = _json()
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, name: str) -> domain.DatasetVersionInfo:
        return domain.DatasetVersionInfo(
            name=name,
            version=self.version,
            digest=self.digest,
            counts=self.counts,
            lineage=self.lineage,
            profile=self.profile,  # the stored JSON, validated into a Profile
            created_by=self.created_by,
            created_at=self.created_at,
        )


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_version"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id", index=True)
    version: int
    digest: str = Field(max_length=64, index=True)
    rank: int
    alpha: float
    target_modules: list[str] = _json(nullable=False)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    dataset_version_id: int | None = Field(default=None, foreign_key="dataset_version.id")
    training_config: dict[str, Any] | None = _json()
    metrics: dict[str, Any] | None = _json()
    eval_report: dict[str, Any] | None = _json()
    chat_template_hash: str | None = Field(default=None, max_length=64)
    status: str = Field(default="registered", max_length=16)
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str, dataset: str | None) -> domain.VersionInfo:
        return domain.VersionInfo(
            adapter=adapter,
            version=self.version,
            digest=self.digest,
            rank=self.rank,
            alpha=self.alpha,
            target_modules=list(self.target_modules),
            size_bytes=self.size_bytes,
            dataset=dataset,
            training_config=self.training_config,
            metrics=self.metrics,
            eval_report=self.eval_report,
            chat_template_hash=self.chat_template_hash,
            status=self.status,
            created_by=self.created_by,
            created_at=self.created_at,
        )


class Alias(SQLModel, table=True):
    __tablename__ = "alias"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id", index=True)
    name: str = Field(max_length=64)
    version: int
    updated_at: datetime = _ts()


class AliasMove(SQLModel, table=True):
    """One row per alias move: the alias's history, in revision order."""

    __tablename__ = "alias_move"

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id", index=True)
    alias: str = Field(max_length=64)
    from_version: int | None = None
    to_version: int
    reason: str = Field(max_length=16)  # "promote" or "rollback"
    revision: int = Field(index=True)
    actor: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str) -> domain.AliasMoveInfo:
        return domain.AliasMoveInfo(
            adapter=adapter,
            alias=self.alias,
            from_version=self.from_version,
            to_version=self.to_version,
            reason=self.reason,
            revision=self.revision,
            actor=self.actor,
            at=self.created_at,
        )


class AuditEvent(SQLModel, table=True):
    """One row per mutation. What it concerns is a kind and an id, never a formatted string."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_subject", "subject_kind", "subject"),)

    id: int | None = Field(default=None, primary_key=True)
    revision: int = Field(index=True)
    actor: str = Field(max_length=256)
    action: str = Field(max_length=64)
    subject_kind: str = Field(max_length=16)  # "adapter", "dataset" or "api_key"
    subject: str = Field(max_length=128)  # its name
    version: int | None = None  # the version of the adapter or dataset, when it concerns one
    alias: str | None = Field(default=None, max_length=64)  # the alias moved, for alias events
    before: dict[str, Any] | None = _json()
    after: dict[str, Any] | None = _json()
    created_at: datetime = _ts()

    def to_domain(self) -> domain.AuditInfo:
        return domain.AuditInfo(
            revision=self.revision,
            actor=self.actor,
            action=self.action,
            subject_kind=self.subject_kind,
            subject=self.subject,
            version=self.version,
            alias=self.alias,
            before=self.before,
            after=self.after,
            at=self.created_at,
        )


class ApiKey(SQLModel, table=True):
    """Gateway API keys. Only the sha256 of the key is stored; the key is shown once."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    prefix: str = Field(max_length=16)
    key_hash: str = Field(index=True, unique=True, max_length=64)
    adapters: list[str] | None = _json()  # None: every adapter
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    scopes_migrated: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    # Per-key limits; None: server.key_rpm / key_tpm / key_max_concurrency (None there too: none).
    rpm: int | None = Field(default=None)
    tpm: int | None = Field(default=None)
    max_concurrency: int | None = Field(default=None)
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )

    def to_domain(self) -> domain.ApiKeyInfo:
        return domain.ApiKeyInfo(
            name=self.name,
            prefix=self.prefix,
            key_hash=self.key_hash,
            adapters=self.adapters,
            scopes=self.scopes,
            scopes_migrated=self.scopes_migrated,
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrency=self.max_concurrency,
            created_by=self.created_by,
            created_at=self.created_at,
            revoked_at=self.revoked_at,
        )


class Evaluation(SQLModel, table=True):
    """One `loraflow eval` of an adapter version. Versions stay immutable; their evaluations accumulate.

    ``production_version`` is the version production pointed at when the report was made:
    the gate refuses a report made against another one as stale.
    """

    __tablename__ = "evaluation"
    __table_args__ = (Index("ix_evaluation_version", "adapter_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id")
    version: int
    dataset_version_id: int | None = Field(default=None, foreign_key="dataset_version.id")
    split: str = Field(max_length=16)
    split_digest: str = Field(max_length=64)
    production_version: int | None = None
    report: dict[str, Any] = _json(nullable=False)
    page_digest: str | None = Field(default=None, max_length=64)  # its HTML page in the artifact store
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str, dataset: str | None) -> domain.EvaluationInfo:
        if self.id is None:
            raise RuntimeError("Evaluation has no primary key yet")
        return domain.EvaluationInfo(
            id=self.id,
            adapter=adapter,
            version=self.version,
            dataset=dataset,
            split=self.split,
            split_digest=self.split_digest,
            production_version=self.production_version,
            report=self.report,
            page_digest=self.page_digest,
            revision=self.revision,
            created_by=self.created_by,
            created_at=self.created_at,
        )


class DriftReport(SQLModel, table=True):
    """One `loraflow drift` of an adapter version over a window of its sampled traffic.

    The gateways export the latest one per version (the embedding figures need torch, which
    the gateway does not have)."""

    __tablename__ = "drift_report"
    __table_args__ = (Index("ix_drift_report_version", "adapter_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id")
    version: int
    window_start: datetime = _ts()
    window_end: datetime = _ts()
    report: dict[str, Any] = _json(nullable=False)
    page_digest: str | None = Field(default=None, max_length=64)  # its HTML page in the artifact store
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str) -> domain.DriftReportInfo:
        if self.id is None:
            raise RuntimeError("DriftReport has no primary key yet")
        return domain.DriftReportInfo(
            id=self.id,
            adapter=adapter,
            version=self.version,
            window_start=self.window_start,
            window_end=self.window_end,
            report=self.report,
            page_digest=self.page_digest,
            revision=self.revision,
            created_by=self.created_by,
            created_at=self.created_at,
        )


class Review(SQLModel, table=True):
    """A person's review of one sampled request, from the console: a rating, a corrected answer,
    failure categories. Stored beside the customer's own feedback (in the traffic store), never
    replacing it; a request may be reviewed again, and the latest review counts."""

    __tablename__ = "review"
    __table_args__ = (
        Index("ix_review_version", "adapter_id", "version"),
        Index("ix_review_request", "request_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id")
    version: int
    request_id: str = Field(max_length=64)
    reviewer: str = Field(max_length=256)
    rating: int | None = None  # +1 or -1
    correction: str | None = Field(default=None)  # redacted before it is stored
    categories: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str) -> domain.ReviewInfo:
        if self.id is None:
            raise RuntimeError("Review has no primary key yet")
        return domain.ReviewInfo(
            id=self.id,
            adapter=adapter,
            version=self.version,
            request_id=self.request_id,
            reviewer=self.reviewer,
            rating=self.rating,
            correction=self.correction,
            categories=self.categories,
            revision=self.revision,
            created_at=self.created_at,
        )


class PairwiseVote(SQLModel, table=True):
    """One blind pairwise judgement: for an item of an eval report (its example index) or of a
    shadow rollout (a request id), which of two answers a reviewer preferred. The versions were
    hidden and the order random; what is stored is the system the pick stands for."""

    __tablename__ = "pairwise_vote"
    __table_args__ = (UniqueConstraint("source", "source_id", "item", "reviewer", name="uq_pairwise_vote"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id")
    source: str = Field(max_length=16)  # "evaluation" or "rollout"
    source_id: int
    item: str = Field(max_length=64)
    candidate: int  # the candidate version
    baseline: str = Field(max_length=64)  # what it was compared with: "production", "base", "NAME@vN"
    choice: str = Field(max_length=16)  # "candidate", "baseline" or "tie"
    reviewer: str = Field(max_length=256)
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str) -> domain.PairwiseVoteInfo:
        if self.id is None:
            raise RuntimeError("PairwiseVote has no primary key yet")
        return domain.PairwiseVoteInfo(
            id=self.id,
            adapter=adapter,
            source=self.source,
            source_id=self.source_id,
            item=self.item,
            candidate=self.candidate,
            baseline=self.baseline,
            choice=self.choice,
            reviewer=self.reviewer,
            created_at=self.created_at,
        )


class Rollout(SQLModel, table=True):
    """A rollout of one adapter from its production version (``baseline``) to ``candidate``.

    At most one per adapter is active (running or paused); the store checks it inside the write
    transaction, which the revision bump serializes. ``seq`` counts the rollout's own changes, the
    compare-and-swap condition of each. ``controller`` and ``lease_until`` are the lease of the one
    gateway process that decides for it; taking or renewing it moves no routing, so it does not
    bump the registry revision."""

    __tablename__ = "rollout"
    __table_args__ = (Index("ix_rollout_adapter_state", "adapter_id", "state"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: int = Field(foreign_key="adapter.id")
    candidate: int
    baseline: int
    policy: str = Field(max_length=64)
    steps: list[dict[str, Any]] = _json(nullable=False)
    step: int = 0
    state: str = Field(max_length=16)
    seq: int = 0
    decisions: list[dict[str, Any]] = _json(nullable=False)
    started_at: datetime = _ts()
    step_started_at: datetime = _ts()
    ended_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    controller: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()

    def to_domain(self, *, adapter: str) -> domain.RolloutInfo:
        if self.id is None:
            raise RuntimeError("Rollout has no primary key yet")
        return domain.RolloutInfo(
            id=self.id,
            adapter=adapter,
            candidate=self.candidate,
            baseline=self.baseline,
            policy=self.policy,
            steps=[domain.RolloutStep.model_validate(s) for s in self.steps],
            step=self.step,
            state=self.state,
            seq=self.seq,
            decisions=[domain.RolloutDecision.model_validate(d) for d in self.decisions],
            started_at=self.started_at,
            step_started_at=self.step_started_at,
            ended_at=self.ended_at,
            controller=self.controller,
            lease_until=self.lease_until,
            created_by=self.created_by,
            created_at=self.created_at,
        )


class RolloutTally(SQLModel, table=True):
    """What one gateway process (``holder``) counted for one arm of one step of a rollout, whole
    (it rewrites its row, so a retried write never counts twice). The controller sums the rows of
    every holder. Outside the registry's revision: counting moves no routing."""

    __tablename__ = "rollout_tally"

    rollout_id: int = Field(foreign_key="rollout.id", primary_key=True)
    holder: str = Field(primary_key=True, max_length=64)
    step: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    arm: str = Field(primary_key=True, max_length=16)
    counts: dict[str, Any] = _json(nullable=False)
    updated_at: datetime = _ts()


class RateLease(SQLModel, table=True):
    """How much of an API key's per-minute budget the gateways have taken, per time bucket
    (``window``: 5-second buckets since the epoch) and kind (``requests``, ``tokens``); for
    ``slots``, window 0 holds the concurrent requests leased now. Gateways take slices of it
    (server/ratelimit.py), never a row write per request. Not part of the registry's revision:
    leasing moves no routing."""

    __tablename__ = "rate_lease"

    key_name: str = Field(primary_key=True, max_length=128)
    kind: str = Field(primary_key=True, max_length=16)
    window: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    granted: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class SlotLease(SQLModel, table=True):
    """The concurrent-request slots of one key that one gateway process holds, until
    ``expires_at`` (renewed while it lives): a gateway that dies gives its slots back by expiring."""

    __tablename__ = "slot_lease"

    key_name: str = Field(primary_key=True, max_length=128)
    holder: str = Field(primary_key=True, max_length=64)
    slots: int = Field(default=0)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
