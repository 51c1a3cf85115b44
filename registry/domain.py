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
    page_digest: str | None = None  # the report's HTML page, in the artifact store
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
    page_digest: str | None = None  # the report's HTML page, in the artifact store
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


RolloutState = Literal["running", "paused", "succeeded", "rolled_back", "aborted"]
ACTIVE_ROLLOUT_STATES: tuple[RolloutState, ...] = ("running", "paused")


class RolloutStep(BaseModel):
    """One step of a rollout: a share of production's requests shadowed to the candidate (its
    answers never returned), or a share of ``model=NAME`` requests answered by it (a canary).
    Argo Rollouts' ``setWeight`` and Flagger's ``stepWeight`` are the canary's weight."""

    model_config = {"frozen": True, "extra": "forbid"}

    shadow: float = Field(0.0, ge=0, le=100, description="Percent of production's requests shadowed.")
    canary: float = Field(0.0, ge=0, le=100, description="Percent of requests the candidate answers.")

    def __str__(self) -> str:
        parts = ([f"shadow {self.shadow:g}%"] if self.shadow else []) + (
            [f"canary {self.canary:g}%"] if self.canary else []
        )
        return " + ".join(parts) or "nothing"


class RolloutDecision(BaseModel):
    """One move of a rollout, with who made it and the figures it rests on (the audit log has it too)."""

    model_config = {"frozen": True}

    at: datetime
    action: str  # start, advance, hold, pause, resume, rollback, abort, succeed
    actor: str
    step: int  # the step it was taken at (index into steps)
    reason: str | None = None
    figures: dict[str, Any] | None = None


class RolloutInfo(_Record):
    """A rollout of one adapter from production (``baseline``) to ``candidate``, step by step.

    ``seq`` goes up by one at every change: a change names the ``seq`` it was decided on
    (compare-and-swap), so two controllers, or a controller and an operator, never both act."""

    id: int
    adapter: str
    candidate: int
    baseline: int  # the production version when it started; production stays there until success
    policy: str
    steps: list[RolloutStep]
    step: int
    state: RolloutState
    seq: int
    decisions: list[RolloutDecision]
    started_at: datetime
    step_started_at: datetime
    ended_at: datetime | None = None
    controller: str | None = None  # the gateway process holding the controller lease
    lease_until: datetime | None = None
    created_by: str
    created_at: datetime

    @field_validator("started_at", "step_started_at", "ended_at", "lease_until", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_ROLLOUT_STATES

    @property
    def current(self) -> RolloutStep:
        return self.steps[self.step]

    @property
    def candidate_ref(self) -> str:
        return version_ref(self.adapter, self.candidate)

    @property
    def baseline_ref(self) -> str:
        return version_ref(self.adapter, self.baseline)

    @property
    def last_step(self) -> bool:
        return self.step == len(self.steps) - 1


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


class ReviewInfo(_Record):
    """A person's review of one sampled request (the console's review queue)."""

    id: int
    adapter: str
    version: int
    request_id: str
    reviewer: str
    rating: int | None  # +1 or -1
    correction: str | None  # redacted
    categories: list[str]
    revision: int
    created_at: datetime

    @property
    def ref(self) -> str:
        return version_ref(self.adapter, self.version)


PairwiseSource = Literal["evaluation", "rollout"]
PairwiseChoice = Literal["candidate", "baseline", "tie"]


class PairwiseVoteInfo(_Record):
    """One blind pairwise judgement of a candidate's answer against a baseline's."""

    id: int
    adapter: str
    source: PairwiseSource
    source_id: int
    item: str
    candidate: int
    baseline: str
    choice: PairwiseChoice
    reviewer: str
    created_at: datetime
