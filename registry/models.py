"""Registry tables (SQLModel). Rows never leave the store: see ``registry.domain``.

Every mutation runs in one transaction that first bumps ``RegistryState.revision``.
That single row is the registry's write lock (a row lock on PostgreSQL, the
database write lock on SQLite), so concurrent writers are serialized, version
numbers cannot collide and alias history stays linear. It is also the cheap
"did anything change?" number servers poll.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


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


class ApiKey(SQLModel, table=True):
    """Gateway API keys. Only the sha256 of the key is stored; the key is shown once."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    prefix: str = Field(max_length=16)
    key_hash: str = Field(index=True, unique=True, max_length=64)
    adapters: list[str] | None = _json()  # None: every adapter
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
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
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()


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
    revision: int = Field(sa_column=Column(BigInteger, nullable=False))
    created_by: str = Field(max_length=256)
    created_at: datetime = _ts()
