"""What the registry hands out: plain pydantic objects, never ORM rows."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from loraflow.registry.drift import Profile
from loraflow.registry.refs import Ref, version_ref
from loraflow.registry.scopes import Scope, grants

VersionStatus = Literal["registered", "archived"]


class AliasState(enum.Enum):
    """A compare-and-swap condition on an alias other than "it points at vN"."""

    ANY = "any"  # no condition: the move happens whatever the alias points at
    UNSET = "unset"  # the alias must not exist yet (a first promotion)


# What a move of an alias requires: a version it must still point at, or an AliasState.
AliasExpect = int | AliasState


class _Record(BaseModel):
    model_config = {"frozen": True}

    @field_validator("created_at", "at", mode="after", check_fields=False)
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # SQLite hands back naive datetimes; everything we store is UTC.
        return value if value.tzinfo else value.replace(tzinfo=UTC)


class DatasetVersionInfo(_Record):
    name: str
    version: int
    digest: str
    counts: dict[str, int]
    lineage: dict[str, Any]
    profile: Profile | None = None
    created_by: str
    created_at: datetime

    @property
    def ref(self) -> str:
        return version_ref(self.name, self.version)


class DriftReportInfo(_Record):
    """A stored ``loraflow drift`` of one version over a window of its sampled traffic."""

    id: int
    adapter: str
    version: int
    window_start: datetime
    window_end: datetime
    report: dict[str, Any]
    revision: int
    created_by: str
    created_at: datetime

    @property
    def ref(self) -> str:
        return version_ref(self.adapter, self.version)


class VersionInfo(_Record):
    adapter: str
    version: int
    digest: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    dataset: str | None  # "NAME@vN" of the DatasetVersion it was trained on
    training_config: dict[str, Any] | None
    metrics: dict[str, Any] | None
    eval_report: dict[str, Any] | None
    chat_template_hash: str | None
    status: VersionStatus
    created_by: str
    created_at: datetime

    @property
    def ref(self) -> str:
        return version_ref(self.adapter, self.version)


class EvaluationInfo(_Record):
    """A stored eval report of one version (see ``loraflow eval``)."""

    id: int
    adapter: str
    version: int
    dataset: str | None  # "NAME@vK" the examples came from
    split: str
    split_digest: str  # sha256 of the split file's bytes
    production_version: int | None  # what production pointed at when the report was made
    report: dict[str, Any]
    revision: int
    created_by: str
    created_at: datetime

    @property
    def ref(self) -> str:
        return version_ref(self.adapter, self.version)


class AdapterInfo(_Record):
    name: str
    base_model: str
    base_model_fingerprint: str
    task: str | None
    created_by: str
    created_at: datetime
    aliases: dict[str, int]
    versions: list[VersionInfo]

    @property
    def latest(self) -> VersionInfo | None:
        return self.versions[-1] if self.versions else None


class AliasMoveInfo(_Record):
    adapter: str
    alias: str
    from_version: int | None
    to_version: int
    reason: str
    revision: int
    actor: str
    at: datetime


SubjectKind = Literal["adapter", "dataset", "api_key"]


class AuditInfo(_Record):
    revision: int
    actor: str
    action: str
    subject_kind: SubjectKind
    subject: str
    version: int | None = None
    alias: str | None = None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    at: datetime

    @property
    def target(self) -> str:
        """For display: ``NAME``, ``NAME@vN`` or ``NAME:ALIAS``."""
        return str(Ref(self.subject, version=self.version, alias=self.alias))


class History(_Record):
    adapter: str
    moves: list[AliasMoveInfo]
    events: list[AuditInfo]


class KeyLimits(_Record):
    """An API key's own limits; None: the gateways' defaults (server.key_rpm and so on)."""

    model_config = {"frozen": True, "extra": "forbid"}

    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens (prompt and completion) per minute.")
    max_concurrency: int | None = Field(None, ge=1, description="Requests in flight at once.")


class ApiKeyInfo(_Record):
    name: str
    prefix: str
    key_hash: str
    adapters: list[str] | None
    scopes: list[Scope] = []
    scopes_migrated: bool = False  # given LEGACY_SCOPES by the migration, not chosen
    rpm: int | None = None  # requests per minute; None: server.key_rpm
    tpm: int | None = None  # tokens (prompt + completion) per minute; None: server.key_tpm
    max_concurrency: int | None = None  # requests in flight; None: server.key_max_concurrency
    created_by: str
    created_at: datetime
    revoked_at: datetime | None = None

    def allows(self, adapter: str) -> bool:
        return self.adapters is None or adapter in self.adapters or "operator" in self.scopes

    def has(self, scope: Scope) -> bool:
        return grants(self.scopes, scope)
